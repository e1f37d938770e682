"""SCHEMES: every quantization scheme is one typed object, named once, with its accuracy band.

A scheme says, for each kind of tensor (transformer linears, the LM head, the embedding), how
its weights are stored and how the activations meet them. Backends read these objects; no
backend invents a recipe of its own. Round-to-nearest baselines (`rtn-*`) carry no band:
they are measured so that every lever is judged against them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import StrEnum

from edge.errors import EdgeError


class Act(StrEnum):
    FLOAT = "float"  # activations stay float (weight-only)
    DYNAMIC_INT8 = "dynamic-int8"  # per-token asymmetric int8, computed at run time (XNNPACK "qd8")


class Rounding(StrEnum):
    RTN = "rtn"  # round to nearest with the absmax scale
    HQQ = "hqq-scale"  # torchao's half-quadratic search of the scale (calibration-free)
    GPTQ = "gptq"  # error-compensating rounding on calibration activations (edge/quant/gptq.py)


@dataclass(frozen=True)
class WeightQuant:
    bits: int  # 4 or 8, symmetric
    group: int | None  # elements per scale along the input axis; None = one scale per output channel
    act: Act = Act.DYNAMIC_INT8
    rounding: Rounding = Rounding.RTN

    def label(self) -> str:
        g = f"g{self.group}" if self.group else "per-channel"
        a = "8da" if self.act == Act.DYNAMIC_INT8 else "w"
        return f"{a}{self.bits}w-{g}-{self.rounding.value}" if a == "8da" else f"int{self.bits}-{g}-weight-only"

    def bits_per_weight(self) -> float:
        """Storage bits per weight: group scales are 16-bit in the artifacts (bf16 in the .pte, bf16-valued
        fp16 in the .tflite); per-channel scales (fp32, one per row) are left out."""
        return self.bits + (16 / self.group if self.group else 0.0)


@dataclass(frozen=True)
class Band:
    """Acceptance vs the fp32 reference on the golden prompts (shared/DESIGN.md)."""

    max_abs_logit: float | None = None
    mean_kld: float | None = None
    top1: float | None = None


@dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    linear: WeightQuant | None  # q/k/v/o and gate/up/down
    head: WeightQuant | None  # the LM head (untied from the embedding when quantized)
    embedding: WeightQuant | None  # the lookup table (act is irrelevant there)
    band: Band | None
    # SmoothQuant scales (edge/quant/smooth.py), searched on calibration text and folded into the
    # norms and linears before quantizing: for schemes whose activations are quantized dynamically.
    smooth: bool = False
    # Lowering alone (artifact vs the eager model of the same scheme) must add less than this.
    lowering_max_kld: float = 1e-3
    # ... and keep at least this top-1 agreement with it.
    lowering_min_top1: float = 0.995
    # (name suffix, quant) pairs that override `linear` for the linears whose name ends so.
    overrides: tuple[tuple[str, WeightQuant], ...] = ()
    # One int8 table for the lookup and the head, stored once: the head is 8da8w per output channel
    # and the lookup reads the same int8 rows and per-row scales (quantized_decomposed::embedding_byte).
    # ExecuTorch deduplicates identical constants only in its external weight file, so the bundle gets
    # model.ptd beside model.pte (the stock runners take it as their data path).
    shared_table: bool = False
    # Linears whose source is a Q4_K grid (GGUF input) keep its integers exactly, as 8da4w with
    # per-group offsets (edge/quant/transcode.py), wherever this scheme gives them >= 4 bits.
    source_grids: bool = False
    # Linears whose source is a symmetric grid in groups of 32 (Q8_0, Q5_0) keep its integers exactly
    # as two 4-bit planes (edge/quant/split.py, PlaneSum), wherever this scheme gives them 8 bits.
    source_planes: bool = False
    # ... with their dynamic int8 activations scaled per slice of this many inputs rather than per
    # whole row (the main 8da4w linear split by columns, edge/quant/split.py): no bytes added, the
    # group scales are the same. Each slice of a dynamic-shape input is a kernel outside XNNPACK that
    # cuts the graph (docs/speed.md): int4 takes ActResidual on mlp.down instead, which the slices
    # bought little on top of.
    source_act_slice: int | None = None
    # The Q4_K linears' per-group offsets (OffsetLinear) in int8 per output row instead of fp32: a
    # quarter of the bytes (2.1 MB on the 270M) for one int8 rounding of each offset.
    int8_offsets: bool = False
    # Every dynamic-int8 linear takes two rows, x and its int8 rounding residual (edge/quant/split.py,
    # ActResidual): activations as good as float on XNNPACK, whose int8 kernels all quantize them.
    act_residual: bool = False
    # ... only the linears with these names (a dotted suffix, e.g. "mlp.down" or "lm_head"); empty: every
    # one, the Q4_K offsets included. Each residual costs ~29 small XNNPACK ops a step (most of a decode
    # step's time when all 154 of the 270M's linears took it) and pays most where outliers are largest.
    act_residual_only: tuple[str, ...] = ()
    # Every weight (linears, head, lookup table) rounded to fp16 and stored so, compute in fp32: half
    # of fp32's bytes for float-exact kernels (LiteRT: fp16 constants behind DEQUANTIZE, which its GPU
    # delegates read directly). No integer format: `linear`, `head` and `embedding` stay None.
    float16: bool = False
    # GPTQ's Hessians also see this many sequences sampled from the fp32 model itself (edge/quant/
    # sample.py, seeded): the shipped calibration texts are ~800 tokens, thin for a 640 x 640 Hessian.
    gptq_samples: int = 0
    # GPTQ picks each group row's scale among shrinks of its absmax (edge/quant/gptq.py CLIP) by the
    # activation-weighted rounding error, instead of the absmax scale alone.
    gptq_scale_search: bool = False
    # The shared table as two 4-bit planes (edge/quant/two_pass.py): the head scores every row from the
    # high plane (half the bytes a token) and recomputes this many of the best exactly; 0: the int8 head.
    head_exact_rows: int = 0

    def __post_init__(self) -> None:
        if self.shared_table:
            h, e = self.head, self.embedding
            ok = h and e and h.bits == e.bits == 8 and e.group is None and Rounding.RTN == h.rounding == e.rounding
            if not ok or h.act != Act.DYNAMIC_INT8:
                # The head's groups, if any, are column slices with per-row scales (edge/quant/split.py).
                raise ValueError(
                    f"scheme {self.name}: a shared table needs an 8da8w RTN head and an int8 per-row lookup"
                )
        if self.head_exact_rows and (not self.shared_table or self.head.group is not None):
            raise ValueError(f"scheme {self.name}: a two-pass head splits a shared int8 table, one scale per row")

    def quant_for(self, name: str) -> WeightQuant | None:
        """How the linear called `name` is quantized ("lm_head": the head)."""
        if name == "lm_head":
            return self.head
        for suffix, q in self.overrides:
            if name == suffix or name.endswith("." + suffix):
                return q
        return self.linear

    @property
    def calibrated(self) -> bool:
        """Needs calibration text: SmoothQuant scales or GPTQ rounding."""
        qs = [self.linear, self.head, *(q for _, q in self.overrides)]
        return self.smooth or any(q is not None and q.rounding == Rounding.GPTQ for q in qs)

    @property
    def quantized(self) -> bool:
        return self.float16 or any((self.linear, self.head, self.embedding))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scheme:
        """The inverse of to_dict, from a manifest's JSON (a `--quant auto` scheme exists only there)."""

        def wq(x: dict | None) -> WeightQuant | None:
            return None if x is None else WeightQuant(x["bits"], x["group"], Act(x["act"]), Rounding(x["rounding"]))

        fields = dict(d)
        for k in ("linear", "head", "embedding"):
            fields[k] = wq(d[k])
        fields["band"] = Band(**d["band"]) if d.get("band") else None
        fields["overrides"] = tuple((name, wq(q)) for name, q in d.get("overrides", ()))
        fields["act_residual_only"] = tuple(d.get("act_residual_only", ()))
        return cls(**fields)


def _w(bits: int, group: int | None, rounding: Rounding = Rounding.RTN, act: Act = Act.DYNAMIC_INT8) -> WeightQuant:
    return WeightQuant(bits=bits, group=group, act=act, rounding=rounding)


# The 270M's mlp.gate layers whose int4 g32 rounding costs least (`benchmarks/sensitivity.py --kinds
# mlp.gate`), put at 4 bits to fit the GGUF's size; why six, measured: docs/quantization.md.
INT4_GATES = (15, 16, 13, 8, 7, 14)

INT4 = Scheme(
    "int4",
    "mixed 4/8-bit within the 4-bit GGUF's size: one int8 table for the lookup and the head (8da8w per"
    " channel, stored once); linears whose source is Q4_K keep their integers exactly (8da4w g32 plus"
    " per-group offsets, int8 per row); attn.wq, attn.wo (the 270M's are all Q4_K) and the"
    f" {len(INT4_GATES)} least sensitive mlp.gate at int4 g32 where not, rounded by GPTQ (group scales"
    " searched; Hessians on the calibration text and 32 sequences the fp32 model samples); the rest 8da8w"
    " per channel; SmoothQuant scales folded in (group-constant where a grid is kept); mlp.down and the"
    " head take each activation row twice, x and its rounding residual (ActResidual)",
    _w(8, None),
    _w(8, None),
    _w(8, None, act=Act.FLOAT),
    Band(mean_kld=0.03, top1=0.92),
    smooth=True,
    overrides=(
        ("attn.wq", _w(4, 32, Rounding.GPTQ)),
        ("attn.wo", _w(4, 32, Rounding.GPTQ)),
        *((f"layers.{i}.mlp.gate", _w(4, 32, Rounding.GPTQ)) for i in INT4_GATES),
    ),
    shared_table=True,
    source_grids=True,
    int8_offsets=True,
    act_residual=True,
    # Eager on the 270M, golden prompts vs fp32 (mean KLD / top-1): the residual on all 154 dynamic
    # linears 0.0110 / 94.4%, on none 0.0138 / 93.7%, on mlp.down and the head only 0.0119 / 94.3%
    # at an eighth of the ops (docs/speed.md).
    act_residual_only=("mlp.down", "lm_head"),
    gptq_samples=32,
    gptq_scale_search=True,
)

SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        # fp32 artifacts differ from eager only by float rounding, which 18 layers of large activations
        # amplify: the 270M's XNNPACK .pte sits at mean KLD 1.6e-6, top-1 99.88% (1 near-tie of 841) and
        # max |dlogit| 0.028 from eager (summation order of other GEMM kernels; eager vs transformers is
        # < 1e-3). The band is what rounding cannot reach and any real lowering error does.
        Scheme("fp32", "no quantization", None, None, None, Band(max_abs_logit=0.1, mean_kld=1e-4, top1=0.99)),
        Scheme(
            "fp16",
            "fp16 weights everywhere (every linear, the head, the lookup table), fp32 compute",
            None,
            None,
            None,
            # fp32's KLD and top-1 bands: the 270M eager with fp16 weights vs fp32, golden prompts: mean KLD
            # 9.6e-7, top-1 99.88%, max |dlogit| 0.081 (so no max |dlogit| band: fp32's 0.1 has no margin).
            Band(mean_kld=1e-4, top1=0.99),
            float16=True,
        ),
        Scheme(
            "int8",
            "int8 weights with dynamic int8 activations (8da8w), each activation row quantized twice, x and its"
            " rounding residual (ActResidual: float-like activations on XNNPACK's int8 kernels); linears whose"
            " GGUF source is Q8_0 / Q5_0 keep its integers exactly as two 4-bit planes, Q4_K ones as 4-bit plus"
            " per-group offsets; the rest (Q6_K mlp.down) round-to-nearest int8 g128 on two planes; the head in"
            " 32-column slices (the Q8_0 table's own groups: exact), one int8 table stored once for it and the"
            " lookup (shared_table, model.ptd)",
            _w(8, None),
            _w(8, 32),
            _w(8, None, act=Act.FLOAT),
            Band(mean_kld=0.002, top1=0.98),  # issue 7's; the 270M .pte: 0.00034 / 99.17%
            overrides=(("mlp.down", _w(8, 128)),),
            shared_table=True,
            source_grids=True,
            source_planes=True,
            act_residual=True,
        ),
        INT4,
        replace(
            INT4,
            name="int4-2pass",
            description=INT4.description + "; the shared table as two 4-bit planes: the head scores every row"
            " from the high plane (half the bytes a token) and recomputes the 512 best exactly from both",
            head_exact_rows=512,  # the tail's cost in KLD against the rows recomputed: docs/speed.md
        ),
        Scheme(
            "int4-hqq",
            "int4 weights g32 (HQQ scale search) with dynamic int8 activations (8da4w) on every linear and"
            " the head, SmoothQuant scales folded in; int4 g32 embedding (the int4 of LiteRT bundles)",
            _w(4, 32, Rounding.HQQ),
            _w(4, 32, Rounding.HQQ),
            _w(4, 32, act=Act.FLOAT),
            None,
            smooth=True,
        ),
        Scheme(
            "int4-g128",
            "as int4-hqq with groups of 128: smaller scales overhead, more rounding error",
            _w(4, 128, Rounding.HQQ),
            _w(4, 128, Rounding.HQQ),
            _w(4, 128, act=Act.FLOAT),
            None,  # a size lever on the frontier: measured 0.64 (270M), far from the int4 band
            smooth=True,
        ),
        # Weight-only schemes: float activations, for ONNX (and CoreML, which lowers them but is offered in
        # fp32 only: coremltools cannot take dynamic activation quantization, KeyError torch.int8). XNNPACK
        # must never get them: its partitioner drops the weight scales of weight-only linears (wrong logits).
        # Bands: not yet measured.
        Scheme(
            "int8-wo",
            "int8 weight-only per output channel on linears, head and embedding (ONNX; tied table stored once)",
            _w(8, None, act=Act.FLOAT),
            _w(8, None, act=Act.FLOAT),
            _w(8, None, act=Act.FLOAT),
            None,
        ),
        Scheme(
            "int4-wo",
            "int4 g32 weight-only (HQQ scale search) on linears, head and embedding (ONNX)",
            _w(4, 32, Rounding.HQQ, Act.FLOAT),
            _w(4, 32, Rounding.HQQ, Act.FLOAT),
            _w(4, 32, Rounding.HQQ, Act.FLOAT),
            None,
        ),
        Scheme(
            "rtn-int8",
            "baseline: round-to-nearest int8 per output channel, dynamic int8 activations, int8 per-row embedding",
            _w(8, None),
            _w(8, None),
            _w(8, None, act=Act.FLOAT),
            None,
        ),
        Scheme(
            "rtn-int4",
            "baseline: round-to-nearest int4 g32, dynamic int8 activations, int4 g32 embedding",
            _w(4, 32),
            _w(4, 32),
            _w(4, 32, act=Act.FLOAT),
            None,
        ),
    )
}


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise EdgeError(f"unknown quantization scheme {name!r}", hint=f"choose one of: {', '.join(SCHEMES)}")
    return SCHEMES[name]
