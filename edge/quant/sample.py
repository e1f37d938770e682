"""Calibration text sampled from the fp32 model itself: more activations for GPTQ's Hessians.

The shipped calibration texts (edge/quant/smooth.py) are ~800 tokens: enough for SmoothQuant's
per-channel ranges, thin for GPTQ, whose Hessian per linear is (in x in) (640 x 640 on the 270M;
GPTQ's paper uses 128 x 2048 tokens). Text the model writes from BOS is what its activations look
like in use, ships with nothing and cannot overlap the golden prompts by construction (it is sampled,
and tests/test_sample.py checks the 32-token windows anyway).

Deterministic: top-k over the logits, then numpy's seeded generator picks from the float64 softmax;
a float difference at the 1e-6 level between machines moves a pick only when a uniform draw lands
within that distance of a cumulative-probability boundary.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

N_SEQS = 32  # sequences, sampled as one batch
LENGTH = 128  # tokens per sequence, BOS included
TOP_K = 40
SEED = 1  # not edge/quant/auto.py's EVAL_SEED (0): its held-out text must stay unseen by GPTQ


@torch.no_grad()
def sample_sequences(
    model: nn.Module,
    bos: int,
    n: int = N_SEQS,
    length: int = LENGTH,
    top_k: int = TOP_K,
    seed: int = SEED,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """n sequences of `length` ids (at most the model's cache), BOS then what `model` samples (top-k, temperature 1).

    Uses the model's own KV cache at batch n and puts back a batch-1 cache of the same length.
    """
    max_seq_len = model.max_seq_len
    length = min(length, max_seq_len)  # a model with a shorter cache gets shorter sequences
    rng = np.random.default_rng(seed)
    model.setup_cache(max_seq_len, max_batch=n)
    try:
        seqs = np.full((n, length), bos, dtype=np.int64)
        for t in range(length - 1):
            logits = model(torch.from_numpy(seqs[:, t : t + 1]), torch.tensor([t])).double()  # (n, V)
            top, idx = torch.topk(logits, top_k, dim=-1)  # sorted, ties by index: deterministic
            p = torch.softmax(top, dim=-1).numpy()
            cdf = np.cumsum(p, axis=1)
            u = rng.random(n) * cdf[:, -1]
            pick = np.minimum((cdf < u[:, None]).sum(1), top_k - 1)
            seqs[:, t + 1] = idx.numpy()[np.arange(n), pick]
            if progress:
                progress(t + 1, length - 1)
    finally:
        model.setup_cache(max_seq_len, max_batch=1)
    return seqs.tolist()
