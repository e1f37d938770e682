"""GPTQ rounding (edge/quant/gptq.py): lower output error than round-to-nearest, same integers every time."""

from dataclasses import replace

import pytest
import torch

from conftest import random_calibration, tiny_config
from edge.models.config import Family
from edge.models.gemma import Gemma
from edge.quant.apply import quantize_model
from edge.quant.gptq import quantize_weight
from edge.quant.schemes import SCHEMES, Rounding, _w


def _problem(seed: int = 0, out_f: int = 48, in_f: int = 128, n: int = 512):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs with a few loud channels, as real activations have: where GPTQ earns its keep.
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    x = torch.randn(n, in_f, generator=g) @ mix
    x[:, :4] *= 8
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    return w, x


def _rtn(w: torch.Tensor, group: int) -> torch.Tensor:
    wg = w.reshape(w.shape[0], -1, group)
    s = (wg.abs().amax(-1, keepdim=True) / 7.5).to(torch.bfloat16).float()
    return (torch.clamp(torch.round(wg / s), -8, 7) * s).reshape(w.shape)


def test_gptq_has_lower_output_error_than_round_to_nearest():
    w, x = _problem()
    q, s = quantize_weight(w, x.double().T @ x.double(), bits=4, group=32)
    wq = (q.float().reshape(q.shape[0], -1, 32) * s[..., None]).reshape(w.shape)
    err_gptq = (x @ (w - wq).T).pow(2).mean()
    err_rtn = (x @ (w - _rtn(w, 32)).T).pow(2).mean()
    print(f"output MSE: rtn {err_rtn:.3e}, gptq {err_gptq:.3e}")
    assert err_gptq < 0.7 * err_rtn
    assert q.min() >= -8 and q.max() <= 7
    assert torch.equal(s, s.to(torch.bfloat16).float())  # scales as XNNPACK stores them


def test_gptq_is_deterministic():
    w, x = _problem(seed=1)
    h = x.double().T @ x.double()
    a, b = quantize_weight(w, h, 4, 32), quantize_weight(w, h, 4, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gptq_never_fires_on_unused_inputs():
    """An input channel that calibration never activates carries no information: no NaN, weights still on the grid."""
    w, x = _problem(seed=2)
    x[:, 7] = 0
    q, s = quantize_weight(w, x.double().T @ x.double(), 4, 32)
    assert torch.isfinite(s).all() and q.abs().max() <= 8


@pytest.mark.parametrize("act", ["dynamic-int8", "float"])
def test_a_gptq_scheme_installs_its_own_integers(act):
    """torchao gets GPTQ's scale as custom_scale: the module's integers are GPTQ's, bit for bit."""
    from edge.quant.schemes import Act

    cfg = tiny_config(Family.GEMMA3)
    torch.manual_seed(0)
    model = Gemma(cfg, max_seq_len=64).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    calib = random_calibration(cfg.vocab_size)
    scheme = replace(SCHEMES["rtn-int4"], name="t", linear=_w(4, 32, Rounding.GPTQ, Act(act)))
    assert scheme.calibrated
    fp32 = model.layers[0].attn.wq.weight.detach().clone()
    with torch.no_grad():
        cov = quantize_model(model, scheme, calib)
    w = model.layers[0].attn.wq.weight
    assert w.qdata.min() >= -8 and w.qdata.max() <= 7
    deq = w.dequantize()
    assert torch.equal(
        deq, (w.qdata.float().reshape(w.shape[0], -1, 32) * w.scale.reshape(w.shape[0], -1, 1)).reshape(w.shape)
    )
    assert 0 < (deq - fp32).abs().max() < fp32.abs().max()  # quantized, and near the original
    rows = {r["name"]: r for r in cov}
    assert rows["layers.0.attn.wq"]["rounding"] == "gptq" and "rounding" not in rows["lm_head"]
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(Gemma(cfg, max_seq_len=64).eval(), scheme, None)


def test_gptq_scale_search_never_loses_to_the_absmax_scale():
    """Each row of each group takes the scale with the least activation-weighted error; 1.0 is a candidate."""
    from edge.quant.gptq import CLIP

    assert CLIP[0] == 1.0 and len(CLIP) > 1
    w, x = _problem(seed=3)
    h = x.double().T @ x.double()
    out = {}
    for name, clip in (("absmax", (1.0,)), ("search", CLIP)):
        q, s = quantize_weight(w, h, 4, 32, clip=clip)
        wq = (q.float().reshape(q.shape[0], -1, 32) * s[..., None]).reshape(w.shape)
        out[name] = (x @ (w - wq).T).pow(2).mean().item()
    print(out)
    assert out["search"] < out["absmax"]


@pytest.mark.parametrize("family", [Family.GEMMA3, Family.GEMMA2])
def test_replaying_block_inputs_gives_the_prefix_passes_integers(family, monkeypatch):
    """Layer i's Hessians from block i alone on the replayed inputs == from a model pass up to block i."""
    from edge.quant import gptq

    cfg = tiny_config(family)
    scheme = replace(SCHEMES["rtn-int4"], name="t", linear=_w(4, 32, Rounding.GPTQ))
    out = {}
    for replay in (True, False):
        monkeypatch.setattr(gptq, "REPLAY", replay)
        torch.manual_seed(0)
        model = Gemma(cfg, max_seq_len=64).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.05)
        with torch.no_grad():
            quantize_model(model, scheme, random_calibration(cfg.vocab_size))
        out[replay] = [
            model.layers[i].get_submodule(n).weight.qdata.clone()
            for i in range(cfg.n_layers)
            for n in ("attn.wq", "attn.wo", "mlp.down")
        ]
    assert all(torch.equal(a, b) for a, b in zip(out[True], out[False], strict=True))


def test_a_scheme_turns_the_scale_search_on():
    """Scheme.gptq_scale_search reaches GPTQ: the same model and text give other scales with it than without."""
    cfg = tiny_config(Family.GEMMA3)
    scales = {}
    for search in (False, True):
        torch.manual_seed(0)
        model = Gemma(cfg, max_seq_len=64).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.05)
        scheme = replace(SCHEMES["rtn-int4"], name="t", linear=_w(4, 32, Rounding.GPTQ), gptq_scale_search=search)
        with torch.no_grad():
            quantize_model(model, scheme, random_calibration(cfg.vocab_size))
        scales[search] = model.layers[0].mlp.up.weight.scale.clone()
    absmax_like = scales[False]
    assert not torch.equal(scales[True], absmax_like)
    # It shrinks scales (GPTQ's error updates move each later group's absmax, so not every one).
    assert (scales[True] / absmax_like).mean() < 0.99
