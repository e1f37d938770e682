"""Runners: one protocol for every way a model runs (eager torch, .pte, .tflite, .onnx).

A runner owns its KV cache. prefill(ids) consumes a prompt and returns the last position's
logits; decode(id) consumes one token and returns its logits; reset() empties the cache.
Logits are numpy float32 (V,). Runners of device formats must not import torch.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runner(Protocol):
    max_seq_len: int
    vocab_size: int

    def reset(self) -> None: ...

    def prefill(self, ids: list[int]) -> np.ndarray: ...

    def decode(self, token: int) -> np.ndarray: ...


def replay(runner: Runner, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits at every position (T, V): the runner sees ids one at a time.

    Runners return only the last position's logits (what phones need), so validation feeds the
    golden ids through decode, exactly as generation would, and keeps every step's logits.
    """
    runner.reset()
    out = np.empty((len(ids), runner.vocab_size), dtype=np.float32)
    out[0] = runner.prefill(ids[:1])
    for t in range(1, len(ids)):
        out[t] = runner.decode(ids[t])
    return out
