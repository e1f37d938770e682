"""The re-authored model run eagerly in torch: the `re-authored` and `quantized` stages."""

from __future__ import annotations

import numpy as np
import torch


class EagerRunner:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.max_seq_len = model.max_seq_len
        self.vocab_size = model.cfg.vocab_size
        self.pos = 0

    def reset(self) -> None:
        self.model.reset_cache()
        self.pos = 0

    @torch.no_grad()
    def _forward(self, ids: list[int]) -> np.ndarray:
        tokens = torch.tensor([ids], dtype=torch.int64)
        logits = self.model(tokens, torch.tensor([self.pos], dtype=torch.int64))  # (1, V)
        self.pos += len(ids)
        return logits[0].float().numpy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self._forward(ids)

    def decode(self, token: int) -> np.ndarray:
        return self._forward([token])

    @torch.no_grad()
    def all_logits(self, ids: list[int], chunk: int | None = None) -> np.ndarray:
        """Logits at every position of one sequence (T, V), from an empty cache (for validation).

        chunk: feed the sequence `chunk` tokens per call through the cache (the same model, other
        matmul shapes: what its float rounding alone moves); default, all at once."""
        self.reset()
        chunk = chunk or len(ids)
        out = [
            self.model(torch.tensor([ids[a : a + chunk]]), torch.tensor([a]), all_logits=True)[0]
            for a in range(0, len(ids), chunk)
        ]
        self.pos = len(ids)
        return torch.cat(out).float().numpy()
