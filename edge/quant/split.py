"""Grouped int8 linears for a backend that has only per-channel int8 kernels: split the columns.

XNNPACK runs 8-bit weights only per output channel (executorch
backends/xnnpack/operators/node_visitor.py, get_per_channel_dtype: "Only 4-bit per channel group
quantization is supported"). One scale per row of 640 or 2048 inputs is coarse once SmoothQuant
has moved activation outliers into weight columns, and a per-token activation scale over the
whole row is coarse too. Splitting a linear's input axis into slices of `group` columns and
summing the slices' outputs computes the same product; each slice is an ordinary linear, so
8da8w per channel on a slice IS 8da8w with groups of `group` -- for the weights (one scale per
row per slice) and for the activations (one dynamic scale per token per slice) -- and it lowers
to XNNPACK's stock qd8-f32-qc8w kernels, each slice exactly (tests/test_export_executorch.py).

Measured on the 270M, eager, golden prompts vs fp32, SmoothQuant on (mean KLD / top-1):
per-channel 0.0058 / 95.8%, slices of 256 0.0029 / 95.8%, 128 0.0021 / 96.0%, 64 0.0015 / 96.3%.
Slices cost graph size: 64-column slices everywhere (~1700 linears) ran out of 24 GB in
ExecuTorch's to_edge. So slices serve the weights' groups only where a grid must be matched: the
int8 scheme's head (the Q8_0 table's groups of 32) and its Q6_K mlp.down (128). The activations'
rounding is taken away by ActResidual instead (below), which slices only reduced (head g64 +
mlp.down g128 with per-slice activation scales and SmoothQuant: eager 0.0025 / top-1 96.6%).
"""

from __future__ import annotations

import torch
from torch import nn

from edge.models.gemma import lookup

# Slices per linear at most: the graph grows with every slice (see above), so wide linears of
# bigger models get wider slices -- the smallest multiple of the scheme's group that keeps the
# count within this (2B: head 2304 / 32 -> 18 slices of 128, mlp.down 9216 / 128 -> 18 of 512).
MAX_SLICES = 20  # the 270M's head in the Q8_0 table's groups of 32: 640 / 32


def slice_width(in_features: int, group: int, max_slices: int = MAX_SLICES) -> int:
    """The scheme's group, widened to a multiple of it that divides in_features into <= max_slices."""
    for width in range(group, in_features + 1, group):
        if in_features % width == 0 and in_features // width <= max_slices:
            return width
    return in_features


class ColumnSplitLinear(nn.Module):
    """y = sum_i parts[i](x[..., i*g:(i+1)*g]); the parts are plain nn.Linear (bias-free)."""

    def __init__(self, linear: nn.Linear, group: int) -> None:
        super().__init__()
        if linear.bias is not None or linear.in_features % group:
            raise ValueError(f"cannot split {linear}: needs no bias and in_features divisible by {group}")
        self.group = group
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.parts = nn.ModuleList()
        for a in range(0, self.in_features, group):
            part = nn.Linear(group, self.out_features, bias=False, device="meta")
            part.weight = nn.Parameter(w[:, a : a + group].contiguous(), requires_grad=False)
            self.parts.append(part)

    @property
    def weight(self) -> torch.Tensor:  # the model reads dtypes from it
        return self.parts[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        out = self.parts[0](x[..., :g])
        for i in range(1, len(self.parts)):
            out = out + self.parts[i](x[..., i * g : (i + 1) * g])
        return out


class PlaneSum(nn.Module):
    """y = hi(x) + lo(x): an 8-bit grouped weight held as two 4-bit planes on XNNPACK's 8da4w kernel.

    XNNPACK has no grouped int8 kernel but a grouped 4-bit one (qb4w, groups of a multiple of 32).
    An int8 q in [-128, 127] is 16 h + l + 8 with h, l in [-8, 7], so s * q per group is
    (16 s) * h + s * l plus the per-group constant 8 s (an OffsetLinear's offset): `hi` holds h with
    scales 16 s, `lo` holds l with scales s (edge/quant/transcode.py, to_plane_linear). Two 4-bit
    GEMMs read as many weight bytes as one int8 GEMM, with group scales instead of one per row.

    What it buys the 270M's int8 (eager, golden prompts vs fp32, mean KLD / top-1; the int8 scheme before ActResidual:
    0.0029 / 96.6%): the Q8_0 / Q5_0 / Q4_K sources held exactly give 0.0100 / 93.3%, because a kept
    grid allows SmoothQuant only group-constant factors, and without per-column smoothing the dynamic
    int8 activations dominate (no SmoothQuant at all: 0.0090 / 95.6%). RTN int8 g32 planes on fully
    smoothed weights: 0.0036 / 96.9%; with each plane's activations scaled per 128 inputs 0.0019 /
    97.2%, as column slices of 64 alone give (0.0019 / 97.2%). With the activations' rounding taken
    away (ActResidual), the exact grids pay: the int8 scheme holds its Q8_0 / Q5_0 linears on planes.
    """

    def __init__(self, hi: nn.Linear, lo: nn.Linear) -> None:
        super().__init__()
        self.hi, self.lo = hi, lo
        self.in_features, self.out_features = hi.in_features, hi.out_features

    @property
    def weight(self) -> torch.Tensor:  # the model reads dtypes from it
        return self.hi.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hi(x) + self.lo(x)


class ColumnSplitEmbedding(nn.Module):
    """A lookup over the column slices of a (tied) head: row t = cat_i parts[i].weight[t].

    Its parts hold the very tensors of the head's parts, so that once both are quantized per row
    (int8 lookup rows; 8da8w head slices, one scale per output channel) they are byte-identical
    and an export stores each slice once (edge/quant/schemes.py, Scheme.shared_table).
    """

    def __init__(self, head: ColumnSplitLinear) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.parts = nn.ModuleList()
        for lin in head.parts:
            part = nn.Embedding(lin.out_features, lin.in_features, device="meta")
            part.weight = nn.Parameter(lin.weight.detach(), requires_grad=False)
            self.parts.append(part)

    @property
    def weight(self) -> torch.Tensor:  # the model reads the table's dtype from it
        return self.parts[0].weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([lookup(p, tokens) for p in self.parts], dim=-1)


def split_linears(model: nn.Module, names: set[str], group: int) -> None:
    """Replace each named nn.Linear of `model` by a ColumnSplitLinear (frees the full weight)."""
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if name in names and isinstance(child, nn.Linear):
                setattr(parent, child_name, ColumnSplitLinear(child, group))


class OffsetLinear(nn.Module):
    """y = main(x) + offset(group means of x): an asymmetric grouped weight on a symmetric 4-bit kernel.

    A weight w = s * q + c per group of `group` input columns (a Q4_K grid held as q - 8, with
    c = 8 s - m; edge/quant/transcode.py) gives W x = sum_g s_g q_g . x_g + c_g * sum(x_g): `main`
    holds s * q (8da4w, exact on its grid), `offset` is an fp32 linear (in / group -> out) holding
    c * group, applied to the group means (`offsets` gives c back; group is a power of two, so both
    products are exact). Means, not sums: XNNPACK has no sum, but its global average pooling takes
    mean.dim over the last two dims of a 4-D tensor, so the whole OffsetLinear is one delegate. The
    sums ran outside it (sum.IntList), which cut the delegate at every such linear: 117 cuts in the
    270M int8, and ExecuTorch copies the whole graph per delegate it creates (lowering time, RSS).

    The 270M's 27 Q4_K linears carry 0.74M offsets, 2.9 MB in fp32, which left the int4 bundle 0.5 MB
    over the GGUF's size: schemes that need the bytes store them in int8 (`int8_offsets`). Not fp16:
    ExecuTorch's const-prop (ExecutorchBackendConfig do_quant_fusion_and_const_prop, which the
    embedding fusion needs) folds the fp16 -> fp32 cast of a constant back into an fp32 constant
    (measured, 253,726,480 bytes with fp16 vs 253,710,736 with fp32), and an fp16 matmul would need
    casts that XNNPACK's partitioner refuses (ToDimOrderCopyConfig: no dtype conversion).
    """

    def __init__(self, main: nn.Linear | ColumnSplitLinear | PlaneSum, offset: torch.Tensor, group: int) -> None:
        super().__init__()
        if main.in_features != offset.shape[1] * group or main.out_features != offset.shape[0]:
            raise ValueError(f"offset {tuple(offset.shape)} does not fit {main} with groups of {group}")
        if group & (group - 1):
            raise ValueError(f"group {group} is not a power of two (offset * group would round)")
        self.group = group
        self.in_features, self.out_features = main.in_features, main.out_features
        self.main = main
        self.offset = nn.Linear(offset.shape[1], offset.shape[0], bias=False, device="meta")
        self.offset.weight = nn.Parameter((offset * group).contiguous(), requires_grad=False)

    @property
    def offsets(self) -> torch.Tensor:
        """c, per (output, group): the weight is main's plus c on every column of its group."""
        return self.offset.weight.dequantize() / self.group

    def int8_offsets(self, residual: bool = True) -> None:
        """Store the offsets as int8 per output row: a quarter of fp32's bytes, at one int8 rounding
        of c. The linear is 8da8w (XNNPACK has no int8-weight / float-activation linear, see
        ActResidual); with `residual` its group means are taken in two rows by ActResidual. Few MACs
        either way (in / group per output), but the residual is ~29 small ops a step: on the 270M int4
        without it the means' int8 rounding added mean KLD 0.0003 (eager, golden prompts).
        """
        from edge.quant.apply import install_intx
        from edge.quant.transcode import rtn_grid

        # One group per row; its scales are positive (clamped), as XNNPACK requires, a row of zeros too.
        grid = rtn_grid(self.offset.weight, self.offset.in_features)
        self.offset.weight = nn.Parameter(grid.q.float() * grid.scale, requires_grad=False)
        install_intx(self.offset, bits=8, group=None, scale=grid.scale)
        if residual:
            self.offset = ActResidual(self.offset)

    @property
    def weight(self) -> torch.Tensor:  # the model reads dtypes from it
        return self.main.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.in_features // self.group
        means = x.reshape(-1, n, self.group, 1).mean(dim=(-1, -2), keepdim=True).reshape(*x.shape[:-1], n)
        return self.main(x) + self.offset(means)


class ActResidual(nn.Module):
    """y = lin(x) + lin(x - fq(x)): a dynamic-int8 linear whose activations lose ~nothing to rounding.

    `lin` quantizes each token's activations to int8 (one scale per row, or per slice of `group`
    inputs for a ColumnSplitLinear; XNNPACK's qd8, torchao in eager); fq(x) is that very rounding
    (`rounded`: torchao's and XNNPACK's but on exact ties and 1-ulp quotients), so
    r = x - fq(x) is what it loses, and lin(r) quantizes r on its own ~255x finer scale. Both rows go
    through ONE call, stacked on a new axis (..., 2, in): for a decode step the weights are read once
    for two rows, so memory-bound decode costs about the same; prefill does twice the MACs. The rows
    are summed by a constant (1, 2) linear (XNNPACK has no sum).

    Why not float activations instead: ExecuTorch's XNNPACK backend has no int8-weight / fp32-activation
    path. A torchao weight-only linear is split by the partitioner into permute + mm, and
    ConvertToLinearPass (executorch backends/xnnpack/_passes/convert_to_linear.py, find()) walks past
    the dequantize_affine to the int8 placeholder and drops it: the delegate multiplies by the raw
    integers, cast to fp32 (measured: outputs exactly x @ q^T, 1/scale too large; executorch 1.5.1).

    Measured on one 640 -> 512 8da8w linear with 5 outlier inputs (x30): error vs the exact-activation
    product 2.8e-2 plain, 1.1e-4 with the residual; the XNNPACK artifact equals eager to 3e-7.
    """

    def __init__(self, lin: nn.Module, group: int | None = None) -> None:
        super().__init__()
        self.lin, self.group = lin, group
        self.in_features, self.out_features = lin.in_features, lin.out_features
        for name, value in self.constants().items():
            self.register_buffer(name, value, persistent=False)

    def constants(self) -> dict[str, torch.Tensor]:
        return {"pair_sum": torch.ones(1, 2, device="cpu")}

    @property
    def weight(self) -> torch.Tensor:  # the model reads dtypes from it
        return self.lin.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # (tokens, 2, in) into the linear: Vulkan's quantized-linear fusion (executorch 1.5.1) takes the view
        # after the matmul for its output's shape, so the view must restore the input's own leading dims.
        rows = self.lin(torch.stack([x, x - self.rounded(x)], dim=-2).reshape(-1, 2, self.in_features))
        rows = rows.transpose(1, 2).reshape(-1, 2)  # (tokens * out, 2)
        # a 2-D linear: on the 3-D transpose it was a batched matmul over an expanded (1, 2) weight
        return torch.nn.functional.linear(rows, self.pair_sum.to(rows.dtype)).view(*lead, self.out_features)

    def rounded(self, x: torch.Tensor) -> torch.Tensor:
        """x as `lin` sees it: per token (per slice of `group`), asymmetric int8, dequantized.

        The zero point cancels: (clamp(round(x / s) + zp) - zp) * s is round(x / s) * s whenever the clamp
        is idle, which it is for every x in [min, max] of its row (s = (max - min) / 255 with 0 in the
        range); so the zero point is never computed. Written in ops that XNNPACK takes, so the whole
        residual stays inside the delegate, and in as few as can be: each is a kernel call per linear per
        step (an 8da8w ActResidual exports to 29 graph nodes, 38 with the zero point computed). max over
        dim 3 of a 4-D view (XNNPACK's max.dim: 4-D, dim 2 or 3, keepdim),
        round as floor(v + 0.5) and x / scale: torchao's round-half-even of x * (1 / scale) but on exact
        ties and 1-ulp quotients, where the residual then carries one step at that element (rare; what
        fake_quant_act in edge/quant/smooth.py computes exactly).
        """
        shape, g = x.shape, self.group or self.in_features
        x4 = x.reshape(-1, 1, self.in_features // g, g)  # (tokens, 1, slices, g)
        hi = torch.max(x4, dim=3, keepdim=True)[0].clamp(min=0)
        neg_lo = torch.max(-x4, dim=3, keepdim=True)[0].clamp(min=0)  # -min(x, 0)
        scale = ((hi + neg_lo) / 255).clamp(min=torch.finfo(torch.float32).smallest_normal)
        return (torch.floor(x4 / scale + 0.5) * scale).reshape(shape)


def _dynamic(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) and getattr(mod.weight, "activation_quantization", None) is not None


def _act_group(mod: nn.Module) -> tuple[bool, int | None]:
    """(whether `mod` quantizes all of its input dynamically, per row or per slice of how many inputs)."""
    if _dynamic(mod):
        return True, None
    if isinstance(mod, ColumnSplitLinear) and all(_dynamic(p) for p in mod.parts):
        return True, mod.group
    if isinstance(mod, PlaneSum):
        (a, ga), (b, gb) = _act_group(mod.hi), _act_group(mod.lo)
        return a and b and ga == gb, ga
    return False, None


def wrap_act_residual(model: nn.Module, prefix: str = "", only: tuple[str, ...] = ()) -> list[str]:
    """Wrap every module that quantizes its whole input dynamically (an 8da linear, a ColumnSplitLinear
    or PlaneSum of them) in one ActResidual, outermost first; returns the wrapped modules' names.

    only: wrap just the modules whose name holds one of these dotted parts ("mlp.down" matches
    "layers.3.mlp.down" and "layers.3.mlp.down.main"); empty: all."""
    wrapped = []
    for name, child in list(model.named_children()):
        full = f"{prefix}{name}"
        if isinstance(child, ActResidual):
            continue
        ok, group = _act_group(child)
        if ok:
            if not only or any(f".{s}." in f".{full}." for s in only):
                setattr(model, name, ActResidual(child, group))
                wrapped.append(full)
        else:
            wrapped += wrap_act_residual(child, full + ".", only)
    return wrapped
