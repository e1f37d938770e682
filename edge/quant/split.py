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
ExecuTorch's to_edge. So the int8 scheme splits only the two most sensitive sites (leave-one-out:
keeping mlp.down in fp32 cut KLD 0.0058 -> 0.0032, the head -> 0.0041, any other site <= 0.0048):
head g64 + mlp.down g128 gave eager 0.0025, lowered 0.0026 / top-1 96.6%, with export peak RSS
4.9 GB, .pte 463 -> 474 MB and decode 53.6 -> 49.5 tok/s (2 threads, same run).
"""

from __future__ import annotations

import torch
from torch import nn

# Slices per linear at most: the graph grows with every slice (see above), so wide linears of
# bigger models get wider slices -- the smallest multiple of the scheme's group that keeps the
# count within this (2B: head 2304 / 64 -> 12 slices of 192, mlp.down 9216 / 128 -> 12 of 768).
MAX_SLICES = 16


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        out = self.parts[0](x[..., :g])
        for i in range(1, len(self.parts)):
            out = out + self.parts[i](x[..., i * g : (i + 1) * g])
        return out


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
        return torch.cat([p(tokens) for p in self.parts], dim=-1)


def split_linears(model: nn.Module, names: set[str], group: int) -> None:
    """Replace each named nn.Linear of `model` by a ColumnSplitLinear (frees the full weight)."""
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if name in names and isinstance(child, nn.Linear):
                setattr(parent, child_name, ColumnSplitLinear(child, group))
