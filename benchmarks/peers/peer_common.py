"""What the peer benchmarks share: their command line, `edge bench`'s measurements around a runner, and the
observe records (edge.validate.metrics.Observed) written in `edge validate --dump-logits`'s format.

Imported by scripts run with a peer venv's python: besides the checkout's edge/bench.py and
edge/validate/metrics.py (numpy only), stdlib, psutil and numpy.
"""

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: both modules need only numpy
from edge.bench import time_runner  # noqa: E402
from edge.validate.metrics import Observed  # noqa: E402


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def arguments(description: str, model_flag: str) -> argparse.ArgumentParser:
    """The options every peer takes: its model file (`model_flag`), then llama_cpp_bench.py's."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(model_flag, required=True)
    p.add_argument("--prompt-ids", help="JSON list of token ids, BOS included, used as is")
    p.add_argument("--observe", help="an observe request (.npz): write logits records instead of timing")
    p.add_argument("--observe-out", help="where --observe writes its records (.npz)")
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=psutil.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    return p


def measure(load: Callable[[], object], ids: list[int], a, check: Callable[[object], None] = lambda _: None) -> dict:
    """`edge bench`'s fields: `load()` timed with the memory around it, `check(runner)` (what is known only once
    loaded), then the very timing loop of `edge bench` (edge/bench.py time_runner: warm-up, rounds, medians)."""
    rss_before = rss_mb()
    t = time.perf_counter()
    runner = load()
    load_s = time.perf_counter() - t
    rss_loaded = rss_mb()
    check(runner)
    timed = time_runner(runner, ids, a.gen_len, a.repeats, say=lambda _: None)
    memory = {"before_load": round(rss_before, 1), "after_load": round(rss_loaded, 1),
              "after_run": round(rss_mb(), 1), "peak": round(peak_rss_mb(), 1)}  # fmt: skip
    fields = {"threads": a.threads, "prompt_len": len(ids), "gen_len": a.gen_len, "repeats": a.repeats,
              "load_s": load_s, **timed, "memory_mb": memory}  # fmt: skip
    return fields


def observe(a, meta: dict, observed_of: Callable[[list[int], np.ndarray, np.ndarray], Observed]) -> None:
    """Every golden prompt of the request a.observe through `observed_of(ids, topk_idx, targets)`; the records
    written to a.observe_out, a JSON line on stdout."""
    req = np.load(a.observe, allow_pickle=False)
    fmt = str(req["format"]).removesuffix("/request")
    names = sorted({k.split(".", 1)[0] for k in req.files if "." in k})
    out = {"format": np.array(fmt), "meta": np.array(json.dumps(meta))}
    for n in names:
        ids = req[f"{n}.ids"].tolist()
        targets = np.append(np.asarray(ids[1:]), -1)
        o = observed_of(ids, req[f"{n}.topk_idx"], targets)
        out |= {f"{n}.{f}": getattr(o, f) for f in Observed.FIELDS}
    with open(a.observe_out, "wb") as f:
        np.savez_compressed(f, **out)
    print(json.dumps({"runtime": meta["runtime"], "observed": names, "out": a.observe_out}))
