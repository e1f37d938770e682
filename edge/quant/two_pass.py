"""A head that reads half its table a token: the shared int8 table as two 4-bit planes, scored in two passes.

The table's integers q (one scale s per row, shared by the lookup and the head) are stored as two
planes of nibbles, q + 128 = 16 H + L. The head scores every row from H alone, through a 4-bit
per-channel linear (XNNPACK's 4-bit kernel reads at the bandwidth: half the int8 table's time), with
L replaced by its row's mean; then it recomputes the `rows` best of those scores
exactly, s (x . q) with x in fp32, and writes them back. Every other row keeps its estimate.
The lookup reads both planes of the rows it needs. The planes' bytes are those of XNNPACK's 4-bit
serialization (node_visitor.py, convert_to_qc4w: (v_odd + 8) << 4 | (v_even + 8)), so the external
weights file, which keeps each byte string once, holds the high plane once for both.
What the estimated tail costs in accuracy, and the head's kernels timed: docs/speed.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 16  # rows per block of the exact top-k's first stage


def _pack(n: torch.Tensor) -> torch.Tensor:
    """(V, D) nibbles 0..15 -> (V, D / 2) bytes, the even column in the low nibble (XNNPACK's qc4w order)."""
    n = n.to(torch.uint8)
    return n[:, 0::2] | (n[:, 1::2] << 4)


def _unpack(b: torch.Tensor) -> torch.Tensor:
    """(..., D / 2) bytes -> (..., D) nibbles as floats: the lowering runs this as float ops, no bit ops."""
    f = b.float()
    odd = torch.floor(f / 16)
    return torch.stack([f - 16 * odd, odd], dim=-1).flatten(-2)


def top_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest columns of (N, V) scores, exactly, in two small top-k's instead of one over V.

    Each block of BLOCK columns holding one of the k best has a maximum among the k best block maxima,
    so the k best columns are among those blocks' k * BLOCK columns."""
    n, v = scores.shape
    if v % BLOCK or k * BLOCK > v:
        return scores.topk(k, dim=-1).indices
    blocks = scores.view(n, v // BLOCK, BLOCK)
    best = blocks.amax(-1).topk(k, dim=-1).indices  # (N, k)
    within = torch.gather(blocks, 1, best.unsqueeze(-1).expand(n, k, BLOCK)).reshape(n, k * BLOCK)
    pick = within.topk(k, dim=-1).indices  # (N, k) into k * BLOCK
    return torch.gather(best, 1, pick // BLOCK) * BLOCK + pick % BLOCK


class Planes(nn.Module):
    """The shared table as its two nibble planes and per-row scales (buffers of the head, read by both)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        u = q.to(torch.int16) + 128
        self.register_buffer("high", _pack(u >> 4))
        self.register_buffer("low", _pack(u & 15))
        self.register_buffer("scale", scale.reshape(-1).float().contiguous())

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The integers q of rows `ids` (any shape), as floats (..., D).

        An embedding, not `plane[ids]`: ExecuTorch's portable index.Tensor gathers element by element, its
        embedding kernel copies whole rows (~100x faster here: docs/speed.md)."""
        return 16 * _unpack(F.embedding(ids, self.high)) + _unpack(F.embedding(ids, self.low)) - 128

    def dot(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x . q_r for the rows `ids` (N, K) and x (N, D), without unpacking the rows to (N, K, D).

        A byte f holds an even column's nibble e and the next one's o, f = e + 16 o: so x_e e + x_o o =
        x_e f + (x_o - 16 x_e) o, with o = floor(f / 16); both planes at once, 16 H + L, then the 128."""
        fh, fl = F.embedding(ids, self.high).float(), F.embedding(ids, self.low).float()  # (N, K, D / 2)
        even = 16 * fh + fl
        odd = 16 * torch.floor(fh / 16) + torch.floor(fl / 16)
        xe, xo = x[:, 0::2].unsqueeze(1), x[:, 1::2].unsqueeze(1)
        return (even * xe).sum(-1) + (odd * (xo - 16 * xe)).sum(-1) - 128 * x.sum(-1, keepdim=True)


class PlaneLookup(nn.Module):
    """The embedding lookup over the head's planes: row t = s_t * q_t (what the int8 lookup read)."""

    def __init__(self, planes: Planes) -> None:
        super().__init__()
        self.planes = planes

    @property
    def weight(self) -> torch.Tensor:  # the model reads the table's dtype from it
        return self.planes.scale

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.planes.rows(tokens) * self.planes.scale[tokens].unsqueeze(-1)


class TwoPassHead(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, rows: int) -> None:
        from edge.quant.apply import install_intx

        super().__init__()
        out_f, in_f = q.shape
        self.in_features, self.out_features = in_f, out_f
        self.exact_rows = min(rows, out_f)  # a vocabulary under 512 rows (a tiny test model): every row exact
        self.planes = Planes(q, scale)
        u = q.to(torch.int16) + 128  # 16 H + L
        # bf16, as the .pte stores them: XNNPACK takes a 4-bit per-channel linear as one group of the whole row
        # (qb4w, bf16 scales; executorch backends/xnnpack/operators/quant_params.py, "int4 case need more fixes")
        s16 = (16 * scale.reshape(-1, 1).float()).to(torch.bfloat16).float()
        self.high = nn.Linear(in_f, out_f, bias=False)
        self.high.weight = nn.Parameter(((u >> 4) - 8).float() * s16, requires_grad=False)  # H - 8: -8..7
        install_intx(self.high, 4, None, s16)  # 8da4w per channel: torchao's int4 values are H - 8 exactly
        self.register_buffer("low_mean", (u & 15).float().mean(-1) * self.planes.scale)

    @property
    def weight(self) -> torch.Tensor:
        return self.planes.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x = x.shape[:-1], x.reshape(-1, self.in_features)
        scores = self.high(x) + self.low_mean * x.sum(-1, keepdim=True)  # (N, V)
        ids = top_rows(scores, self.exact_rows)  # (N, K)
        # a few positions at a time: (positions, K, D / 2) floats for a whole prompt would be hundreds of MB
        # (eager only; an export's head sees the last position)
        exact = torch.cat([self.planes.dot(i, xc) for xc, i in zip(x.split(16), ids.split(16), strict=True)])
        exact = exact * self.planes.scale[ids]
        return scores.scatter(-1, ids, exact).reshape(*lead, self.out_features)


def base_scheme(scheme):
    """The scheme whose quantized tensors a two-pass scheme splits (int4 for int4-2pass): the quantization
    cache keeps those, so either scheme's export fills the other's cache."""
    from dataclasses import replace

    from edge.quant.schemes import SCHEMES

    base = replace(scheme, head_exact_rows=0)
    same = [s for s in SCHEMES.values() if replace(s, name=base.name, description=base.description) == base]
    return same[0] if same else base


def apply(model: nn.Module, scheme, coverage: list[dict]) -> list[dict]:
    """Replace the quantized model's shared int8 head and lookup by the two-pass head and a lookup over its
    planes (a no-op without head_exact_rows); the coverage report says so."""
    if not scheme.head_exact_rows:
        return coverage
    head = model.lm_head
    weight = getattr(head, "lin", head).weight  # an ActResidual head: its second row is not needed here
    q, scale = weight.qdata, weight.scale
    if q.dtype != torch.int8 or scale.shape != (q.shape[0], 1) or (weight.zero_point != 0).any():
        raise ValueError("a two-pass head needs the shared int8 table, symmetric, one scale per row")
    k = scheme.head_exact_rows
    model.lm_head = TwoPassHead(q, scale, k)
    model.embed = PlaneLookup(model.lm_head.planes)
    rows = {r["name"]: r for r in coverage}
    rows["lm_head"]["two_pass"] = f"every row scored from the high 4-bit plane, the {k} best recomputed from both"
    rows["lm_head"]["activations"] = "dynamic int8 for the scoring pass, fp32 for the rows recomputed"
    rows["embed"]["two_pass"] = "reads both planes of the head's table"
    return coverage
