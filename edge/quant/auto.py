"""`edge export --quant auto [--max-kld X]`: the fewest bytes whose quantized model meets a KLD budget.

auto keeps everything of the int4 scheme (SmoothQuant, the source grids kept exactly, the shared int8
table for the lookup and the head, ActResidual) but which linears go to 4 bits: that it searches.

1. The choice is over the linears where it changes bytes: each one the base quantizes, but the head
   (the shared int8 table) and the linears held exactly on a Q4_K source grid (4-bit whichever we pick).
2. Sensitivity: each such linear alone rounded to 4 bits (round to nearest, g32), everything else
   fp32, as mean KLD vs the fp32 model on the head of each calibration text (edge/quant/sensitivity.py,
   RANK_TOKENS_PER_TEXT). The manifest keeps it, per tensor.
3. A ladder: the n least sensitive at 4 bits (GPTQ, g32), the rest 8da8w per channel. Each candidate
   is quantized in full (quantize_model on a copy of the fp32 model; SmoothQuant, which depends on
   none of the choices, folded once for all) and measured as its mean KLD vs fp32 on held-out text:
   sequences the fp32 model samples itself (sampled_text), which neither SmoothQuant nor GPTQ saw
   (see EVAL_TEXTS for what the calibration text, in-sample, read instead); the golden prompts stay
   unseen, for `edge validate` to judge. n is found by bisection (KLD grows with n, roughly: each step
   adds a more sensitive tensor): the largest n within the budget, i.e. the smallest model. If even
   n = 0 misses the budget, auto refuses with the best figure it reached.

Cost: the sensitivity pass (one forward per linear over the head of each calibration text) and one quantization
per candidate, 2 + ceil(log2 N) of them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from torch import nn

from edge.errors import EdgeError
from edge.progress import say
from edge.quant.schemes import SCHEMES, Rounding, Scheme, WeightQuant

BASE = "int4"
FOUR = WeightQuant(bits=4, group=32, rounding=Rounding.GPTQ)
# The ranking is measured on the first tokens of each calibration text (every domain, a third of the
# 270M's 811 tokens): one forward per linear, ~63% of it the 262k-row head; on all 811 tokens the 270M's
# 99 linears took ~30 minutes here. The ladder's KLD, which decides, uses the whole text.
RANK_TOKENS_PER_TEXT = 32
# The ladder's KLD is measured on text the fp32 model samples itself (seeded; top-k 40 at temperature 1),
# which neither SmoothQuant nor GPTQ saw. Measured on the calibration text instead -- in-sample, GPTQ's
# 640-dim Hessians fitted on 811 tokens -- the 270M's choice at 0.03 read 0.028 there and 0.087 /
# top-1 84.3% on the golden prompts (`edge validate`): a 3x optimistic budget.
EVAL_TEXTS, EVAL_TOKENS, EVAL_SEED = 4, 96, 0


def default_budget() -> float:
    """The base scheme's band: what the named int4 must meet on the golden prompts."""
    return SCHEMES[BASE].band.mean_kld


def flexible(model: nn.Module, base: Scheme, grids: dict | None) -> list[str]:
    """The linears whose precision is a choice, in model order."""
    from edge.quant.apply import plan, transcodable

    coverage = plan(model, base)
    exact = transcodable(base, coverage, grids)
    return [r["name"] for r in coverage if r["scheme"] != "fp32" and r["name"] not in ("embed", "lm_head", *exact)]


def scheme_with(base: Scheme, four: Sequence[str], budget: float) -> Scheme:
    """The base scheme with exactly the linears `four` at 4 bits and every other one at 8."""
    return replace(
        base,
        name="auto",
        description=f"auto (--max-kld {budget:g}): {len(four)} linears at int4 g32 (GPTQ) chosen by measured"
        f" sensitivity, the rest 8da8w per channel; otherwise as {base.name}: {base.description}",
        overrides=tuple((n, FOUR) for n in four),
        band=replace(base.band, mean_kld=budget) if base.band else None,
    )


def linear_bytes(model: nn.Module, names: Sequence[str], four: set[str]) -> int:
    """Storage of these linears' weights: 4-bit g32 (bf16 scales) or 8-bit per channel (fp32 scales)."""
    total = 0.0
    for n in names:
        out_f, in_f = model.get_submodule(n).weight.shape
        total += out_f * in_f * FOUR.bits_per_weight() / 8 if n in four else out_f * (in_f + 4)
    return int(total)


@dataclass
class Candidate:
    n_four: int
    mean_kld: float
    linear_mb: float

    def row(self) -> dict:
        return {"n_int4": self.n_four, "mean_kld": round(self.mean_kld, 6), "linear_mb": round(self.linear_mb, 2)}


def sampled_text(model: nn.Module, bos: int, n: int = EVAL_TEXTS, length: int = EVAL_TOKENS, seed: int = EVAL_SEED):
    """n sequences of `length` tokens the model samples after BOS (seeded): held-out evaluation text."""
    import numpy as np

    from edge.generation import SamplingConfig, pick
    from edge.runtime.eager import EagerRunner

    runner, sampling = EagerRunner(model), SamplingConfig(temperature=1.0, top_k=40, seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        runner.reset()
        ids = [bos]
        logits = runner.prefill(ids)
        while len(ids) < min(length, model.max_seq_len):
            ids.append(pick(logits, sampling, rng))
            logits = runner.decode(ids[-1])
        out.append(ids)
    return out


def choose(
    model: nn.Module,
    calib: list[list[int]],
    grids: dict | None,
    budget: float,
    progress: Callable[[str], Callable[[int, int], None]] | None = None,
) -> tuple[nn.Module, Scheme, list[dict], dict]:
    """Search; returns (the chosen quantized model, its scheme, its coverage, the manifest's record).

    `model` (fp32) is left as it was; each candidate is quantized on a copy of it.
    """
    from edge.quant.apply import fold_smoothing, quantize_model
    from edge.quant.sample import sample_sequences
    from edge.quant.sensitivity import Reference, sensitivity

    base = SCHEMES[BASE]
    names = flexible(model, base, grids)
    say(f"  auto: sensitivity of {len(names)} linears at 4 bits, one at a time, on the calibration text")
    tick = progress and progress("sensitivity")
    heads = [ids[:RANK_TOKENS_PER_TEXT] for ids in calib]
    sens = sensitivity(model, heads, names, bits=FOUR.bits, group=FOUR.group, progress=tick)
    order = sorted(names, key=lambda n: (sens[n], names.index(n)))
    held_out = sampled_text(model, calib[0][0])
    ref = Reference(model, held_out)
    # GPTQ's sampled calibration (edge/quant/sample.py, another seed than held_out's): once for all candidates.
    sampled = sample_sequences(model, calib[0][0], base.gptq_samples) if base.gptq_samples else None
    # SmoothQuant's scales depend on none of the choices (its weights are searched at the base's 8 bits):
    # folded once into a copy, which each candidate copies.
    smoothed = copy.deepcopy(model)
    report = fold_smoothing(smoothed, base, calib, grids, progress) if base.smooth else None
    tried: dict[int, tuple[Candidate, nn.Module, list[dict]]] = {}

    def measure(n: int) -> Candidate:
        if n not in tried:
            q = copy.deepcopy(smoothed)
            scheme = scheme_with(base, order[:n], budget)
            coverage = quantize_model(q, scheme, calib, grids=grids, smoothed=report, sampled=sampled)
            c = Candidate(n, ref.kld(q), linear_bytes(model, names, set(order[:n])) / 1e6)
            ok = "within" if c.mean_kld <= budget else "over"
            say(f"  auto: {n:>3} / {len(names)} linears at 4 bits: {c.linear_mb:7.1f} MB of linear weights,"
                f" held-out KLD {c.mean_kld:.5f} ({ok} {budget:g})")  # fmt: skip
            tried[n] = (c, q, coverage)
            best = _best(tried, budget)
            for k in tried:  # memory: keep only the quantized model that may be chosen
                if k != best:
                    tried[k] = (tried[k][0], None, None)
        return tried[n][0]

    lo, hi = 0, len(names)
    if measure(lo).mean_kld > budget:
        best = tried[lo][0]
        raise EdgeError(
            f"no mix of 4- and 8-bit linears meets --max-kld {budget:g}: with every choosable linear at 8 bits"
            f" the held-out KLD is {best.mean_kld:.5f}",
            hint=f"raise --max-kld to at least {best.mean_kld:.4f}, or export --quant int8 (a finer scheme)",
        )
    if measure(hi).mean_kld <= budget:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(mid).mean_kld <= budget:
            lo = mid
        else:
            hi = mid
    chosen, quantized, coverage = tried[lo]
    scheme = scheme_with(base, order[:lo], budget)
    record = {
        "budget_mean_kld": budget,
        "measured_on": f"{EVAL_TEXTS} x {EVAL_TOKENS} tokens sampled by the fp32 model (seed {EVAL_SEED}, top-k 40),"
        " unseen by SmoothQuant and GPTQ; vs fp32",
        "chosen": chosen.row(),
        "explored": [tried[k][0].row() for k in sorted(tried)],
        "sensitivity_int4_rtn_g32": {n: round(sens[n], 6) for n in order},
        "sensitivity_measured_on": f"the first {RANK_TOKENS_PER_TEXT} tokens of each calibration text, vs fp32",
        "int4": list(order[:lo]),
    }
    say(f"  auto: chose {lo} / {len(names)} linears at 4 bits (held-out KLD {chosen.mean_kld:.5f} <= {budget:g})")
    return quantized, scheme, coverage, record


def _best(tried: dict, budget: float) -> int | None:
    """The largest n tried so far that met the budget."""
    ok = [k for k, (c, _, _) in tried.items() if c.mean_kld <= budget]
    return max(ok) if ok else None
