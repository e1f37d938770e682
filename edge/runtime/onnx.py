"""An .onnx (edge/targets/onnx.py's graph) run by onnxruntime: numpy only, no torch.

One graph serves prefill (T tokens) and decode (1 token); the KV cache lives here as numpy
arrays, fed as past_* and replaced by present_*.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import EdgeError


class OnnxRunner:
    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise EdgeError("running an .onnx needs onnxruntime", hint="pip install onnxruntime") from e
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = sorted(n for n in inputs if n.startswith("past_"))
        if "tokens" not in inputs or not self.past:
            raise EdgeError(
                f"{path} is not a gemma-edge ONNX graph", hint="export it with `edge export --backend onnx`"
            )
        self.present = ["present_" + n.removeprefix("past_") for n in self.past]
        self._kv_shape = [int(d) for d in inputs[self.past[0]].shape]
        self.max_seq_len = self._kv_shape[2]
        self.vocab_size = int(self.session.get_outputs()[0].shape[-1])
        self.max_T = self.max_seq_len - 1
        self.reset()

    def reset(self) -> None:
        self.kv = [np.zeros(self._kv_shape, np.float32) for _ in self.past]
        self.pos = 0

    def _run(self, ids: list[int]) -> np.ndarray:
        n = len(ids)
        if self.pos + n > self.max_seq_len:
            raise EdgeError(
                f"the context is full: {self.pos + n} tokens > max_seq_len {self.max_seq_len}",
                hint="export with a larger --max-seq-len, or use a shorter prompt",
            )
        feed = {"tokens": np.asarray([ids], np.int64), "input_pos": np.arange(self.pos, self.pos + n, dtype=np.int64)}
        feed |= dict(zip(self.past, self.kv, strict=True))
        logits, *kv = self.session.run(["logits", *self.present], feed)
        self.kv, self.pos = kv, self.pos + n
        return logits[0]

    def prefill(self, ids: list[int]) -> np.ndarray:
        logits = None
        for i in range(0, len(ids), self.max_T):
            logits = self._run(ids[i : i + self.max_T])
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self._run([token])
