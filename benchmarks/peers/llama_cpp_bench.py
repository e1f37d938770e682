"""llama.cpp peer baseline: `edge bench`'s measurements, taken through llama-cpp-python on a GGUF.

Run with the peer venv's python (benchmarks/peers/llama_cpp.sh builds it), not the project's:
  $VENV/bin/python benchmarks/peers/llama_cpp_bench.py --gguf M.gguf --prompt-ids ids.json --gen-len 128 \
      --threads 2 --repeats 3
The JSON uses edge/bench.py's field names and its timing loop (time_runner, numpy only), so both share one table.
Besides peer_common.py (and through it the checkout's edge/bench.py and edge/validate/metrics.py): stdlib,
llama_cpp, psutil, numpy.

  ... --observe REQ.npz --observe-out OUT.npz   (no timing)
teacher-forced logits on the golden prompts of REQ (edge.validate.stages.write_observe_request), written
in `edge validate --dump-logits`'s format, so the project scores llama.cpp as it scores a device.
"""

import ctypes
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import Observed, arguments, measure, observe  # noqa: E402


def llama(a, logits_all: bool):
    # logits_all: llama.cpp keeps every position's row (llm.scores); 1024 x 262144 floats, 1 GB.
    return llama_cpp.Llama(model_path=a.gguf, n_ctx=1024, n_threads=a.threads, n_threads_batch=a.threads,
                           n_batch=512, logits_all=logits_all, verbose=False)  # fmt: skip


def observe_llama(a) -> None:
    """The fields of edge.validate.metrics.Observed, computed from llama.cpp's logits at every position."""
    llm = llama(a, logits_all=True)

    def observed_of(ids: list[int], topk: np.ndarray, targets: np.ndarray) -> Observed:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        return Observed.from_logits(SimpleNamespace(topk_idx=topk), logits, targets)

    observe(a, {"runtime": "llama.cpp", "gguf": a.gguf}, observed_of)


def main() -> None:
    p = arguments(__doc__.splitlines()[0], "--gguf")
    a = p.parse_args()
    if a.observe:
        return observe_llama(a)
    ids = [int(i) for i in json.load(open(a.prompt_ids))]
    if a.gen_len < 1 or a.repeats < 1 or len(ids) + a.gen_len > 1024:
        p.error("need --gen-len >= 1, --repeats >= 1 and prompt + gen-len <= n_ctx 1024")
    fields = measure(lambda: LlamaRunner(llama(a, logits_all=False)), ids, a)
    print(json.dumps({"runtime": "llama.cpp", "gguf": a.gguf, "model_bytes": os.path.getsize(a.gguf),
                      "llama_cpp_python": importlib.metadata.version("llama_cpp_python"), **fields,
                      "system_info": llama_cpp.llama_print_system_info().decode()}))  # fmt: skip


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
