"""Stage logits on the golden prompts, and their metrics against the fp32 reference in golden.npz.

A stage is anything that yields teacher-forced logits (T, V) for a prompt's ids: the eager
model (fp32 or quantized) in one forward, or an artifact's runner fed token by token.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge.validate.golden import GoldenPrompt
from edge.validate.metrics import per_position, summarize

LogitsFn = Callable[[list[int]], np.ndarray]  # ids -> (T, V) logits at every position


def eager_logits(model) -> LogitsFn:
    from edge.runtime.eager import EagerRunner

    runner = EagerRunner(model)
    return lambda ids: runner.all_logits(ids)


def runner_logits(runner) -> LogitsFn:
    from edge.runtime import replay

    return lambda ids: replay(runner, ids)


def evaluate(prompts: list[GoldenPrompt], logits_fn: LogitsFn, window: int | None = None) -> dict:
    """Per prompt and overall: summarize() rows; positions before / after the sliding window apart."""
    per_prompt, pooled = {}, []
    for p in prompts:
        ids = [int(i) for i in p.ids]
        # An artifact's logits may be padded with -inf columns to the tokenizer's size: harmless here.
        logits = logits_fn(ids)
        targets = np.append(p.ids[1:], -1).astype(np.int64)
        pp = per_position(p.ref, logits, targets)
        pp["position"] = np.arange(len(ids))
        per_prompt[p.name] = summarize(pp)
        pooled.append(pp)
    allpp = {k: np.concatenate([pp[k] for pp in pooled]) for k in pooled[0]}
    by_pos = {p.name: pp["kld"].tolist() for p, pp in zip(prompts, pooled, strict=True)}
    out = {"overall": summarize(allpp), "prompts": per_prompt, "kld_by_position": by_pos}
    if window:
        for side, sel in (("within_window", allpp["position"] < window), ("past_window", allpp["position"] >= window)):
            if sel.any():
                out[side] = summarize({k: v[sel] for k, v in allpp.items()})
    return out
