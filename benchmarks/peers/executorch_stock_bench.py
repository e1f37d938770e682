"""ExecuTorch stock peer: `edge bench`'s measurements on the .pte optimum-executorch's own recipe makes.

Run with the peer venv's python (benchmarks/peers/executorch_stock.sh builds it and the .pte), not the project's:
  $VENV/bin/python benchmarks/peers/executorch_stock_bench.py --pte model.pte --prompt-ids ids.json \
      --gen-len 128 --threads 2 --repeats 3
The JSON uses edge/bench.py's field names and its timing loop (time_runner), as llama_cpp_bench.py does.
The program's forward(input_ids (1, T), cache_position (T,)) returns the logits of every position
(1, T, V): prefill is one call for the whole prompt, decode one call a token, greedy.
Besides the checkout's edge/bench.py and edge/validate/metrics.py: stdlib, executorch, torch, psutil, numpy.

  ... --observe REQ.npz --observe-out OUT.npz   (no timing)
teacher-forced logits on the golden prompts of REQ (edge.validate.stages.write_observe_request), written
in `edge validate --dump-logits`'s format, so the project scores the stock export as it scores a device.
"""

import argparse
import importlib.metadata
import json
import os
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: both modules need only numpy
from edge.bench import time_runner  # noqa: E402
from edge.validate.metrics import Observed  # noqa: E402


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StockRunner:
    """The stock .pte behind edge/runtime's runner protocol: reset, prefill(ids), decode(id) -> last logits."""

    def __init__(self, pte: str, threads: int) -> None:
        # The kernels ExecuTorch's LLM runner links: custom_sdpa / update_cache(_with_indices), embedding_byte.
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
        import executorch.kernels.quantized  # noqa: F401
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        portable_lib._unsafe_reset_threadpool(threads)  # XNNPACK's pool; the stock runner sets it the same way
        self.torch = torch
        self.program = Runtime.get().load_program(pte)
        self.forward = self.program.load_method("forward")
        self.max_seq_len = int(self.program.load_method("get_max_seq_len").execute([])[0])
        self.vocab_size = int(self.program.load_method("get_vocab_size").execute([])[0])
        self.max_T = int(self.forward.metadata.input_tensor_meta(0).sizes()[1])  # dynamic T's bound: window - 1
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0  # at cache_position 0 the ring caches forget every slot; the full caches mask by position

    def _call(self, ids: list[int]):
        t = self.torch
        inputs = [t.tensor([ids], dtype=t.int64), t.arange(self.pos, self.pos + len(ids), dtype=t.int64)]
        # Uncloned, as edge/runtime/pte.py: execute() would copy all T x V logits with torch first (the C++
        # runner copies nothing); the output lives in the program's planned memory until the next call.
        out = self.forward._method.call(inputs, False)[0]
        self.pos += len(ids)
        return out[0]  # (T, V)

    def prefill(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.max_T:
            raise SystemExit(f"a {len(ids)}-token prompt does not fit one call (the program takes <= {self.max_T})")
        return np.array(self._call(ids)[-1].numpy(), dtype=np.float32, copy=True)

    def decode(self, token: int) -> np.ndarray:
        return np.array(self._call([token])[-1].numpy(), dtype=np.float32, copy=True)


def observe(a) -> None:
    """The fields of edge.validate.metrics.Observed from the program's logits at every position."""
    req = np.load(a.observe, allow_pickle=False)
    fmt = str(req["format"]).removesuffix("/request")
    names = sorted({k.split(".", 1)[0] for k in req.files if "." in k})
    runner = StockRunner(a.pte, a.threads)
    out = {"format": np.array(fmt), "meta": np.array(json.dumps({"runtime": "executorch-stock", "pte": a.pte}))}
    for n in names:
        ids, topk = req[f"{n}.ids"].tolist(), req[f"{n}.topk_idx"]
        targets = np.append(np.asarray(ids[1:]), -1)
        runner.reset()
        parts = []  # a prompt longer than one call goes in chunks, as the stock runner prefills it
        for i in range(0, len(ids), runner.max_T):
            j = min(i + runner.max_T, len(ids))
            logits = runner._call(ids[i:j]).numpy()
            parts.append(Observed.from_logits(SimpleNamespace(topk_idx=topk[i:j]), logits, targets[i:j]))
        for f in Observed.FIELDS:
            out[f"{n}.{f}"] = np.concatenate([getattr(p, f) for p in parts])
    with open(a.observe_out, "wb") as f:
        np.savez_compressed(f, **out)
    print(json.dumps({"runtime": "executorch-stock", "observed": names, "out": a.observe_out}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pte", required=True)
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

    rss_before = rss_mb()
    t = time.perf_counter()
    runner = StockRunner(a.pte, a.threads)
    load_s = time.perf_counter() - t
    rss_loaded = rss_mb()
    if a.gen_len < 1 or a.repeats < 1 or len(ids) + a.gen_len > runner.max_seq_len:
        p.error(f"need --gen-len >= 1, --repeats >= 1 and prompt + gen-len <= max_seq_len {runner.max_seq_len}")
    # The very timing loop of `edge bench` (edge/bench.py: warm-up, rounds, medians), on the stock .pte.
    timed = time_runner(runner, ids, a.gen_len, a.repeats, say=lambda _: None)
    print(
        json.dumps(
            {
                "runtime": "executorch-stock",
                "pte": a.pte,
                "model_bytes": os.path.getsize(a.pte),
                "executorch": importlib.metadata.version("executorch"),
                "optimum_executorch": importlib.metadata.version("optimum-executorch"),
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
            }
        )
    )


if __name__ == "__main__":
    main()
