"""Source-grid transcoding (edge/quant/transcode.py): GGUF blocks read back exactly, Q4_K grids kept on 8da4w."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from test_export_executorch import lower, tiny_model

from conftest import random_calibration
from edge.quant.apply import quantize_model
from edge.quant.schemes import SCHEMES
from edge.quant.split import ColumnSplitLinear, OffsetLinear, PlaneSum
from edge.quant.transcode import BLOCK_BYTES, Grid, decode, rtn_grid, to_offset_linear, to_plane_linear
from edge.runtime import replay
from edge.runtime.eager import EagerRunner
from edge.runtime.pte import PteRunner
from edge.validate.metrics import full_kld

# Where each type keeps its fp16 scale(s) in a block: [(first byte, count)].
_F16_FIELDS = {"Q8_0": [(0, 1)], "Q5_0": [(0, 1)], "Q4_K": [(0, 2)], "Q6_K": [(208, 1)]}
_ELEMENTS = {"Q8_0": 32, "Q5_0": 32, "Q4_K": 256, "Q6_K": 256}


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid GGUF blocks: random bits everywhere, finite fp16 scales where the type has them: signed
    where ggml writes them signed (Q5_0 and Q6_K: d = max / -16, max / -32; half the 270M's are < 0),
    and one block of zeros (d = 0)."""
    rng = np.random.default_rng(seed)
    n = rows * cols // _ELEMENTS[kind]
    b = rng.integers(0, 256, (n, BLOCK_BYTES[kind]), dtype=np.uint8)
    for first, count in _F16_FIELDS[kind]:
        d = rng.uniform(1e-4, 1e-2, (n, count))
        if kind in ("Q5_0", "Q6_K"):
            d *= rng.choice([-1.0, 1.0], d.shape)
        d[0] = 0.0
        d = d.astype(np.float16)
        b[:, first : first + 2 * count] = d.view(np.uint8)
    return b.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0", "Q4_K", "Q6_K"])
def test_a_source_grid_round_trips_exactly(kind):
    rows, cols = 6, 512
    raw = random_blocks(kind, rows, cols)
    grid = decode(kind, raw, rows, cols)
    want = torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).reshape(rows, cols))
    assert torch.equal(grid.dequantize(), want)  # max |delta| = 0: the same floats, not merely close
    lo, hi = -(2 ** (grid.bits - 1)), 2 ** (grid.bits - 1) - 1
    assert grid.q.dtype == torch.int8 and lo <= grid.q.min() and grid.q.max() <= hi
    assert grid.scale.shape == (rows, cols // grid.group)


def q4k_grid(rows: int, cols: int, seed: int = 0) -> Grid:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, cols), generator=g, dtype=torch.int8)
    scale = torch.rand(rows, cols // 32, generator=g) * 0.02 + 0.005
    minimum = torch.rand(rows, cols // 32, generator=g) * 0.1
    return Grid("Q4_K", q, scale, 32, 4, minimum)


def _dequantized(main) -> torch.Tensor:
    if isinstance(main, PlaneSum):
        return _dequantized(main.hi) + _dequantized(main.lo)
    parts = main.parts if isinstance(main, ColumnSplitLinear) else [main]
    return torch.cat([p.weight.dequantize() for p in parts], dim=1)


def effective_weight(lin: OffsetLinear) -> torch.Tensor:
    return _dequantized(lin.main) + lin.offsets.repeat_interleave(lin.group, dim=1)


def test_an_offset_linear_keeps_the_q4k_integers():
    grid = q4k_grid(16, 128)
    lin = to_offset_linear(grid)
    assert torch.equal(lin.main.weight.qdata, grid.q)  # the source's integers, not re-rounded ones
    assert torch.equal(lin.main.weight.scale.reshape(grid.scale.shape), grid.scale.to(torch.bfloat16).float())
    want = grid.dequantize()
    err = (effective_weight(lin) - want).norm() / want.norm()
    assert err < 2e-3  # only the bf16 rounding of the group scales (2^-9 relative at most)
    x = torch.randn(3, 128)
    y = lin(x)
    assert ((y - x @ want.T).norm() / y.norm()) < 2e-2  # plus the dynamic int8 activations


def test_signed_and_zero_q4k_scales_are_held_positive():
    """XNNPACK refuses group scales <= 0 at load; a group with s < 0 or s = 0 is stored re-based."""
    grid = q4k_grid(16, 128)
    grid.scale = grid.scale.to(torch.bfloat16).float()  # bf16 values: held exactly
    grid.scale[:, ::3] *= -1
    grid.scale[0, 1] = 0.0
    lin = to_offset_linear(grid)
    assert lin.main.weight.scale.min() > 0
    want = grid.dequantize()
    assert (effective_weight(lin) - want).abs().max() < 1e-6 * want.abs().max()


def test_row_and_group_factors_move_into_the_scales():
    grid = q4k_grid(4, 64)
    r, c = torch.rand(4, 1) + 0.5, (torch.rand(2) + 0.5).repeat_interleave(32)
    lin = to_offset_linear(grid, grid.dequantize() * r * c)  # a producer's fold (rows), a consumer's (columns)
    assert torch.equal(lin.main.weight.qdata, grid.q)
    want = grid.dequantize() * r * c
    assert (effective_weight(lin) - want).norm() / want.norm() < 2e-3


def test_activation_slices_keep_the_grid_and_lower_exactly(tmp_path):
    """Scheme.source_act_slice: the same integers and scales, one dynamic activation scale per slice."""
    from executorch.runtime import Runtime

    from edge.targets import BACKENDS
    from edge.targets.executorch import lower_module

    grid = q4k_grid(16, 128)
    whole, sliced = to_offset_linear(grid), to_offset_linear(grid, act_slice=64)
    assert isinstance(sliced.main, ColumnSplitLinear) and len(sliced.main.parts) == 2
    assert torch.equal(torch.cat([p.weight.qdata for p in sliced.main.parts], 1), grid.q)
    assert torch.equal(effective_weight(sliced), effective_weight(whole))
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    x[:, :64] *= 30  # one slice's activations dwarf the other's: a whole-row scale is 30x coarse for the rest
    exact = x @ grid.dequantize().T
    # Whole row: the small slice's rounding error is as large as the big one's (total ~ sqrt(2) of it);
    # sliced it is 30x smaller (total ~ the big slice's alone): a ratio near 0.71, measured 0.74.
    assert (sliced(x) - exact).norm() < 0.85 * (whole(x) - exact).norm()
    path = tmp_path / "sliced.pte"
    path.write_bytes(lower_module(sliced, (x,), BACKENDS["xnnpack"]))
    got = Runtime.get().load_program(str(path)).load_method("forward").execute([x])[0]
    assert ((got - sliced(x)).norm() / sliced(x).norm()) < 1e-5
    with pytest.raises(ValueError, match="multiples of the group"):
        to_offset_linear(grid, act_slice=48)


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0"])
def test_a_q8_0_or_q5_0_grid_held_as_two_4bit_planes_round_trips_exactly(kind):
    """Issue 7's transcoding check: max |delta| = 0 where the scales are bf16 values (XNNPACK's)."""
    raw = random_blocks(kind, 8, 256, seed=3)
    grid = decode(kind, raw, 8, 256)
    assert grid.q.min() < -8 and grid.q.max() > 7  # needs more than one 4-bit plane
    grid.scale = grid.scale.to(torch.bfloat16).float()
    lin = to_plane_linear(grid)
    assert isinstance(lin.main, PlaneSum)
    for plane in (lin.main.hi, lin.main.lo):
        assert -8 <= plane.weight.qdata.min() and plane.weight.qdata.max() <= 7
        assert plane.weight.scale.min() > 0  # XNNPACK refuses others at load (signed Q5_0 d, a zero block)
    assert torch.equal(effective_weight(lin), grid.dequantize())
    # The GGUF's own fp16 scales: only their bf16 rounding (2^-9 relative at most), its mean in the offsets.
    fp16 = decode(kind, raw, 8, 256)
    want = fp16.dequantize()
    assert 0 < (effective_weight(to_plane_linear(fp16)) - want).norm() / want.norm() < 2e-3


def test_plane_linears_lower_exactly_and_rtn_grids_take_them_too(tmp_path):
    from executorch.runtime import Runtime

    from edge.targets import BACKENDS
    from edge.targets.executorch import lower_module

    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(2))
    grid = rtn_grid(w, 32)
    assert grid.q.abs().max() == 127 and (grid.dequantize() - w).abs().max() <= grid.scale.max() / 2 + 1e-7
    # As ggml writes Q5_0: half the groups with d < 0 (the same weights, q negated). XNNPACK refuses a
    # scale <= 0 at load ("Failed to define tensor": the 270M's int8 .pte did not load); held positive.
    flip = torch.rand(grid.scale.shape, generator=torch.Generator().manual_seed(5)) < 0.5
    grid.scale = torch.where(flip, -grid.scale, grid.scale)
    grid.q = torch.where(flip.repeat_interleave(32, dim=1), -grid.q, grid.q)
    assert torch.equal(grid.dequantize(), rtn_grid(w, 32).dequantize())
    lin = to_plane_linear(grid, act_slice=64)
    assert isinstance(lin.main.hi, ColumnSplitLinear)  # each plane sliced alike
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    assert ((lin(x) - x @ w.T).norm() / (x @ w.T).norm()) < 2e-2  # int8 g32 weights, int8 activations
    path = tmp_path / "planes.pte"
    path.write_bytes(lower_module(lin, (x,), BACKENDS["xnnpack"]))
    got = Runtime.get().load_program(str(path)).load_method("forward").execute([x])[0]
    assert ((got - lin(x)).norm() / lin(x).norm()) < 1e-5
    with pytest.raises(ValueError, match="groups of a multiple of 32"):
        to_plane_linear(rtn_grid(w, 16))


def test_a_fold_that_breaks_the_grid_is_refused():
    grid = q4k_grid(4, 64)
    c = torch.ones(64)
    c[3] = 2.0  # not constant within its group of 32
    with pytest.raises(ValueError, match="not its source grid scaled per group"):
        to_offset_linear(grid, grid.dequantize() * c)


def grid_model():
    """A tiny model whose attn.wo weights sit on Q4_K grids, and those grids."""
    model = tiny_model(n_kv_heads=2, seed=5)
    grids = {}
    for i, layer in enumerate(model.layers):
        w = layer.attn.wo.weight
        grids[f"layers.{i}.attn.wo"] = grid = q4k_grid(*w.shape, seed=i)
        layer.attn.wo.weight = torch.nn.Parameter(grid.dequantize(), requires_grad=False)
    return model, grids


def test_int4_keeps_q4k_sources_exact_under_smoothing():
    model, grids = grid_model()
    rows = {r["name"]: r for r in quantize_model(model, SCHEMES["int4"], random_calibration(256), grids=grids)}
    for name, grid in grids.items():
        r = rows[name]
        assert r["scheme"] == "8da4w-g32-source-Q4_K", r
        lin = model.get_submodule(name)
        assert isinstance(lin, OffsetLinear) and torch.equal(lin.main.weight.qdata, grid.q)
        sq = r["smoothquant"]
        assert sq["group_constant"] == 32
        if sq["alpha"] is not None:  # smoothed: the grid's scales carry the column factors
            assert not torch.equal(
                lin.main.weight.scale.reshape(grid.scale.shape), grid.scale.to(torch.bfloat16).float()
            )
    assert rows["layers.0.attn.wq"]["scheme"] == "8da4w-g32-gptq"  # no source grid: GPTQ int4
    assert rows["layers.0.mlp.up"]["scheme"] == "8da8w-per-channel-rtn"


def test_without_grids_int4_rounds_wo_with_gptq():
    model = tiny_model(n_kv_heads=2, seed=5)
    rows = {r["name"]: r for r in quantize_model(model, SCHEMES["int4"], random_calibration(256))}
    assert rows["layers.0.attn.wo"]["scheme"] == "8da4w-g32-gptq"
    assert rows["embed"].get("shared_with")


@pytest.mark.full  # CI lowers the real 270M's transcoded int4 (tests/test_real_export.py); ~4 min here
def test_a_transcoded_model_lowers_without_error(tmp_path):
    model, grids = grid_model()
    quantize_model(model, SCHEMES["int4"], random_calibration(256), grids=grids)
    path, low = lower(model, tmp_path)
    ids = [int(i) for i in torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))]
    want, got = replay(EagerRunner(model), ids), replay(PteRunner(path), ids)
    assert full_kld(want, got).mean() < SCHEMES["int4"].lowering_max_kld


def test_int8_offsets_round_each_offset_once_on_a_per_row_grid():
    """int8_offsets (Scheme.int8_offsets): c moves by at most half its row's int8 step, a row of zero
    offsets keeps a positive scale (XNNPACK refuses others), and the linear stays close to fp32."""
    grid = q4k_grid(64, 128)
    exact = to_offset_linear(grid)
    lin = to_offset_linear(grid)
    lin.offset.weight.data[3] = 0.0
    exact.offset.weight.data[3] = 0.0
    lin.int8_offsets()
    c, c8 = exact.offsets, lin.offsets
    step = c.abs().amax(dim=1, keepdim=True) / 127
    assert ((c8 - c).abs() <= step / 2 + 1e-7).all()
    assert not torch.equal(c8, c)  # it did round
    assert (c8[3] == 0).all()
    scale = lin.offset.weight.scale
    assert (scale > 0).all() and lin.offset.weight.qdata.dtype == torch.int8
    # The means go in as two int8 rows (ActResidual): the offset term is that of float means (2.8e-6
    # relative here; one int8 row: 8e-4).
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(3)) + 3.0
    means = x.unflatten(-1, (-1, lin.group)).mean(-1)
    with torch.no_grad():
        got, want, off = lin(x), exact(x), lin.offset(means)
    float_means = means @ (c8 * lin.group).T
    assert (off - float_means).abs().max() < 1e-4 * float_means.abs().max()
    assert (got - want).norm() / want.norm() < 2e-2


@pytest.mark.parametrize("int8_offsets", [False, True])
def test_offset_and_plane_linears_lower_into_one_delegate(int8_offsets):
    """The group means run inside XNNPACK (mean.dim of a 4-D view): a group sum left outside cut the
    delegate at every Q4_K / plane linear (117 cuts in the 270M int8, lowering time and RSS). Not so
    activation slices (act_slice): XNNPACK's partitioner takes no slice of a dynamic-shape tensor.
    With int8 offsets the offset linear is an 8da8w one, inside the same delegate."""
    import tempfile
    from pathlib import Path

    from executorch.runtime import Runtime
    from torch.export import Dim

    import edge.targets.executorch as ex
    from edge.targets import BACKENDS

    first = to_offset_linear(q4k_grid(256, 128))
    if int8_offsets:
        first.int8_offsets()
    m = torch.nn.Sequential(
        first,
        torch.nn.ReLU(),
        to_plane_linear(rtn_grid(torch.randn(64, 256, generator=torch.Generator().manual_seed(1)), 32)),
    ).eval()
    x = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ep = torch.export.export(m, (x,), dynamic_shapes=({1: Dim("t", min=1, max=64)},), strict=True)
    program = ex._lower(ep.run_decompositions({}), BACKENDS["xnnpack"]).to_executorch(ex._backend_config())
    report = ex.delegation_report(program.exported_program().graph_module)
    assert report["delegate_calls"] == 1 and report["ops_outside_delegate"] == {}, report
    with torch.no_grad():
        want = m(x)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "m.pte").write_bytes(program.buffer)
        got = Runtime.get().load_program(str(Path(d) / "m.pte")).load_method("forward").execute([x])[0]
    assert (got - want).norm() / want.norm() < 1e-5
