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


class Reference:
    """The fp32 model's next-token distributions on `texts`, held for the mean KLD of many models against it
    (the sensitivity scan and auto's search score dozens on the same text, over the whole vocabulary).
    Its probabilities are computed once; a model then costs its logits, a logsumexp and a row-wise product:
    per position KLD = P . (l_ref - l) + lse(l) - lse(l_ref), the small difference taken before the sum."""

    def __init__(self, model: nn.Module, texts: Sequence[Sequence[int]]) -> None:
        from edge.runtime.eager import EagerRunner

        runner = EagerRunner(model)
        # As SmoothQuant's capture: a sequence longer than the model's KV cache is cut to it.
        self.texts = [list(ids)[: model.max_seq_len] for ids in texts]
        self.logits = [torch.from_numpy(runner.all_logits(ids)) for ids in self.texts]
        self.lse = [torch.logsumexp(lg, -1) for lg in self.logits]
        self.probs = [(lg - s[:, None]).exp() for lg, s in zip(self.logits, self.lse, strict=True)]
        self.positions = sum(lg.shape[0] for lg in self.logits)

    def kld(self, model: nn.Module) -> float:
        from edge.runtime.eager import EagerRunner

        runner, total = EagerRunner(model), 0.0
        for ids, ref, lse_ref, p in zip(self.texts, self.logits, self.lse, self.probs, strict=True):
            lg = torch.from_numpy(runner.all_logits(ids))
            lse = torch.logsumexp(lg, -1)
            d = torch.sub(ref, lg, out=lg)  # l_ref - l, in place of l
            dot = torch.bmm(p.unsqueeze(1), d.unsqueeze(2)).flatten()
            total += float((dot + lse - lse_ref).double().sum())
        return total / self.positions


def sensitivity(
    model: nn.Module,
    calib: Sequence[Sequence[int]],
    names: Sequence[str],
    bits: int = 4,
    group: int | None = 32,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """name -> mean KLD (nats) vs the fp32 model when only that linear is rounded. The model is left as it was."""
    ref = Reference(model, calib)
    out = {}
    for i, name in enumerate(names):
        lin = model.get_submodule(name)
        w = lin.weight
        lin.weight = nn.Parameter(fake_quant_weight(w.detach(), bits, group), requires_grad=False)
        try:
            out[name] = ref.kld(model)
        finally:
            lin.weight = w
        if progress:
            progress(i + 1, len(names))
    return out
