"""ExecuTorch stock peer: `edge bench`'s measurements on the .pte optimum-executorch's own recipe makes.

Run with the peer venv's python (benchmarks/peers/executorch_stock.sh builds it and the .pte), not the project's:
  $VENV/bin/python benchmarks/peers/executorch_stock_bench.py --pte model.pte --prompt-ids ids.json \
      --gen-len 128 --threads 2 --repeats 3
The JSON uses edge/bench.py's field names and its timing loop (time_runner), as llama_cpp_bench.py does.
The program's forward(input_ids (1, T), cache_position (T,)) returns the logits of every position
(1, T, V): prefill is one call for the whole prompt, decode one call a token, greedy.
Besides peer_common.py (and through it the checkout's edge/bench.py and edge/validate/metrics.py): stdlib,
executorch, torch, psutil, numpy.

  ... --observe REQ.npz --observe-out OUT.npz   (no timing)
teacher-forced logits on the golden prompts of REQ (edge.validate.stages.write_observe_request), written
in `edge validate --dump-logits`'s format, so the project scores the stock export as it scores a device.
"""

import importlib.metadata
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import Observed, arguments, measure, observe  # noqa: E402


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


def observe_stock(a) -> None:
    """The fields of edge.validate.metrics.Observed from the program's logits at every position."""
    runner = StockRunner(a.pte, a.threads)

    def observed_of(ids: list[int], topk: np.ndarray, targets: np.ndarray) -> Observed:
        runner.reset()
        parts = []  # a prompt longer than one call goes in chunks, as the stock runner prefills it
        for i in range(0, len(ids), runner.max_T):
            j = min(i + runner.max_T, len(ids))
            logits = runner._call(ids[i:j]).numpy()
            parts.append(Observed.from_logits(SimpleNamespace(topk_idx=topk[i:j]), logits, targets[i:j]))
        return Observed(*(np.concatenate([getattr(q, f) for q in parts]) for f in Observed.FIELDS))

    observe(a, {"runtime": "executorch-stock", "pte": a.pte}, observed_of)


def main() -> None:
    p = arguments(__doc__.splitlines()[0], "--pte")
    a = p.parse_args()
    if a.observe:
        return observe_stock(a)
    ids = [int(i) for i in json.load(open(a.prompt_ids))]

    def check(runner: StockRunner) -> None:
        if a.gen_len < 1 or a.repeats < 1 or len(ids) + a.gen_len > runner.max_seq_len:
            p.error(f"need --gen-len >= 1, --repeats >= 1 and prompt + gen-len <= max_seq_len {runner.max_seq_len}")

    fields = measure(lambda: StockRunner(a.pte, a.threads), ids, a, check)
    versions = {k.replace("-", "_"): importlib.metadata.version(k) for k in ("executorch", "optimum-executorch")}
    print(json.dumps({"runtime": "executorch-stock", "pte": a.pte, "model_bytes": os.path.getsize(a.pte), **versions,
                      **fields}))  # fmt: skip


if __name__ == "__main__":
    main()
