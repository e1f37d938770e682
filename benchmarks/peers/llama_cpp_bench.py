"""llama.cpp peer baseline: `edge bench`'s measurements, taken through llama-cpp-python on a GGUF.

Run with the peer venv's python (benchmarks/peers/llama_cpp.sh builds it), not the project's:
  $VENV/bin/python benchmarks/peers/llama_cpp_bench.py --gguf M.gguf --prompt-ids ids.json --gen-len 128 \
      --threads 2 --repeats 3
The JSON uses edge/bench.py's field names and its timing loop (time_runner, numpy only), so both share one table.
Besides the checkout's edge/bench.py: stdlib, llama_cpp, psutil, numpy.

  ... --observe REQ.npz --observe-out OUT.npz   (no timing)
teacher-forced logits on the golden prompts of REQ (edge.validate.stages.write_observe_request), written
in `edge validate --dump-logits`'s format, so the project scores llama.cpp as it scores a device.
"""

import argparse
import ctypes
import importlib.metadata
import json
import os
import resource
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: edge.bench needs only numpy
from edge.bench import time_runner  # noqa: E402


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def observe(a) -> None:
    """The fields of edge.validate.metrics.Observed, computed from llama.cpp's logits at every position."""
    req = np.load(a.observe, allow_pickle=False)
    fmt = str(req["format"]).removesuffix("/request")
    names = sorted({k.split(".", 1)[0] for k in req.files if "." in k})
    # logits_all: llama.cpp keeps every position's row (llm.scores); 1024 x 262144 floats, 1 GB.
    llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=1024, n_threads=a.threads, n_threads_batch=a.threads,
                          n_batch=512, logits_all=True, verbose=False)  # fmt: skip
    out = {"format": np.array(fmt), "meta": np.array(json.dumps({"runtime": "llama.cpp", "gguf": a.gguf}))}
    for n in names:
        ids, topk = req[f"{n}.ids"].tolist(), req[f"{n}.topk_idx"]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        m = logits.max(-1, keepdims=True).astype(np.float64)
        targets = np.append(np.asarray(ids[1:]), -1)
        at_t = np.take_along_axis(logits, np.maximum(targets, 0)[:, None], -1)[:, 0]
        out |= {
            f"{n}.at_ref_topk": np.take_along_axis(logits, topk, -1),
            f"{n}.lse": m[:, 0] + np.log(np.exp(logits - m).sum(-1)),
            f"{n}.argmax": logits.argmax(-1).astype(np.int64),
            f"{n}.top5": np.argpartition(-logits, 4, axis=-1)[:, :5].astype(np.int64),
            f"{n}.at_target": np.where(targets >= 0, at_t, np.nan).astype(np.float32),
        }
    with open(a.observe_out, "wb") as f:
        np.savez_compressed(f, **out)
    print(json.dumps({"runtime": "llama.cpp", "observed": names, "out": a.observe_out}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--prompt-ids", help="JSON list of token ids, BOS included, used as is")
    p.add_argument("--observe", help="an observe request (.npz): write logits records instead of timing")
    p.add_argument("--observe-out", help="where --observe writes its records (.npz)")
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=psutil.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if a.observe:
        return observe(a)
    ids = [int(i) for i in json.load(open(a.prompt_ids))]
    if a.gen_len < 1 or a.repeats < 1 or len(ids) + a.gen_len > 1024:
        p.error("need --gen-len >= 1, --repeats >= 1 and prompt + gen-len <= n_ctx 1024")

    rss_before = rss_mb()
    t = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=a.gguf,
        n_ctx=1024,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        n_batch=512,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - t
    rss_loaded = rss_mb()
    # The very timing loop of `edge bench` (edge/bench.py: warm-up, rounds, medians), on llama.cpp.
    timed = time_runner(LlamaRunner(llm), ids, a.gen_len, a.repeats, say=lambda _: None)
    print(
        json.dumps(
            {
                "runtime": "llama.cpp",
                "gguf": a.gguf,
                "model_bytes": os.path.getsize(a.gguf),
                "llama_cpp_python": importlib.metadata.version("llama_cpp_python"),
                "threads": a.threads,
                "prompt_len": len(ids),
                "gen_len": a.gen_len,
                "repeats": a.repeats,
                "load_s": load_s,
                **timed,
                "memory_mb": {
                    "before_load": round(rss_before, 1),
                    "after_load": round(rss_loaded, 1),
                    "after_run": round(rss_mb(), 1),
                    "peak": round(peak_rss_mb(), 1),
                },
                "system_info": llama_cpp.llama_print_system_info().decode(),
            }
        )
    )


class LlamaRunner:
    """llama.cpp behind edge/runtime's runner protocol: reset, prefill(ids), decode(id) -> last logits."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.n_vocab = llm.n_vocab()

    def _logits(self) -> np.ndarray:
        # With logits_all=False, 0.3.36's Llama.eval no longer copies logits into llm.scores (stale memory):
        # read the last row straight from llama.cpp, a zero-copy view of n_vocab floats.
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,))

    def reset(self) -> None:
        self.llm.reset()  # n_tokens = 0: the next eval drops every cached position (kv_cache_seq_rm from 0)

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)  # the ids as given: no BOS is added on this path
        return self._logits()

    def decode(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._logits()


if __name__ == "__main__":
    main()
