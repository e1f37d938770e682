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
    def all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of one sequence (T, V), from an empty cache (for validation)."""
        self.reset()
        out = self.model(torch.tensor([ids], dtype=torch.int64), torch.tensor([0]), all_logits=True)
        self.pos = len(ids)
        return out[0].float().numpy()
