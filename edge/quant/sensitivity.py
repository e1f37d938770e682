"""Per-tensor sensitivity: how much the model's output moves when only one linear is quantized.

For each named linear, its weight alone is rounded (symmetric, `bits`, groups of `group`, round to
nearest) while everything else stays fp32, and the mean KLD of the next-token distributions against
the fp32 model is measured over the calibration text (edge/quant/smooth.py, disjoint from the
golden prompts). This ranks where bits matter: the int4 scheme's choice of which linears go to 4
bits (edge/quant/schemes.py, INT4_GATES) comes from this ranking on the 270M
(`python benchmarks/sensitivity.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from edge.quant.smooth import fake_quant_weight


def _log_probs(model: nn.Module, calib: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    from edge.runtime.eager import EagerRunner

    runner = EagerRunner(model)
    # As SmoothQuant's capture: a sequence longer than the model's KV cache is cut to it.
    cut = [list(ids)[: model.max_seq_len] for ids in calib]
    return [torch.log_softmax(torch.from_numpy(runner.all_logits(ids)), -1) for ids in cut]


def _kld(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    total = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(ref, got, strict=True))
    return total / sum(p.shape[0] for p in ref)


def sensitivity(
    model: nn.Module,
    calib: Sequence[Sequence[int]],
    names: Sequence[str],
    bits: int = 4,
    group: int | None = 32,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """name -> mean KLD (nats) vs the fp32 model when only that linear is rounded. The model is left as it was."""
    ref = _log_probs(model, calib)
    out = {}
    for i, name in enumerate(names):
        lin = model.get_submodule(name)
        w = lin.weight
        lin.weight = nn.Parameter(fake_quant_weight(w.detach(), bits, group), requires_grad=False)
        try:
            out[name] = _kld(ref, _log_probs(model, calib))
        finally:
            lin.weight = w
        if progress:
            progress(i + 1, len(names))
    return out
