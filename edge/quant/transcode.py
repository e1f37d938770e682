"""Source-grid transcoding: a GGUF tensor read back as the integers and scales it was stored with.

A GGUF's weights already sit on low-bit grids (the 270M's: Q8_0 embedding, Q5_0 / Q8_0 q, k, v,
gate, up; Q4_K wo and half the mlp.down; Q6_K the other half). The fp32 reference IS these grids,
dequantized. Where a backend's format holds a tensor's grid, keeping it there loses nothing to
rounding; re-quantizing the dequantized values onto a new grid loses what RTN loses.

`read_grid` decodes the blocks with gguf-py's own unpacking arithmetic (gguf.quants), so that
`Grid.dequantize()` equals `GGUFFile.dequantize()` bit for bit (tests/test_transcode.py):

    Q8_0  w = d * q               q in [-128, 127], one fp16 d per 32
    Q5_0  w = d * q               q in [-16, 15],   one fp16 d per 32
    Q4_K  w = s * q - m           q in [0, 15],     s = d * sc, m = dmin * mn per 32 (6-bit sc, mn)
    Q6_K  w = s * q               q in [-32, 31],   s = d * sc per 16 (int8 sc)

Q4_K is asymmetric; XNNPACK's 4-bit kernels are symmetric (zero point 8, no offset). So a Q4_K
tensor is held as q - 8 in [-8, 7] with scale s, plus a per-group offset c = 8 s - m:
W x = sum_g s_g (q_g - 8) x_g + c_g * sum(x_g) -- a 4-bit linear and a small fp32 linear over
the inputs' group means (edge/quant/split.py, OffsetLinear). What the format cannot hold exactly:
XNNPACK stores group scales in bfloat16 (8 significant bits) where Q4_K's s = d * sc has up to
17, a relative scale error <= 2^-9: on the 270M's Q4_K tensors the held weights differ from the
source by a relative RMS of 1.6e-3 (the offsets, fp32, absorb the mean of that error per group).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf.quants import Q4_K

from edge.models.weights.gguf import GGUFFile


@dataclass
class Grid:
    """w = scale * q (+ offset), per group of `group` input columns. Shapes (rows, cols), (rows, cols / group)."""

    kind: str  # the GGUF type it was read from
    q: torch.Tensor  # int8
    scale: torch.Tensor  # float32
    group: int
    bits: int  # the range q spans: [-2^(bits-1), 2^(bits-1) - 1]
    minimum: torch.Tensor | None = None  # float32, Q4_K only: w = scale * (q + 8) - minimum

    @property
    def offset(self) -> torch.Tensor | None:
        """Q4_K: the per-group constant c with w = scale * q + c (q shifted to [-8, 7])."""
        return None if self.minimum is None else 8.0 * self.scale - self.minimum

    def dequantize(self) -> torch.Tensor:
        """The source's float32 values, computed in gguf-py's order (bit-identical to GGUFFile.dequantize)."""
        rows, cols = self.q.shape
        g = self.q.float().reshape(rows, -1, self.group)
        if self.minimum is None:
            return (self.scale[..., None] * g).reshape(rows, cols)
        return (self.scale[..., None] * (g + 8.0) - self.minimum[..., None]).reshape(rows, cols)


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)


BLOCK_BYTES = {"Q8_0": 34, "Q5_0": 22, "Q4_K": 144, "Q6_K": 210}
TRANSCODABLE = tuple(BLOCK_BYTES)


def read_grid(f: GGUFFile, name: str) -> Grid | None:
    """The grid of GGUF tensor `name` (2-D), or None when its type is not one of TRANSCODABLE."""
    t = f.tensors[name]
    if t.ggml_type.name not in TRANSCODABLE or len(t.shape) != 2:
        return None
    return decode(t.ggml_type.name, f.raw(name)[1], *t.shape)


def decode(kind: str, raw: np.ndarray, rows: int, cols: int) -> Grid:
    """A (rows, cols) tensor's grid from its GGUF blocks (uint8, rows * cols / block elements * block bytes)."""
    b = np.ascontiguousarray(raw).reshape(-1, BLOCK_BYTES[kind])
    if kind == "Q8_0":
        d, q = _f16(b[:, :2]), b[:, 2:].copy().view(np.int8)
        return _grid(kind, q, d, rows, cols, 32, 8)
    if kind == "Q5_0":
        d = _f16(b[:, :2])
        qh = b[:, 2:6].copy().view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32).reshape(1, 32)
        ql = b[:, 6:].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)
        ql = (ql & np.uint8(0x0F)).reshape(-1, 32)
        q = (ql | ((qh & np.uint32(1)).astype(np.uint8) << np.uint8(4))).astype(np.int8) - np.int8(16)
        return _grid(kind, q, d, rows, cols, 32, 5)
    if kind == "Q4_K":
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = Q4_K.get_scale_min(b[:, 4:16])
        s = d * sc.astype(np.float32)  # (blocks, 8): gguf-py's products, bit for bit
        m = dmin * mn.astype(np.float32)
        qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & np.uint8(0x0F)).reshape(-1, 8, 32).astype(np.int8) - np.int8(8)
        grid = _grid(kind, q, s, rows, cols, 32, 4)
        grid.minimum = torch.from_numpy(np.ascontiguousarray(m).reshape(rows, cols // 32))
        return grid
    if kind != "Q6_K":
        raise ValueError(f"no transcoding for {kind}; choose from {TRANSCODABLE}")
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208].copy().view(np.int8), _f16(b[:, 208:210])
    s = d * sc.astype(np.float32)  # (blocks, 16)
    ql = ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & np.uint8(0x0F)).reshape(-1, 8, 32)
    qh = qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(0x03)).reshape(-1, 8, 32)
    q = (ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)
    return _grid(kind, q, s, rows, cols, 16, 6)


def _grid(kind: str, q: np.ndarray, scale: np.ndarray, rows: int, cols: int, group: int, bits: int) -> Grid:
    return Grid(
        kind,
        torch.from_numpy(np.ascontiguousarray(q).reshape(rows, cols)),
        torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(rows, cols // group)),
        group,
        bits,
    )


def grids_for(loaded, scheme) -> dict[str, Grid] | None:
    """The source grids a scheme keeps (Scheme.source_grids), for weights loaded from a GGUF; else None."""
    if not (scheme.source_grids or scheme.source_planes) or loaded.gguf_path is None:
        return None
    kinds = (("Q4_K",) if scheme.source_grids else ()) + (PLANE_KINDS if scheme.source_planes else ())
    return source_grids(loaded.gguf_path, kinds=kinds)


def source_grids(gguf_path, names: set[str] | None = None, kinds: tuple[str, ...] = ("Q4_K",)) -> dict[str, Grid]:
    """Our linear name -> its Grid, for the GGUF's 2-D weights of the given kinds (default: Q4_K).

    Only Q4_K by default: it is the one grid a quantized scheme here stores exactly at fewer bits
    than 8. Q8_0 / Q5_0 need int8 groups of 32, which XNNPACK holds only as two 4-bit planes
    (to_plane_linear, Scheme.source_planes); Q6_K's groups of 16 it cannot hold (qb4w needs groups
    of a multiple of 32).
    """
    from edge.models.weights.gguf import gguf_to_ours

    f = GGUFFile(gguf_path)
    out = {}
    for g, t in f.tensors.items():
        ours = gguf_to_ours(g)
        if ours is None or t.ggml_type.name not in kinds or not ours[0].endswith(".weight"):
            continue
        name = ours[0].removesuffix(".weight")
        if names is None or name in names:
            grid = read_grid(f, g)
            if grid is not None:
                out[name] = grid
    return out


def group_factors(grid: Grid, current: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """f (rows, groups) with current = f * grid, per group: what SmoothQuant folded into this weight.

    Folds scale a weight's rows (a producer's 1/s) and its columns (a consumer's s, constant within
    each group where a grid is kept: smooth()'s group_sites): both are one factor per (row, group),
    which moves into the group's scale and minimum, and the integers stay the source's. Raises when
    `current` is not the grid so scaled (a fold that breaks the grid).
    """
    rows, cols = grid.q.shape
    src = grid.dequantize().double().reshape(rows, -1, grid.group)
    cur = current.detach().double().reshape(rows, -1, grid.group)
    den = (src * src).sum(-1)
    f = torch.where(den > 0, (cur * src).sum(-1) / den.clamp(min=1e-300), torch.ones_like(den))
    err = (cur - f[..., None] * src).norm() / cur.norm().clamp(min=1e-300)
    if err > rtol:
        raise ValueError(f"{grid.kind}: the weight is not its source grid scaled per group (rel. error {err:.1e})")
    return f


def to_offset_linear(grid: Grid, current: torch.Tensor | None = None, act_slice: int | None = None):
    """An OffsetLinear (edge/quant/split.py) holding an asymmetric 4-bit grid on XNNPACK's 8da4w kernel.

    current: the model's fp32 copy of this weight after folds (SmoothQuant); their per-group factors
    (group_factors) move into the group scales, so the grid stays exact. The group scales are rounded
    to bf16 as XNNPACK stores them; the offsets absorb the mean of that rounding error over each group
    (least squares over the group's q).

    act_slice: split the main 8da4w linear into column slices of this many inputs (a multiple of the
    group), so that each slice's activations get their own dynamic scale (Scheme.source_act_slice).
    """
    from edge.quant.split import OffsetLinear

    if grid.minimum is None or grid.bits != 4:
        raise ValueError(f"{grid.kind}: only asymmetric 4-bit grids (Q4_K) become an OffsetLinear")
    rows, cols = grid.q.shape
    scale, minimum = grid.scale.double(), grid.minimum.double()
    if current is not None:
        f = group_factors(grid, current)
        scale, minimum = scale * f, minimum * f
    q = grid.q.double().reshape(rows, -1, grid.group)
    # XNNPACK takes positive group scales only (see to_plane_linear). ggml's Q4_K scales are, but a fold
    # or another writer may not: s (q + 8) = (-s)(15 - (q + 8)) + 15 s, so a group with s < 0 stores
    # q' = -1 - q (still in [-8, 7]) and m' = m - 15 s; a group of s = 0 stores s = 1, q = -8 (w = -m).
    neg, zero = scale < 0, scale == 0
    q = torch.where(zero[..., None], -8.0, torch.where(neg[..., None], -1.0 - q, q))
    minimum = torch.where(neg, minimum - 15.0 * scale, minimum)
    scale = torch.where(zero, 1.0, scale.abs())
    s16 = scale.to(torch.bfloat16).double()
    offset = 8.0 * scale - minimum + (scale - s16) * q.mean(-1)
    return OffsetLinear(_four_bit_linear(q, s16, act_slice), offset.float(), grid.group)


def _four_bit_linear(q: torch.Tensor, s16: torch.Tensor, act_slice: int | None):
    """An 8da4w linear holding s16 * q, q (rows, groups, group) in [-8, 7] and s16 (rows, groups) bf16
    values; with act_slice, as column slices of that many inputs (each slice its own activation scale)."""
    from torch import nn

    from edge.quant.apply import install_intx
    from edge.quant.split import ColumnSplitLinear

    rows, groups, group = q.shape
    cols = groups * group
    lin = nn.Linear(cols, rows, bias=False, device="meta")
    lin.weight = nn.Parameter((s16[..., None] * q.double()).reshape(rows, cols).float(), requires_grad=False)
    if act_slice and act_slice < cols:
        if act_slice % group or cols % act_slice:
            raise ValueError(f"act_slice {act_slice} must divide {cols} in multiples of the group {group}")
        lin, per = ColumnSplitLinear(lin, act_slice), act_slice // group
        for i, part in enumerate(lin.parts):
            install_intx(part, bits=4, group=group, scale=s16[:, i * per : (i + 1) * per].float().contiguous())
    else:
        install_intx(lin, bits=4, group=group, scale=s16.float())
    return lin


PLANE_KINDS = ("Q8_0", "Q5_0")  # symmetric grids in groups of 32 that two 4-bit planes hold exactly


def rtn_grid(w: torch.Tensor, group: int) -> Grid:
    """Round-to-nearest int8 in groups of `group` (symmetric, absmax scale): a grid for weights with no
    source grid a plane linear can hold (not from a GGUF, or a Q6_K, whose groups of 16 it cannot)."""
    rows, cols = w.shape
    g = w.detach().double().reshape(rows, -1, group)
    scale = (g.abs().amax(-1) / 127).clamp(min=1e-12)
    q = torch.round(g / scale[..., None]).clamp(-128, 127).to(torch.int8).reshape(rows, cols)
    return Grid("rtn", q, scale.float(), group, 8)


def to_plane_linear(grid: Grid, current: torch.Tensor | None = None, act_slice: int | None = None):
    """An OffsetLinear over a PlaneSum (edge/quant/split.py): a symmetric int8 grid in groups of 32
    held as two 4-bit planes, q = 16 h + l + 8 with h, l in [-8, 7], on XNNPACK's 8da4w kernel.

    As in to_offset_linear: folds (current) move into the group scales, the scales are rounded to
    bf16 as XNNPACK stores them (16 s is then bf16 too), and the offsets (8 s per group) also absorb
    the mean of the bf16 rounding error over each group. The integers are the grid's own.
    """
    from edge.quant.split import OffsetLinear, PlaneSum

    if grid.minimum is not None or grid.group % 32:
        raise ValueError(f"{grid.kind}: plane linears hold symmetric grids in groups of a multiple of 32")
    rows, _ = grid.q.shape
    scale = grid.scale.double()
    if current is not None:
        scale = scale * group_factors(grid, current)
    q = grid.q.long().reshape(rows, -1, grid.group)
    # XNNPACK refuses a blockwise scale that is not positive (xnn_define_blockwise_quantized_tensor_value
    # -> xnn_status_invalid_parameter: the .pte fails to load, "Failed to define tensor"). ggml writes
    # Q5_0 (and Q6_K) with d = max / -16, signed: half the 270M's Q5_0 groups have d < 0. s q = (-s)(-q),
    # so those groups flip both; a group of zeros (s = 0) becomes s = 1, q = 0.
    sign = torch.where(scale < 0, -1, 1)
    q = torch.where((scale == 0)[..., None], 0, q * sign[..., None])
    scale = torch.where(scale == 0, 1.0, scale.abs())
    if int(q.min()) < -128 or int(q.max()) > 127:  # q - 8 = 16 h + l, h and l in [-8, 7]
        raise ValueError(f"{grid.kind}: integers outside int8 once the scales are made positive (a -128 under d < 0)")
    s16 = scale.to(torch.bfloat16).double()
    lo = torch.remainder(q, 16) - 8  # q - 8 = 16 hi + lo
    hi = (q - 8 - lo) // 16
    assert int(hi.min()) >= -8 and int(hi.max()) <= 7
    offset = 8.0 * scale + (scale - s16) * (q - 8).double().mean(-1)
    planes = [_four_bit_linear(hi, 16.0 * s16, act_slice), _four_bit_linear(lo, s16, act_slice)]
    return OffsetLinear(PlaneSum(*planes), offset.float(), grid.group)
