"""What the LM head costs per decode step in each form ExecuTorch's XNNPACK can run it.

    .venv/bin/python benchmarks/head_kernels.py --rows 262144 --dim 640 --threads 2 --rounds 7

Each form is one module lowered alone through the project's lowering (edge.targets.executorch.lower_module),
random weights, input (M, dim) with M = 1 or 2 (2: ActResidual's second activation row). Rounds alternate
the forms; each round times `--calls` forward calls per form; the table gives the median of the rounds'
per-call medians. Forms:

- int8: 8da8w per channel, what the int4 bundle's head is today (the table shared with the lookup).
- int4: 8da4w per channel (half the bytes).
- twopass-K: the int8 table as two 4-bit planes (high nibble, low nibble; the same bytes): every row
  scored from the high plane through XNNPACK's 4-bit kernel, then the K best rows recomputed exactly
  with their low plane (gather, unpack, a K x dim product) and written back into the logits.

Timing goes in this benchmark, never in a test; run it on a quiet host and alternate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class TwoPassHead(nn.Module):
    """logits = x @ (16 * hi + lo)^T * s, with hi the table's high nibble (signed) and lo its low one.

    Pass 1 (every row): 16 s (x . hi) + 7.5 s sum(x), lo replaced by its mean. Pass 2 (the K best rows of
    pass 1): the exact s (x . lo) added to the first term. Rows outside the K keep pass 1's estimate."""

    def __init__(self, hi: nn.Module, lo_packed: torch.Tensor, scale: torch.Tensor, k: int) -> None:
        super().__init__()
        self.hi, self.k = hi, k
        self.register_buffer("lo_packed", lo_packed)  # (V, dim / 2) uint8, two low nibbles a byte
        self.register_buffer("scale", scale)  # (V,)
        self.register_buffer("mean_lo", 7.5 * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.hi(x)  # (M, V)
        approx = raw + self.mean_lo * x.sum(-1, keepdim=True)
        _, idx = approx.topk(self.k, dim=-1)  # (M, K)
        b = self.lo_packed[idx].float()  # (M, K, dim / 2)
        odd = torch.floor(b / 16)
        lo = torch.stack([b - 16 * odd, odd], dim=-1).flatten(-2)  # (M, K, dim)
        exact = raw.gather(-1, idx) + (lo @ x.unsqueeze(-1)).squeeze(-1) * self.scale[idx]
        return approx.scatter(-1, idx, exact)


def _quantized_linear(rows: int, dim: int, bits: int) -> nn.Module:
    from edge.quant.apply import install_intx

    lin = nn.Linear(dim, rows, bias=False)
    qmax = 2 ** (bits - 1) - 1
    q = torch.randint(-qmax - 1, qmax + 1, (rows, dim)).float()
    s = torch.rand(rows, 1) * 1e-3 + 1e-4
    lin.weight = nn.Parameter(q * s, requires_grad=False)
    install_intx(lin, bits, None, s)
    return lin


def build(form: str, rows: int, dim: int) -> nn.Module:
    if form in ("int8", "int4"):
        return _quantized_linear(rows, dim, int(form[3:]))
    k = int(form.split("-")[1])
    hi = _quantized_linear(rows, dim, 4)
    lo = torch.randint(0, 256, (rows, dim // 2), dtype=torch.uint8)
    return TwoPassHead(hi, lo, torch.rand(rows) * 1e-3 + 1e-4, k)


def lower(form: str, rows: int, dim: int, m: int, out: Path) -> Path:
    from edge.targets import BACKENDS
    from edge.targets.executorch import lower_module

    path = out / f"{form}-m{m}.pte"
    if not path.exists():
        t = time.perf_counter()
        path.write_bytes(lower_module(build(form, rows, dim), (torch.randn(m, dim),), BACKENDS["xnnpack"]))
        print(f"lowered {path.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--forms", default="int8,int4,twopass-64")
    ap.add_argument("--m", default="1,2", help="activation rows per call (2: ActResidual)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None, help="keep the .pte files here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    out = a.out or Path(tempfile.mkdtemp(prefix="head-kernels-"))
    out.mkdir(parents=True, exist_ok=True)
    cases = [(f, int(m)) for f in a.forms.split(",") for m in a.m.split(",")]
    paths = {c: lower(*c[:1], a.rows, a.dim, c[1], out) for c in cases}
    portable_lib._unsafe_reset_threadpool(a.threads)
    methods = {c: Runtime.get().load_program(str(p)).load_method("forward") for c, p in paths.items()}
    inputs = {c: [torch.randn(c[1], a.dim)] for c in cases}
    for c in cases:  # warm-up: XNNPACK packs at load, the first calls fault pages in
        for _ in range(5):
            methods[c]._method.call(inputs[c], False)
    per_round: dict = {c: [] for c in cases}
    for r in range(a.rounds):
        for c in cases if r % 2 == 0 else reversed(cases):
            times = []
            for _ in range(a.calls):
                t = time.perf_counter()
                methods[c]._method.call(inputs[c], False)
                times.append(time.perf_counter() - t)
            per_round[c].append(statistics.median(times) * 1e3)
    base = {m: statistics.median(per_round[("int8", m)]) for _, m in cases if ("int8", m) in per_round}
    print(f"| form | M | ms / call (median of {a.rounds} rounds) | spread | vs int8 |")
    print("|---|---|---|---|---|")
    result = []
    for c in cases:
        med = statistics.median(per_round[c])
        ratio = f"{med / base[c[1]]:.2f}x" if c[1] in base else ""
        print(f"| {c[0]} | {c[1]} | {med:.2f} | {min(per_round[c]):.2f}-{max(per_round[c]):.2f} | {ratio} |")
        result.append({"form": c[0], "m": c[1], "ms": med, "rounds": per_round[c]})
    if a.json:
        a.json.write_text(json.dumps({"rows": a.rows, "dim": a.dim, "threads": a.threads, "cases": result}, indent=1))


if __name__ == "__main__":
    main()
