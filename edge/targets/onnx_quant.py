"""Our scheme's integer weights carried into the ONNX graph, unchanged: MatMulNBits and GatherBlockQuantized.

onnxruntime's own quantizers (quantize_dynamic, MatMulNBitsQuantizer) would round the weights
again by their own rules; here the scheme decides. The eager quantized model's weight-only
tensors (torchao IntxUnpackedToInt8Tensor: int qdata, one scale per group, zero point 0) are
dequantized into plain float weights for the export, so the exported float graph computes
exactly what the eager model computes; then every MatMul / Gemm / Gather that reads one of
those weights is replaced by onnxruntime's contrib op holding the integers and scales:

- `com.microsoft.MatMulNBits`, 4-bit: B as uint8 [N, K / block, block / 2], values q + 8 packed low
  nibble first along K, scales [N, K / block], no zero points (default 8); an int8 weight as two such
  planes, its high and low nibbles (_planes);
- `com.microsoft.GatherBlockQuantized`: a table no MatMul reads, as uint8 [V, D * bits / 8] packed the
  same way along D, scales [V, D / block].
Both need a power-of-two block >= 16: a per-channel scale is repeated over the largest such block
that divides the row (exactly the same weights). Weights are found by value (a hash of the
dequantized matrix, or its transpose), not by name: the exporter renames and pre-transposes them.

Dynamic int8 activations (8da: the int4 / int8 schemes) are not onnxruntime's to choose either: its
int8 paths round differently (DynamicQuantizeLinear: one scale per tensor, not per token; MatMulNBits
accuracy_level 4: symmetric per block of K) and cannot apply our per-group weight scales after an
integer GEMM. So each such linear's input is rounded in the graph exactly as torchao rounds it (per
token, asymmetric int8, in float ops) and MatMulNBits multiplies in fp32 (accuracy_level 0): the .onnx
computes what the eager quantized model computes, at the cost of int8 arithmetic it does not use; but
for the int8 head (INT8_COMPUTE), where that cost is most of a decode step.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MS = "com.microsoft"


@dataclass
class IntWeight:
    name: str
    q: np.ndarray  # (rows, cols) int8, values in the signed range of `bits`
    scale: np.ndarray  # (rows, cols // group) float32
    group: int
    bits: int
    kind: str = "linear"  # or "embedding"
    dynamic: bool = False  # activations quantized to int8 at run time (8da)


def _key(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a, dtype=np.float32).tobytes(), digest_size=16).hexdigest()


class _Found(dict):
    """{hash of a float weight: (IntWeight, transposed)}, and every module's IntWeight in `weights`.

    A tied table (Scheme.shared_table) is one content, two modules: `kinds` gives each hash's weight per
    kind ("linear" / "embedding"), so that a MatMul reports the head and a Gather the lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[IntWeight] = []
        self.kinds: dict[str, dict[str, IntWeight]] = {}

    def get_as(self, key: str, kind: str) -> tuple[IntWeight, bool, int]:
        """(the weight of that kind, or any, with this content; transposed; an id of the content)."""
        iw, transposed = self[key]
        return self.kinds[key].get(kind, iw), transposed, id(iw)


def _fake_quant_input(mod: nn.Module, args: tuple) -> tuple:
    """A forward pre-hook: the input as a dynamic int8 linear sees it (torchao's per-token asymmetric int8)."""
    from edge.quant.smooth import fake_quant_act

    return (fake_quant_act(args[0]), *args[1:])


def _summed_pair(self, x: torch.Tensor) -> torch.Tensor:
    """ActResidual's two rounded rows summed BEFORE its float linear: W fq(x) + W fq(r) = W (fq(x) + fq(r))
    in fp32, so one row goes in. Two rows put MatMulNBits on MLAS's M > 1 path, which dequantizes the
    whole weight to fp32 at every call. Each row is rounded per slice of `group` inputs, as the pre-hooks
    would round each part's input."""
    from edge.quant.smooth import fake_quant_act

    g = self.group or self.in_features
    rows = torch.stack([x, x - self.rounded(x)], dim=-2)
    rows = fake_quant_act(rows.unflatten(-1, (self.in_features // g, g))).flatten(-2)
    return self.lin(rows.sum(-2))


@contextmanager
def dequantized(model: nn.Module, dynamic_ok: bool = False, fake_quant: bool = False):
    """The model with float weights equal to its quantized ones; yields {hash: (IntWeight, transposed)}.

    The quantized weights are restored afterwards. A weight with dynamic activation quantization
    computes differently from its dequantized float: refused unless `dynamic_ok` (the caller then
    re-creates the activation quantization, as LiteRT's dynamic-range ops do) or `fake_quant`: its
    module's input is then quantized and dequantized in float ops in front of the float weight
    (edge/quant/smooth.py fake_quant_act, torchao's rounding bit for bit), so the exported graph
    computes what the eager 8da linear computes, whatever op later takes the weight."""
    from edge.quant.split import ActResidual

    found, kept, hooks, summed = _Found(), [], [], {}
    # every module inside an ActResidual's linear (a PlaneSum's planes, a ColumnSplitLinear's parts) -> it
    pairs = {id(s): m for m in model.modules() if isinstance(m, ActResidual) for s in m.lin.modules()}
    try:  # restores what was changed when a weight is refused midway too
        for name, mod in model.named_modules():
            # its own: a wrapper's `weight` property (ActResidual) is its inner linear's
            w = mod._parameters.get("weight")
            if w is None or not hasattr(w, "qdata"):
                continue
            dynamic = getattr(w, "activation_quantization", None) is not None
            if dynamic and not (dynamic_ok or fake_quant):
                raise NotImplementedError(f"{name}: dynamic activation quantization has no exact ONNX form here")
            if dynamic and fake_quant and id(mod) in pairs:
                summed[id(pairs[id(mod)])] = pairs[id(mod)]
            elif dynamic and fake_quant:
                hooks.append(mod.register_forward_pre_hook(_fake_quant_input))
            if torch.count_nonzero(w.zero_point):
                raise NotImplementedError(f"{name}: asymmetric weights (non-zero zero points)")
            bits = {torch.int4: 4, torch.int8: 8}[w.target_dtype]
            group = int(w.block_size[-1])
            deq = w.dequantize().float()
            kind = "embedding" if isinstance(mod, nn.Embedding) else "linear"
            iw = IntWeight(name, w.qdata.numpy().astype(np.int8), w.scale.float().numpy(), group, bits, kind, dynamic)
            array = deq.numpy()
            found.weights.append(iw)  # a table shared by two modules (Scheme.shared_table) is one key, two weights
            for key, transposed in ((_key(array), False), (_key(array.T), True)):
                found[key] = (iw, transposed)  # the last weight of a content: one object per content
                found.kinds.setdefault(key, {})[kind] = iw
            kept.append((mod, w))
            mod.weight = nn.Parameter(deq, requires_grad=False)
        for m in summed.values():
            m.forward = _summed_pair.__get__(m)
        yield found
    finally:
        for h in hooks:
            h.remove()
        for m in summed.values():
            m.__dict__.pop("forward", None)  # the class's own again
        for mod, w in kept:
            mod.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """uint8 values 0..15, two per byte along the last axis, low nibble first."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _unsigned(iw: IntWeight) -> np.ndarray:
    """q + 2^(bits-1): the values in 0 .. 2^bits - 1, as onnxruntime's default zero point reads them."""
    return (iw.q.astype(np.int16) + (1 << (iw.bits - 1))).astype(np.uint8)


def _packed(iw: IntWeight, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 rows x cols*bits/8 packed low bits first, float32 scales rows x cols/block)."""
    u = _unsigned(iw)
    return (_nibbles(u) if iw.bits == 4 else u), _block_scales(iw, block)


def _block_scales(iw: IntWeight, block: int) -> np.ndarray:
    rows, cols = iw.q.shape
    scales = np.repeat(iw.scale, iw.group // block, axis=1) if iw.group > block else iw.scale
    return np.ascontiguousarray(scales.reshape(rows, cols // block), dtype=np.float32)


def _planes(iw: IntWeight) -> list[np.ndarray]:
    """The 4-bit planes MatMulNBits multiplies by, each (rows, cols) of values 0..15, unpacked.

    int4: one, q + 8 (MatMulNBits' default zero point 8). int8: two, the high and low nibbles H, L of
    u = q + 128, as s q = 16 s (H - 8) + s (L - 0): the high plane on 16 x with the default zero point,
    the low one on x with zero points 0, both with the scales s. onnxruntime 1.32 multiplies 8-bit
    MatMulNBits in fp32 (accuracy_level 0) by dequantizing the whole weight at every call (no MLAS
    kernel for 8 bits there): the 270M's int8 head took 415 ms a token; 4-bit planes run MLAS's kernels.
    """
    u = _unsigned(iw)
    return [u] if iw.bits == 4 else [u >> 4, u & 15]


# int8 weights multiplied by onnxruntime's int8 kernel (MatMulNBits bits 8, accuracy_level 4): the head, most
# of a decode step's bytes; its two 4-bit planes in fp32 ran ~4x slower. onnxruntime then rounds its input again
# (symmetric int8 per block of K): the cost in KLD is measured in docs/speed.md, "ONNX".
INT8_COMPUTE = ("lm_head",)


def _int8_compute(iw: IntWeight, names: tuple[str, ...]) -> bool:
    # dynamic only: a weight-only scheme's float activations stay exact
    return iw.bits == 8 and iw.dynamic and iw.kind == "linear" and iw.name.split(".")[0] in names


def _block(iw: IntWeight) -> int | None:
    """MatMulNBits' / GatherBlockQuantized's block for `iw`: a power of two >= 16 dividing its group (a
    per-channel group is the whole row), or None when there is none (the op stays float)."""
    b = iw.group & -iw.group  # largest power of two dividing the group
    # MLAS's fast MatMulNBits kernels take blocks of 16 to 256 (MlasIsQNBitGemmAvailable); a wider per-channel
    # group repeats its scale over blocks of 256 (1.5% more bytes on a 2048-wide row).
    return min(b, 256) if b >= 16 else None


def rewrite(model_proto, found: dict, int8_compute_names: tuple[str, ...] = ()) -> list[dict]:
    """Replace the float uses of the scheme's weights in place; return one coverage row per weight.

    Each weight's integers are stored once, as MatMulNBits' 4-bit planes (_Stored) when a MatMul reads
    them: a tied table (Scheme.shared_table: head and lookup, the 270M's 168 MB of int8) is then looked
    up from those very bytes by plain ops (Gather, unpack, Cast, Sub, Mul by the gathered scales), since
    GatherBlockQuantized wants them 2-D, in one piece, and its scales in another shape. A table that no
    MatMul reads goes to GatherBlockQuantized. A weight whose group has no power-of-two block >= 16 stays
    float (its coverage row says so): its activations are still quantized as eager does (dequantized)."""
    from onnx import helper, numpy_helper

    g = model_proto.graph
    keys = {}
    for init in g.initializer:
        if len(init.dims) == 2 and init.data_type == 1:  # 2-D float32
            k = _key(numpy_helper.to_array(init))
            if k in found:
                keys[init.name] = k
    rows: dict[str, dict] = {}

    def row(iw: IntWeight, block: int | None, op: str, st: _Stored | None = None) -> None:
        # "planes": how many MatMulNBits weights hold it (int8: two 4-bit ones, _planes, or one 8-bit; 0: float)
        planes = (len(st.planes) if st else 1 if iw.bits == 4 else 2) if block else 0
        new = {"name": iw.name, "bits": iw.bits, "block": block, "planes": planes, "onnx": []}
        rows.setdefault(iw.name, new)["onnx"].append(op)

    def attrs(node) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def matmul_weight(node) -> IntWeight | None:
        """The weight a MatMul / Gemm multiplies by, when MatMulNBits can take its place (y = x W^T)."""
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in keys:
            return None
        iw, transposed, _ = found.get_as(keys[node.input[1]], "linear")
        a = attrs(node)
        # MatMul reads B = W^T (K, N); Gemm with transB=1 reads B = W (N, K).
        ok = transposed if node.op_type == "MatMul" else (a.get("transB", 0) == 1 and not transposed)
        plain = node.op_type == "MatMul" or (
            len(node.input) == 2 and a.get("alpha", 1.0) == 1.0 and a.get("transA", 0) == 0
        )
        return iw if ok and plain else None

    def gather_weight(node) -> IntWeight | None:
        if node.op_type != "Gather" or node.input[0] not in keys:
            return None
        iw, transposed, _ = found.get_as(keys[node.input[0]], "embedding")
        return iw if not transposed and attrs(node).get("axis", 0) == 0 else None

    # One stored copy per weight content (a tied table's head and lookup are two IntWeights, one content).
    packed: dict[int, _Stored] = {}
    zeros: dict[tuple, str] = {}  # one all-zero zero-point tensor per shape

    def content(node) -> int:
        return found.get_as(keys[node.input[0 if node.op_type == "Gather" else 1]], "linear")[2]

    def stored(iw: IntWeight, block: int, cid: int) -> _Stored:
        if cid not in packed and cid in int8_compute:  # the lookup of a tied table reads those bytes too
            n, k = iw.q.shape
            base = f"{iw.name}.q8"
            g.initializer.append(numpy_helper.from_array(_unsigned(iw).reshape(n, k // block, block), base))
            g.initializer.append(numpy_helper.from_array(_block_scales(iw, block), base + ".scales"))
            packed[cid] = _Stored([base], base + ".scales", None, block, bits=8)
        if cid not in packed:
            n, k = iw.q.shape
            base = f"{iw.name}.q{iw.bits}"
            planes = _planes(iw)
            names = [base] if len(planes) == 1 else [base + ".hi", base + ".lo"]
            g.initializer.extend(
                numpy_helper.from_array(_nibbles(p).reshape(n, k // block, block // 2), name)
                for p, name in zip(planes, names, strict=True)
            )
            g.initializer.append(numpy_helper.from_array(_block_scales(iw, block), base + ".scales"))
            zp = None
            if len(planes) == 2:
                shape = (n, -(-(k // block) // 2))  # 4-bit zero points, two per byte
                if shape not in zeros:
                    zeros[shape] = f"zero_points.{shape[0]}x{shape[1]}"
                    g.initializer.append(numpy_helper.from_array(np.zeros(shape, np.uint8), zeros[shape]))
                zp = zeros[shape]
            packed[cid] = _Stored(names, base + ".scales", zp, block)
        return packed[cid]

    matmuls = [(node, iw) for node in g.node if (iw := matmul_weight(node)) is not None]
    read_by_matmul = {content(node) for node, iw in matmuls if _block(iw)}
    int8_compute = {content(node) for node, iw in matmuls if _int8_compute(iw, int8_compute_names)}
    new_nodes, used = [], set()
    for node in g.node:
        rep: list = []
        if (iw := matmul_weight(node)) is not None:
            block = _block(iw)
            if block is None:
                row(iw, None, f"MatMul (float: group {iw.group} has no power-of-two block >= 16)")
            else:
                st = stored(iw, block, content(node))
                rep = _matmul_planes(helper, numpy_helper, g, iw, st, node)
                row(iw, block, "MatMulNBits", st)
                used.add(node.input[1])
        elif (iw := gather_weight(node)) is not None:
            block = _block(iw)
            if block is None:
                row(iw, None, f"Gather (float: group {iw.group} has no power-of-two block >= 16)")
            elif content(node) in read_by_matmul:
                st = stored(iw, block, content(node))
                rep = _lookup_from_packed(helper, numpy_helper, g, iw, st, node)
                row(iw, block, "Gather of MatMulNBits' integers", st)
                used.add(node.input[0])
            else:
                u, s = _packed(iw, block)
                base = f"{iw.name}.q{iw.bits}.gather"
                g.initializer.extend([numpy_helper.from_array(u, base), numpy_helper.from_array(s, base + ".scales")])
                rep = [
                    helper.make_node(
                        "GatherBlockQuantized",
                        [base, node.input[1], base + ".scales"],
                        list(node.output),
                        name=f"{iw.name}.GatherBlockQuantized",
                        domain=MS,
                        bits=iw.bits,
                        block_size=block,
                        gather_axis=0,
                        quantize_axis=1,
                    )
                ]
                row(iw, block, "GatherBlockQuantized")
                used.add(node.input[0])
        new_nodes.extend(rep or [node])
    del g.node[:]
    g.node.extend(new_nodes)
    still_read = {i for node in g.node for i in node.input}
    keep = [i for i in g.initializer if i.name not in used or i.name in still_read]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(op.domain == MS for op in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid(MS, 1))
    missing = sorted({iw.name for iw in found.weights} - set(rows))
    return list(rows.values()) + [{"name": n, "onnx": ["float: not a plain MatMul / Gather"]} for n in missing]


@dataclass
class _Stored:
    """A weight's initializers: 4-bit planes [N, K / block, block / 2] (int4: one; int8: high and low
    nibbles, _planes) or one 8-bit [N, K / block, block] (`bits` 8: INT8_COMPUTE), the block scales
    [N, K / block], and the low plane's zero points (0)."""

    planes: list[str]
    scales: str
    zero_points: str | None
    block: int
    bits: int = 4


def _matmul_planes(helper, numpy_helper, g, iw: IntWeight, st: _Stored, node) -> list:
    """x W^T as MatMulNBits over the 4-bit planes: one for int4; for int8 hi(16 x) + lo(x) (_planes)."""
    n, k = iw.q.shape
    x, out, p = node.input[0], node.output[0], f"{iw.name}.MatMulNBits"

    def mm(inp: str, plane: str, zp: str | None, y: str, name: str):
        return helper.make_node(
            "MatMulNBits",
            [inp, plane, st.scales] + ([zp] if zp else []),
            [y],
            name=name,
            domain=MS,
            K=k,
            N=n,
            bits=st.bits,
            block_size=st.block,
            # 0, fp32 compute: the activations arrive already rounded as eager rounds them; 4: INT8_COMPUTE
            accuracy_level=4 if st.bits == 8 else 0,
        )

    if len(st.planes) == 1:
        return [mm(x, st.planes[0], None, out, p)]
    g.initializer.append(numpy_helper.from_array(np.array(16, np.float32), p + ".sixteen"))
    return [
        helper.make_node("Mul", [x, p + ".sixteen"], [p + ".x16"]),  # exact: a power of two
        mm(p + ".x16", st.planes[0], None, p + ".hi", p + ".hi"),
        mm(x, st.planes[1], st.zero_points, p + ".lo", p + ".lo"),
        helper.make_node("Add", [p + ".hi", p + ".lo"], [out]),
    ]


def _lookup_from_packed(helper, numpy_helper, g, iw: IntWeight, st: _Stored, node) -> list:
    """Nodes computing Gather(table, ids) from the MatMulNBits planes and scales: each plane's rows
    gathered and unpacked (low nibble first), int4 q = U - 8, int8 q = 16 H + L - 128 (or U - 128 from
    one 8-bit weight), times the gathered block scales."""
    ids, out = node.input[1], node.output[0]
    p = f"{node.name or out}.lookup"
    k = iw.q.shape[1]
    nibbles = {p + ".mask": np.array(15, np.uint8), p + ".four": np.array(4, np.uint8)} if st.bits == 4 else {}
    consts = (
        nibbles
        | {
            p + ".last": np.array([-1], np.int64),
            p + ".blocks": np.array([0, 0, k // st.block, st.block], np.int64),  # ids are [1, T]: 0 keeps both axes
            p + ".row": np.array([0, 0, k], np.int64),
            p + ".centre": np.array(1 << (iw.bits - 1), np.float32),
        }
        | ({p + ".sixteen": np.array(16, np.float32)} if len(st.planes) == 2 else {})
    )
    g.initializer.extend(numpy_helper.from_array(v, n) for n, v in consts.items())
    nodes, values = [], []
    for i, plane in enumerate(st.planes):
        q = f"{p}.{i}"
        if st.bits == 8:  # a byte a value: no unpacking
            nodes += [
                helper.make_node("Gather", [plane, ids], [q + ".u8"], axis=0),
                helper.make_node("Cast", [q + ".u8"], [q + ".f"], to=1),
            ]
            values.append(q + ".f")
            continue
        nodes += [
            helper.make_node("Gather", [plane, ids], [q + ".u8"], axis=0),
            helper.make_node("BitwiseAnd", [q + ".u8", p + ".mask"], [q + ".lo"]),
            helper.make_node("BitShift", [q + ".u8", p + ".four"], [q + ".hi"], direction="RIGHT"),
            helper.make_node("Unsqueeze", [q + ".lo", p + ".last"], [q + ".lo1"]),
            helper.make_node("Unsqueeze", [q + ".hi", p + ".last"], [q + ".hi1"]),
            helper.make_node("Concat", [q + ".lo1", q + ".hi1"], [q + ".pairs"], axis=-1),
            helper.make_node("Reshape", [q + ".pairs", p + ".blocks"], [q + ".u4"]),
            helper.make_node("Cast", [q + ".u4"], [q + ".f"], to=1),
        ]
        values.append(q + ".f")
    if len(values) == 2:  # 16 H + L
        nodes += [
            helper.make_node("Mul", [values[0], p + ".sixteen"], [p + ".h16"]),
            helper.make_node("Add", [p + ".h16", values[1]], [p + ".u"]),
        ]
        values = [p + ".u"]
    return nodes + [
        helper.make_node("Sub", [values[0], p + ".centre"], [p + ".q"]),
        helper.make_node("Gather", [st.scales, ids], [p + ".s"], axis=0),
        helper.make_node("Unsqueeze", [p + ".s", p + ".last"], [p + ".s1"]),
        helper.make_node("Mul", [p + ".q", p + ".s1"], [p + ".deq"]),
        helper.make_node("Reshape", [p + ".deq", p + ".row"], [out]),
    ]
