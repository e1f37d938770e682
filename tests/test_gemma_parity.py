"""Our decoder vs transformers' Gemma / Gemma2 / Gemma3 on tiny random configs with identical weights."""

import pytest
import torch

from conftest import tiny_config
from edge.models.config import Family
from edge.models.gemma import Gemma
from edge.models.reference import build_reference
from edge.models.weights import assign, random_tensors

TOL = 1e-4
T = 40  # > 4 sliding windows of 8: the window must hold on every position


def _pair(cfg, seed=0, max_seq_len=64):
    tensors = random_tensors(cfg, seed)
    ours = Gemma(cfg, max_seq_len=max_seq_len).eval()
    assign(ours, tensors, "random")
    return ours, build_reference(cfg, tensors)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_full_sequence_matches_transformers(family, n_kv_heads):
    cfg = tiny_config(family, n_kv_heads=n_kv_heads)
    ours, ref = _pair(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    want = ref(tokens).logits
    got = ours(tokens, torch.tensor([0]), all_logits=True)
    assert got.shape == want.shape == (1, T, cfg.vocab_size)
    assert (got - want).abs().max().item() < TOL


def test_prefill_then_decode_matches_full_forward(family):
    cfg = tiny_config(family, n_kv_heads=2)
    ours, ref = _pair(cfg, seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(2))
    want = ref(tokens).logits[0]  # (T, V)
    prefill = 5
    got = [ours(tokens[:, :prefill], torch.tensor([0]), all_logits=True)[0]]
    for t in range(prefill, T):  # one token at a time through the cache, past the window
        got.append(ours(tokens[:, t : t + 1], torch.tensor([t]))[0:1])
    got = torch.cat(got)
    assert (got - want).abs().max().item() < TOL


def test_last_position_logits_equal_all_logits_tail(family):
    cfg = tiny_config(family)
    ours, _ = _pair(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    full = ours(tokens, torch.tensor([0]), all_logits=True)
    ours.reset_cache()
    last = ours(tokens, torch.tensor([0]))
    assert (full[:, -1] - last).abs().max() < 1e-5


def test_sliding_window_is_load_bearing():
    """A model that ignores the window must disagree with the reference: the parity tests can fail."""
    cfg = tiny_config(Family.GEMMA3)
    tensors = random_tensors(cfg)
    ref = build_reference(cfg, tensors)
    wrong = Gemma(cfg.replace(sliding_window=10_000), max_seq_len=64).eval()
    assign(wrong, tensors, "random")
    tokens = torch.randint(0, cfg.vocab_size, (1, T))
    delta = (wrong(tokens, torch.tensor([0]), all_logits=True) - ref(tokens).logits).abs()
    assert delta[:, : cfg.sliding_window].max() < TOL  # identical inside the window
    assert delta[:, cfg.sliding_window :].max() > 100 * TOL  # and different past it


def test_softcap_bounds_gemma2_logits():
    cfg = tiny_config(Family.GEMMA2)
    tensors = {k: v * 50 for k, v in random_tensors(cfg).items()}  # large weights: logits want to exceed the cap
    ours = Gemma(cfg, max_seq_len=64).eval()
    assign(ours, tensors, "random")
    logits = ours(torch.randint(0, cfg.vocab_size, (1, 10)), torch.tensor([0]), all_logits=True)
    assert logits.abs().max() <= cfg.final_softcap
