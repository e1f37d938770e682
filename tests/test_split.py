"""Grouped int8 through column slices (edge/quant/split.py): same function in fp32, groups in effect."""

import pytest
import torch
from torch import nn

from conftest import random_calibration
from edge.models.gemma import lookup
from edge.quant.apply import quantize_model
from edge.quant.schemes import SCHEMES
from edge.quant.split import ActResidual, ColumnSplitLinear, split_linears


def test_split_linear_computes_the_same_product():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 48, bias=False)
    lin.weight.data = torch.randn(48, 256, generator=g)
    x = torch.randn(2, 5, 256, generator=g)
    split = ColumnSplitLinear(lin, 64)
    assert len(split.parts) == 4 and split.parts[1].weight.shape == (48, 64)
    torch.testing.assert_close(split(x), lin(x), rtol=1e-5, atol=1e-5)


def test_split_refuses_what_it_cannot_split():
    with pytest.raises(ValueError, match="divisible by 64"):
        ColumnSplitLinear(nn.Linear(100, 8, bias=False), 64)
    with pytest.raises(ValueError, match="needs no bias"):
        ColumnSplitLinear(nn.Linear(128, 8, bias=True), 64)


def test_split_linears_replaces_only_the_named_ones():
    m = nn.Sequential(nn.Linear(128, 8, bias=False), nn.Linear(8, 128, bias=False))
    split_linears(m, {"0"}, 32)
    assert isinstance(m[0], ColumnSplitLinear) and isinstance(m[1], nn.Linear)


def test_grouped_int8_beats_per_channel_on_an_outlier_column():
    """Per-group scales are the point: one large column ruins a per-channel row scale, not a slice's."""
    from torchao.quantization import quantize_

    from edge.quant.apply import _torchao_config
    from edge.quant.schemes import Act, WeightQuant

    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=g) * 0.02
    w[:, 7] *= 200  # an outlier column, as SmoothQuant leaves them
    x = torch.randn(1, 9, 256, generator=g)
    errs = {}
    for name, group in (("per-channel", None), ("g64", 64)):
        m = nn.Sequential(nn.Linear(256, 32, bias=False))
        m[0].weight.data = w.clone()
        want = m(x)
        if group:
            split_linears(m, {"0"}, group)
        quantize_(m, _torchao_config(WeightQuant(8, None, Act.DYNAMIC_INT8), False))
        errs[name] = ((m(x) - want).norm() / want.norm()).item()
    assert errs["g64"] < 0.7 * errs["per-channel"], errs  # measured 0.026 vs 0.041


def test_int8_scheme_holds_its_grouped_sites_and_says_so():
    """The shared head in column slices (its rows are the lookup's); mlp.down, grouped too, on two
    4-bit planes (no slices: XNNPACK's partitioner takes none of a dynamic-shape input)."""
    from test_export_executorch import tiny_model

    from edge.quant.split import OffsetLinear, PlaneSum

    model = tiny_model()
    scheme = SCHEMES["int8"]
    rows = {r["name"]: r for r in quantize_model(model, scheme, random_calibration(model.cfg.vocab_size))}
    down_q = scheme.quant_for("layers.0.mlp.down")
    assert down_q.group and scheme.head.group  # the grouped sites of the scheme
    down = model.layers[0].mlp.down
    assert isinstance(down, OffsetLinear) and down.group == down_q.group
    assert isinstance(down.main, ActResidual) and isinstance(down.main.lin, PlaneSum)
    for plane in (down.main.lin.hi, down.main.lin.lo):  # grouped 4-bit weights, g = the scheme's
        assert plane.weight.block_size[-1] == down_q.group and -8 <= plane.weight.qdata.min()
    head = model.lm_head  # one residual for all its slices, each slice on its own scale
    assert isinstance(head, ActResidual) and head.group == scheme.head.group
    assert isinstance(head.lin, ColumnSplitLinear) and head.lin.group == scheme.head.group
    part = head.lin.parts[0]
    assert hasattr(part.weight, "scale") and part.weight.scale.numel() == part.out_features  # per channel
    wq = model.layers[0].attn.wq  # per channel: not split; its activations go in as x and residual rows
    assert isinstance(wq, ActResidual) and isinstance(wq.lin, nn.Linear)
    assert "residual" in rows["layers.0.mlp.down"]["activations"]
    assert "two 4-bit planes" in rows["layers.0.mlp.down"]["realized"]
    assert rows["layers.0.mlp.down"]["scheme"] == f"8da8w-g{down_q.group}-planes-rtn"
    assert "slices of" in rows["lm_head"]["realized"]
    assert rows["layers.0.attn.wq"]["scheme"] == "8da8w-per-channel-rtn" and "realized" not in rows["layers.0.attn.wq"]
    assert "realized" not in rows["embed"]


def test_overrides_pick_the_linears_they_name():
    from edge.quant.schemes import Act, Scheme, WeightQuant

    a, b, h = WeightQuant(8, None), WeightQuant(8, 128), WeightQuant(4, 32, Act.FLOAT)
    s = Scheme("x", "", a, h, None, None, overrides=(("mlp.down", b),))
    assert s.quant_for("layers.3.mlp.down") is b and s.quant_for("layers.3.mlp.up") is a
    assert s.quant_for("lm_head") is h


def test_slices_widen_to_keep_the_graph_small():
    from edge.quant.split import MAX_SLICES, slice_width

    assert slice_width(640, 32) == 32 and slice_width(2048, 128) == 128  # the 270M: as the scheme says
    assert slice_width(2304, 32) == 128 and slice_width(9216, 128) == 512  # gemma2-2b: widened
    for n, g in ((2304, 32), (9216, 128), (6912, 128), (1152, 32)):
        w = slice_width(n, g)
        assert n % w == 0 and w % g == 0 and n // w <= MAX_SLICES


@pytest.mark.parametrize("scheme", ["int8", "int4-hqq"])
def test_lookup_dequantizes_only_the_rows_read_to_the_same_values(scheme):
    """edge.models.gemma.lookup vs torchao's own embedding (which dequantizes the whole table)."""
    from test_export_executorch import tiny_model

    m = tiny_model(n_kv_heads=2, seed=7)
    quantize_model(m, SCHEMES[scheme], random_calibration(m.cfg.vocab_size))
    tables = getattr(m.embed, "parts", [m.embed])
    tokens = torch.tensor([[5, 9, 200, 5, 17], [0, 255, 3, 3, 1]])
    for t in tables:
        assert hasattr(t.weight, "qdata")  # a torchao integer table: the gathered path is the one tested
        got, want = lookup(t, tokens), t(tokens)
        assert got.shape == want.shape == (2, 5, t.embedding_dim)
        assert torch.equal(got, want)
