"""A .pte run through ExecuTorch's Python runtime (the same C++ runtime the phone apps link)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import EdgeError


class PteRunner:
    def __init__(self, path: str | Path, threads: int | None = None, data_path: str | Path | None = None) -> None:
        """data_path: the program's external weights (.ptd), when it has them."""
        try:
            # Kernels the stock apps link too: quantized embeddings, the LLM ops (update_cache, custom_sdpa).
            import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
            import executorch.kernels.quantized  # noqa: F401
            import torch  # executorch's Python runtime takes and returns torch tensors
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime
        except ImportError as e:
            raise EdgeError("running a .pte needs executorch", hint="pip install 'gemma-edge[executorch]'") from e
        if threads:
            portable_lib._unsafe_reset_threadpool(threads)
        self._torch = torch
        try:
            self.program = Runtime.get().load_program(str(path), data_path=str(data_path) if data_path else None)
            self.forward = self.program.load_method("forward")
        except RuntimeError as e:  # the runtime's own log (stderr, above) names the failing step
            raise EdgeError(
                f"{Path(path).name} does not load in this ExecuTorch runtime: {e}",
                hint="the runtime's log above says which step failed (e.g. XNNPACK 'Failed to define tensor');"
                " re-export the bundle with this gemma-edge and executorch (edge doctor lists the versions)",
            ) from e
        meta = {n: self.program.load_method(n).execute([])[0] for n in ("get_max_seq_len", "get_vocab_size")}
        self.max_seq_len = int(meta["get_max_seq_len"])
        self.vocab_size = int(meta["get_vocab_size"])
        self.max_T = int(self.forward.metadata.input_tensor_meta(0).sizes()[1])
        self.pos = 0

    def constant(self, name: str):
        return self.program.load_method(name).execute([])[0]

    def reset(self) -> None:
        self.pos = 0  # stale cache entries beyond pos are masked out by position

    def _run(self, ids: list[int]) -> np.ndarray:
        t = self._torch
        inputs = [t.tensor([ids], dtype=t.int64), t.tensor([self.pos], dtype=t.int64)]
        # Method.execute clones every output with torch, whose 2 threads then fight XNNPACK's for a 1 MB
        # copy: ~12 ms of a 270M decode step on 2 cores (ETDump: the program itself took 35 ms). The
        # uncloned output lives in the program's planned memory until the next call: copy it with numpy.
        out = self.forward._method.call(inputs, False)[0]
        self.pos += len(ids)
        return np.array(out[0].numpy(), dtype=np.float32, copy=True)

    def prefill(self, ids: list[int]) -> np.ndarray:
        if self.max_T == 1:  # a static-shape program takes one token per call
            for tok in ids[:-1]:
                self._run([tok])
            return self._run(ids[-1:])
        logits = None
        for i in range(0, len(ids), self.max_T):
            logits = self._run(ids[i : i + self.max_T])
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self._run([token])
