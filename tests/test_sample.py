"""Calibration sampled from the model itself (edge/quant/sample.py): seeded, batch-independent, cache put back."""

import torch

from conftest import tiny_config
from edge.models.config import Family
from edge.models.gemma import Gemma
from edge.quant.sample import sample_sequences


def _model():
    cfg = tiny_config(Family.GEMMA3)
    torch.manual_seed(0)
    model = Gemma(cfg, max_seq_len=64).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model.setup_cache(64)
    return model, cfg


@torch.no_grad()
def test_sampling_is_seeded_and_leaves_the_model_as_it_was():
    model, cfg = _model()
    ids = torch.tensor([[2, 17, 40, 99]])
    before = model(ids, torch.tensor([0]))
    a = sample_sequences(model, bos=2, n=5, length=20, top_k=8, seed=1)
    b = sample_sequences(model, bos=2, n=5, length=20, top_k=8, seed=1)
    c = sample_sequences(model, bos=2, n=5, length=20, top_k=8, seed=2)
    assert a == b and a != c
    assert len(a) == 5 and all(len(s) == 20 and s[0] == 2 for s in a)
    assert all(0 <= t < cfg.vocab_size for s in a for t in s)
    assert len({tuple(s) for s in a}) == 5  # the rows of the batch are different samples
    model.reset_cache()
    assert torch.equal(model(ids, torch.tensor([0])), before)  # batch-1 cache of the same length is back


@torch.no_grad()
def test_each_pick_is_among_the_models_top_k():
    """Replaying a sampled sequence: every next token is one of the top_k the model gave at that step."""
    model, _ = _model()
    (seq,) = sample_sequences(model, bos=2, n=1, length=16, top_k=3, seed=0)
    model.reset_cache()
    logits = model(torch.tensor([seq]), torch.tensor([0]), all_logits=True)[0]
    for t in range(len(seq) - 1):
        assert seq[t + 1] in torch.topk(logits[t], 3).indices.tolist()
