"""Stage logits on the golden prompts, and their metrics against the fp32 reference in golden.npz.

A stage is anything that yields teacher-forced logits (T, V) for a prompt's ids: the eager
model (fp32 or quantized) in one forward, or an artifact's runner fed token by token.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge.errors import EdgeError
from edge.validate.golden import GoldenPrompt, read_npz
from edge.validate.metrics import Observed, between, kld_stats, per_position, summarize

LogitsFn = Callable[[list[int]], np.ndarray]  # ids -> (T, V) logits at every position


def eager_logits(model) -> LogitsFn:
    from edge.runtime.eager import EagerRunner

    runner = EagerRunner(model)
    return lambda ids: runner.all_logits(ids)


def runner_logits(runner) -> LogitsFn:
    from edge.runtime import replay

    return lambda ids: replay(runner, ids)


def targets_of(p: GoldenPrompt) -> np.ndarray:
    return np.append(p.ids[1:], -1).astype(np.int64)


def observe(prompts: list[GoldenPrompt], logits_fn: LogitsFn) -> dict[str, Observed]:
    """Run a stage over the golden prompts, keeping only what the metrics need."""
    out = {}
    for p in prompts:
        # An artifact's logits may be padded with -inf columns to the tokenizer's size: harmless here.
        out[p.name] = Observed.from_logits(p.ref, logits_fn([int(i) for i in p.ids]), targets_of(p))
    return out


def score(prompts: list[GoldenPrompt], observed: dict[str, Observed], window: int | None = None) -> dict:
    """Per prompt and overall: summarize() rows; positions before / after the sliding window apart."""
    missing = [p.name for p in prompts if p.name not in observed]
    if missing:
        raise ValueError(f"no logits for the golden prompts {missing}")
    per_prompt, pooled = {}, []
    for p in prompts:
        obs = observed[p.name]
        if obs.argmax.shape[0] != p.ids.shape[0]:
            raise ValueError(f"{p.name}: {obs.argmax.shape[0]} positions, the golden prompt has {p.ids.shape[0]}")
        if obs.at_ref_topk.shape[1] != p.ref.topk_idx.shape[1]:
            raise ValueError(
                f"{p.name}: logits at {obs.at_ref_topk.shape[1]} ids, the golden file has top-{p.ref.topk_idx.shape[1]}"
            )
        pp = per_position(p.ref, obs, targets_of(p))
        pp["position"] = np.arange(p.ids.shape[0])
        # NaN poisons every mean and compares false with every limit: counted, so the verdict can fail on it.
        pp["nonfinite"] = (~(np.isfinite(obs.lse) & np.isfinite(obs.at_ref_topk).all(-1))).astype(np.float64)
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


def compare(before: dict[str, Observed], after: dict[str, Observed]) -> dict:
    """One stage against the stage before it, pooled over the prompts both observed (metrics.between)."""
    names = [n for n in before if n in after]
    pp = [between(before[n], after[n]) for n in names]
    kld = np.concatenate([p["kld"] for p in pp])
    same = np.concatenate([p["same_top1"] for p in pp])
    return kld_stats(kld) | {"top1_agreement": float(same.mean()), "top1_flips": int((same == 0).sum())}


def evaluate(prompts: list[GoldenPrompt], logits_fn: LogitsFn, window: int | None = None) -> dict:
    return score(prompts, observe(prompts, logits_fn), window)


DUMP_FORMAT = "gemma-edge-observed-logits/1"


def dump(path, observed: dict[str, Observed], meta: dict) -> None:
    """`edge validate --dump-logits`: what a device writes and the host's `--device-logits` reads."""
    import json

    arrays = {"format": np.array(DUMP_FORMAT), "meta": np.array(json.dumps(meta))}
    for name, obs in observed.items():
        arrays |= {f"{name}.{f}": getattr(obs, f) for f in Observed.FIELDS}
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


# Each Observed field: its dimensions and dtype kinds (T positions first; top5 has 5 columns).
_FIELD_SHAPES = {
    "at_ref_topk": (2, "f"),
    "lse": (1, "f"),
    "argmax": (1, "iu"),
    "top5": (2, "iu"),
    "at_target": (1, "f"),
}


def load_dump(path) -> tuple[dict[str, Observed], dict]:
    """A logits dump, every array's shape and dtype checked; anything else is an EdgeError naming it."""
    import json

    what = f"a logits dump written by `edge validate --dump-logits` ({DUMP_FORMAT})"
    hint = "pass the file that `edge validate --dump-logits FILE` wrote on the device"
    with read_npz(path, what, hint) as z:
        if "format" not in z or z["format"].shape != () or str(z["format"]) != DUMP_FORMAT or "meta" not in z:
            raise EdgeError(f"{path} is not {what}", hint=hint)
        meta = json.loads(str(z["meta"]))
        if not isinstance(meta, dict):
            raise EdgeError(f"{path}: its meta is not a JSON object", hint=hint)
        names = {k.split(".", 1)[0] for k in z.files if "." in k}
        observed = {}
        for n in sorted(names):
            arrays = [z[f"{n}.{f}"] for f in Observed.FIELDS]
            t = arrays[1].shape[0] if arrays[1].ndim == 1 else -1
            for f, a in zip(Observed.FIELDS, arrays, strict=True):
                ndim, kinds = _FIELD_SHAPES[f]
                if a.ndim != ndim or a.dtype.kind not in kinds or a.shape[0] != t or (f == "top5" and a.shape[1] != 5):
                    raise EdgeError(f"{path}: {n}.{f} is a {a.dtype} array of shape {a.shape}", hint=hint)
            observed[n] = Observed(*arrays)
        return observed, meta


def write_observe_request(path, prompts: list[GoldenPrompt]) -> None:
    """What another runtime needs to write a dump (load_dump's format) of its own logits on the golden
    prompts: each prompt's ids and the reference's top-k ids (benchmarks/peers/llama_cpp_bench.py)."""
    arrays = {"format": np.array(DUMP_FORMAT + "/request")}
    for p in prompts:
        arrays |= {f"{p.name}.ids": p.ids.astype(np.int64), f"{p.name}.topk_idx": p.ref.topk_idx.astype(np.int64)}
    with open(path, "wb") as f:
        np.savez(f, **arrays)
