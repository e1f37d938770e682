"""A .tflite (edge/targets/litert.py's signatures) run by ai-edge-litert: numpy only, no torch.

The KV cache lives here as numpy arrays, passed into every signature call and replaced by its
outputs. A prompt is fed through the largest `prefill_<N>` that fits what is left, and the rest
through `decode`, so no padding ever enters the cache. (Passing the cache through Python costs
a copy of it per call: LiteRT-LM keeps it native; this runner is for validation and the CLI.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import EdgeError


class TfliteRunner:
    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise EdgeError("running a .tflite needs ai-edge-litert", hint="pip install ai-edge-litert==2.3.0") from e
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        sigs = self.interpreter.get_signature_list()
        if "decode" not in sigs:
            raise EdgeError(f"{path} has no `decode` signature", hint="export it with `edge export --backend litert`")
        self.signatures = {name: self.interpreter.get_signature_runner(name) for name in sigs}
        self.prefill_lengths = sorted((int(n.split("_", 1)[1]) for n in sigs if n.startswith("prefill_")), reverse=True)
        inputs = self.signatures["decode"].get_input_details()
        self.kv_names = sorted(n for n in inputs if n.startswith("kv_cache_"))
        self._kv_spec = {n: (tuple(inputs[n]["shape"]), inputs[n]["dtype"]) for n in self.kv_names}
        self.max_seq_len = int(inputs[self.kv_names[0]]["shape"][2])
        self.vocab_size = int(self.signatures["decode"].get_output_details()["logits"]["shape"][-1])
        self.reset()

    def reset(self) -> None:
        self.kv = {n: np.zeros(shape, dtype) for n, (shape, dtype) in self._kv_spec.items()}
        self.pos = 0

    def _run(self, signature: str, ids: list[int]) -> np.ndarray:
        n = len(ids)
        if self.pos + n > self.max_seq_len:
            raise EdgeError(
                f"the context is full: {self.pos + n} tokens > max_seq_len {self.max_seq_len}",
                hint="export with a larger --max-seq-len, or use a shorter prompt",
            )
        out = self.signatures[signature](
            tokens=np.asarray([ids], dtype=np.int32),
            input_pos=np.arange(self.pos, self.pos + n, dtype=np.int32),
            **self.kv,
        )
        self.kv = {name: out[name] for name in self.kv_names}
        self.pos += n
        return out["logits"].reshape(-1)  # [1, 1, V]: the last position's

    def prefill(self, ids: list[int]) -> np.ndarray:
        logits, i = None, 0
        while i < len(ids):
            n = next((n for n in self.prefill_lengths if n <= len(ids) - i), 1)
            logits = self._run(f"prefill_{n}" if n > 1 else "decode", ids[i : i + n])
            i += n
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self._run("decode", [token])
