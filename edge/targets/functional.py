"""The model with its KV cache passed in and out: what LiteRT and ONNX programs need.

ExecuTorch keeps the cache inside the program as mutable buffers; a .tflite signature or an
ONNX graph is a function, so the cache is an input and the written cache an output. The model
itself is unchanged: Gemma.forward takes `caches`, one object per layer with KVCache.update's
contract, and PassedKV writes out of place with the backend's own write op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Write = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (cache, pos, new) -> cache


def metadata(cfg, max_seq_len: int, bos_id: int, eos_ids: list[int], vocab: int, dynamic: bool) -> dict:
    """What a functional program's runner needs, stored in the manifest (no constant methods there)."""
    return {
        "max_seq_len": max_seq_len,
        "vocab_size": vocab,
        "bos_id": bos_id,
        "eos_ids": list(eos_ids),
        "n_layers": cfg.n_layers,
        "kv_shape": [1, cfg.n_kv_heads, max_seq_len, cfg.head_dim],
    }


def scatter_write(cache: torch.Tensor, pos: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """index_copy along dim 2 as one ScatterElements in ONNX: index_copy exports as a ScatterND between two
    transposes of the whole cache, for every layer's k and v at every step."""
    return cache.scatter(2, pos.view(1, 1, -1, 1).expand_as(new), new)


class PassedKV:
    """One layer's cache passed in as tensors; update() returns the written copy (no mutation)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, write: Write) -> None:
        self.k, self.v, self.write = k, v, write

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k, self.v = self.write(self.k, pos, k), self.write(self.v, pos, v)
        return self.k, self.v


def functional_step(model, vocab: int, tokens, input_pos, flat_kv: list, write: Write) -> tuple:
    """tokens (1, T), input_pos (T,) consecutive, flat_kv [k_0, v_0, k_1, ...] -> (logits (1, vocab), new flat_kv).

    Logits are padded with -inf up to `vocab` (the tokenizer may know more ids than the head)."""
    caches = [PassedKV(flat_kv[2 * i], flat_kv[2 * i + 1], write) for i in range(len(model.layers))]
    logits = model(tokens.long(), input_pos[:1].long(), caches=caches)
    if logits.shape[-1] < vocab:
        pad = torch.full((logits.shape[0], vocab - logits.shape[-1]), float("-inf"), dtype=logits.dtype)
        logits = torch.cat([logits, pad], dim=-1)
    return logits, [t for c in caches for t in (c.k, c.v)]
