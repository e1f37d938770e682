"""SmoothQuant folding: exact in fp32, and it shrinks the 8da error where activations have outliers."""

import pytest
import torch

from conftest import random_calibration, tiny_config
from edge.models.config import Family
from edge.models.gemma import Gemma
from edge.models.weights import assign, random_tensors
from edge.quant import smooth
from edge.quant.apply import quantize_model
from edge.quant.schemes import SCHEMES


def outlier_model(family=Family.GEMMA3, seed=0) -> Gemma:
    """A tiny Gemma whose norms feed a few huge channels into the linears, as real Gemmas do."""
    cfg = tiny_config(family, n_kv_heads=2)
    m = Gemma(cfg, max_seq_len=64).eval()
    assign(m, random_tensors(cfg, seed=seed), "random")
    g = torch.Generator().manual_seed(seed)
    for norm in [*(b.attn_norm for b in m.layers), *(b.mlp_norm for b in m.layers), m.norm]:
        w = norm.weight.detach().clone()
        w[torch.randperm(cfg.dim, generator=g)[:3]] = 40.0  # (1 + 40): 3 outlier channels per norm
        norm.weight = torch.nn.Parameter(w, requires_grad=False)
    return m


def logits(m: Gemma, ids: list[int]) -> torch.Tensor:
    m.reset_cache()
    return m(torch.tensor([ids]), torch.tensor([0]), all_logits=True)[0]


@pytest.mark.parametrize("family", [Family.GEMMA1, Family.GEMMA2, Family.GEMMA3])
def test_folding_keeps_the_fp32_function(family):
    m = outlier_model(family)
    ids = random_calibration(m.cfg.vocab_size, n=1, length=40, seed=9)[0]
    want = logits(m, ids)
    report = smooth.smooth(m, random_calibration(m.cfg.vocab_size), weight_bits=8, group_size=None)
    got = logits(m, ids)
    assert any(r["alpha"] is not None for r in report.values())  # something was folded
    assert (got - want).abs().max() < 1e-3 * want.abs().max(), (got - want).abs().max()
    assert m.lm_head.weight is not m.embed.weight  # the head got its own (scaled) copy


def test_smoothing_reduces_the_8da8w_error_on_outlier_activations():
    calib = random_calibration(256)
    m = outlier_model()
    report = smooth.smooth(m, calib, weight_bits=8, group_size=None)
    # the sites fed by the outlier norms: q/k/v, gate/up and the head
    fed = [r for name, r in report.items() if name.endswith(("qkv", "gate_up", "lm_head"))]
    assert len(fed) == 2 * len(m.layers) + 1
    assert all(r["err_after"] < 0.5 * r["err_before"] for r in fed), fed
    assert all(r["err_after"] <= r["err_before"] for r in report.values())  # never worse: identity is a candidate
    rows = quantize_model(outlier_model(), SCHEMES["int4-hqq"], calib)
    by_name = {r["name"]: r for r in rows}
    assert "smoothquant" in by_name["layers.0.attn.wk"] and "smoothquant" in by_name["lm_head"]


def test_a_smoothing_scheme_needs_calibration():
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(outlier_model(), SCHEMES["int4-hqq"])


def test_calibration_text_is_not_golden_text():
    from edge.validate.prompts import GOLDEN_PROMPTS

    golden = " ".join(text for text, _ in GOLDEN_PROMPTS.values())
    for text in smooth.CALIBRATION_TEXTS:
        for i in range(0, len(text) - 40, 40):
            assert text[i : i + 40] not in golden
