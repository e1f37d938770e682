"""Our scheme's integer weights carried into the ONNX graph, unchanged: MatMulNBits and GatherBlockQuantized.

onnxruntime's own quantizers (quantize_dynamic, MatMulNBitsQuantizer) would round the weights
again by their own rules; here the scheme decides. The eager quantized model's weight-only
tensors (torchao IntxUnpackedToInt8Tensor: int qdata, one scale per group, zero point 0) are
dequantized into plain float weights for the export, so the exported float graph computes
exactly what the eager model computes; then every MatMul / Gemm / Gather that reads one of
those weights is replaced by onnxruntime's contrib op holding the integers and scales:

- `com.microsoft.MatMulNBits`: B as uint8 [N, K / block, block * bits / 8], values q + 2^(bits-1)
  packed low bits first along K, scales [N, K / block], no zero points (default 2^(bits-1));
- `com.microsoft.GatherBlockQuantized`: the table as uint8 [V, D * bits / 8] packed the same way
  along D, scales [V, D / block].
Both need a power-of-two block >= 16: a per-channel scale is repeated over the largest such block
that divides the row (exactly the same weights). Weights are found by value (a hash of the
dequantized matrix, or its transpose), not by name: the exporter renames and pre-transposes them.
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


def _pow2_block(cols: int, group: int) -> int:
    """A power-of-two block >= 16 that divides `group` (a per-channel group is the whole row)."""
    b = group & -group  # largest power of two dividing group
    if b < 16:
        raise NotImplementedError(f"group {group} has no power-of-two block >= 16 (MatMulNBits needs one)")
    return min(b, 1 << 12)


class _Found(dict):
    """{hash of a float weight: (IntWeight, transposed)}, and every module's IntWeight in `weights`."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[IntWeight] = []


@contextmanager
def dequantized(model: nn.Module, dynamic_ok: bool = False):
    """The model with float weights equal to its quantized ones; yields {hash: (IntWeight, transposed)}.

    The quantized weights are restored afterwards. A weight with dynamic activation quantization
    computes differently from its dequantized float: refused unless `dynamic_ok` (the caller then
    re-creates the activation quantization, as LiteRT's dynamic-range ops do)."""
    found, kept = _Found(), []
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight")  # its own: a wrapper's `weight` property (ActResidual) is its inner linear's
        if w is None or not hasattr(w, "qdata"):
            continue
        dynamic = getattr(w, "activation_quantization", None) is not None
        if dynamic and not dynamic_ok:
            raise NotImplementedError(f"{name}: dynamic activation quantization has no exact ONNX form here")
        if torch.count_nonzero(w.zero_point):
            raise NotImplementedError(f"{name}: asymmetric weights (non-zero zero points)")
        bits = {torch.int4: 4, torch.int8: 8}[w.target_dtype]
        group = int(w.block_size[-1])
        deq = w.dequantize().float()
        kind = "embedding" if isinstance(mod, nn.Embedding) else "linear"
        iw = IntWeight(name, w.qdata.numpy().astype(np.int8), w.scale.float().numpy(), group, bits, kind, dynamic)
        array = deq.numpy()
        found.weights.append(iw)  # a table shared by two modules (Scheme.shared_table) is one key, two weights
        found[_key(array)] = (iw, False)
        found[_key(array.T)] = (iw, True)
        kept.append((mod, w))
        mod.weight = nn.Parameter(deq, requires_grad=False)
    try:
        yield found
    finally:
        for mod, w in kept:
            mod.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)


def _packed(iw: IntWeight, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 rows x cols*bits/8 packed low bits first, float32 scales rows x cols/block)."""
    rows, cols = iw.q.shape
    u = (iw.q.astype(np.int16) + (1 << (iw.bits - 1))).astype(np.uint8)
    if iw.bits == 4:
        u = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
    scales = np.repeat(iw.scale, iw.group // block, axis=1) if iw.group > block else iw.scale
    return u, np.ascontiguousarray(scales.reshape(rows, cols // block), dtype=np.float32)


def rewrite(model_proto, found: dict) -> list[dict]:
    """Replace the float uses of the scheme's weights in place; return one coverage row per weight."""
    from onnx import helper, numpy_helper

    g = model_proto.graph
    inits = {i.name: i for i in g.initializer}
    keys = {}
    for name, init in inits.items():
        if len(init.dims) == 2 and init.data_type == 1:  # 2-D float32
            k = _key(numpy_helper.to_array(init))
            if k in found:
                keys[name] = k
    new_nodes, used, rows = [], set(), {}
    for node in g.node:
        rep = None
        if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2 and node.input[1] in keys:
            iw, transposed = found[keys[node.input[1]]]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            # MatMul reads B = W^T (K, N); Gemm with transB=1 reads B = W (N, K).
            ok = transposed if node.op_type == "MatMul" else (attrs.get("transB", 0) == 1 and not transposed)
            plain = node.op_type == "MatMul" or (
                len(node.input) == 2 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("transA", 0) == 0
            )
            if ok and plain:
                n, k = iw.q.shape
                block = _pow2_block(k, iw.group)
                b, s = _packed(iw, block)
                base = f"{iw.name}.q{iw.bits}.matmul"
                g.initializer.extend(
                    [
                        numpy_helper.from_array(b.reshape(n, k // block, block * iw.bits // 8), base),
                        numpy_helper.from_array(s, base + ".scales"),
                    ]
                )
                rep = helper.make_node(
                    "MatMulNBits",
                    [node.input[0], base, base + ".scales"],
                    list(node.output),
                    name=f"{iw.name}.MatMulNBits",
                    domain=MS,
                    K=k,
                    N=n,
                    bits=iw.bits,
                    block_size=block,
                    accuracy_level=0,
                )
                rows.setdefault(iw.name, {"name": iw.name, "bits": iw.bits, "block": block, "onnx": []})
                rows[iw.name]["onnx"].append("MatMulNBits")
        elif node.op_type == "Gather" and node.input[0] in keys:
            iw, transposed = found[keys[node.input[0]]]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if not transposed and attrs.get("axis", 0) == 0:
                v, d = iw.q.shape
                block = _pow2_block(d, iw.group)
                u, s = _packed(iw, block)
                base = f"{iw.name}.q{iw.bits}.gather"
                g.initializer.extend([numpy_helper.from_array(u, base), numpy_helper.from_array(s, base + ".scales")])
                rep = helper.make_node(
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
                rows.setdefault(iw.name, {"name": iw.name, "bits": iw.bits, "block": block, "onnx": []})
                rows[iw.name]["onnx"].append("GatherBlockQuantized")
        if rep is not None:
            used.add(node.input[1] if node.op_type != "Gather" else node.input[0])
            new_nodes.append(rep)
        else:
            new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    still_read = {i for node in g.node for i in node.input}
    keep = [i for i in g.initializer if i.name not in used or i.name in still_read]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(op.domain == MS for op in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid(MS, 1))
    missing = sorted({iw.name for iw, _ in found.values()} - set(rows))
    # A tied table read by both ops is stored twice (Gather's and MatMulNBits' layouts differ in shape).
    return list(rows.values()) + [{"name": n, "onnx": ["float: not a plain MatMul / Gather"]} for n in missing]
