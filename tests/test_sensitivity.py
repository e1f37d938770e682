"""Per-tensor sensitivity (edge/quant/sensitivity.py): a deliberately fragile tensor is ranked first."""

import torch
from test_export_executorch import tiny_model

from conftest import random_calibration
from edge.quant.sensitivity import sensitivity


def test_a_fragile_tensor_ranks_first_and_the_model_is_left_alone():
    model = tiny_model(n_kv_heads=2, seed=3)
    fragile = "layers.2.mlp.up"
    # Outlier columns that the fp32 model never feels (the norm zeroes their input channels) but that
    # take every int4 group's scale: rounded alone, this tensor loses all its other weights.
    cols = [5, 40]  # one in each group of 32
    model.layers[2].mlp_norm.weight[cols] = -1.0  # Gemma's norm multiplies by (1 + w): these channels are 0
    w = model.get_submodule(fragile).weight
    w[:, cols] = 50 * w.abs().max()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("layers.")]
    before = {n: model.get_submodule(n).weight.clone() for n in names}
    kld = sensitivity(model, random_calibration(model.cfg.vocab_size), names)
    ranked = sorted(kld, key=kld.get, reverse=True)
    assert ranked[0] == fragile, [(n, round(kld[n], 5)) for n in ranked[:3]]
    assert all(v >= 0 for v in kld.values())
    assert all(torch.equal(model.get_submodule(n).weight, before[n]) for n in names)
