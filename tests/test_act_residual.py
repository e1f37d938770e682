"""ActResidual (edge/quant/split.py): a dynamic-int8 linear fed x and its rounding residual as two rows."""

import pytest
import torch
from torch import nn

from edge.quant.apply import _torchao_config
from edge.quant.schemes import Act, _w
from edge.quant.split import ActResidual, wrap_act_residual


def quantized(in_f: int, out_f: int, act: Act = Act.DYNAMIC_INT8, seed: int = 0) -> nn.Sequential:
    from torchao.quantization import quantize_

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
    quantize_(m, _torchao_config(_w(8, None, act=act), False))
    return m


def outlier_input(T: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(1, T, 640, generator=torch.Generator().manual_seed(seed))
    x[..., :5] *= 30  # a few outlier channels set each token's int8 scale: the rest is coarsely rounded
    return x


def test_the_residual_row_removes_the_activation_rounding():
    m = quantized(640, 512)
    plain = m[0]
    exact = outlier_input(7) @ plain.weight.dequantize().T  # int8 weights, float activations
    wrapped = ActResidual(plain)
    x = outlier_input(7)
    err_plain = (plain(x) - exact).norm() / exact.norm()
    err_res = (wrapped(x) - exact).norm() / exact.norm()
    # Measured 2.8e-2 and 1.1e-4: the residual's own int8 scale is ~255x finer than x's.
    assert err_plain > 1e-2
    assert err_res < err_plain / 50, (err_plain, err_res)


@pytest.mark.parametrize("T", [1, 5])
def test_it_lowers_to_xnnpack_exactly(tmp_path, T):
    from executorch.runtime import Runtime

    from edge.targets import BACKENDS
    from edge.targets.executorch import lower_module

    m = quantized(640, 256)
    m[0] = ActResidual(m[0])
    x = outlier_input(T)
    path = tmp_path / "r.pte"
    path.write_bytes(lower_module(m, (x,), BACKENDS["xnnpack"]))
    got = Runtime.get().load_program(str(path)).load_method("forward").execute([x])[0]
    want = m(x)
    # The plain 8da8w linear's artifact sits ~1e-5 from eager (its quantizer rounds 1/scale apart from
    # torchao's); the residual row takes that difference too: measured 3e-7.
    assert (got - want).norm() / want.norm() < 1e-5


def test_only_linears_with_dynamic_activations_are_wrapped():
    m = nn.Module()
    m.dyn = quantized(64, 32)[0]
    m.wo = quantized(64, 32, act=Act.FLOAT)[0]  # weight-only: activations are float already
    m.fp32 = nn.Linear(64, 32, bias=False)  # e.g. an OffsetLinear's offsets
    assert wrap_act_residual(m) == ["dyn"]
    assert isinstance(m.dyn, ActResidual) and isinstance(m.wo, nn.Linear) and isinstance(m.fp32, nn.Linear)
    assert wrap_act_residual(m) == []  # idempotent: a wrapped linear is not wrapped again


def test_the_residual_stays_inside_one_delegate():
    """Every op of the residual is one XNNPACK takes: an op left outside cuts the delegate at every
    linear, and ExecuTorch copies the whole graph per delegate (the 270M int8 lowered > 25 min so)."""
    from torch.export import Dim

    import edge.targets.executorch as ex
    from edge.targets import BACKENDS

    m = quantized(640, 256)
    m[0] = ActResidual(m[0])
    x = outlier_input(5)
    with torch.no_grad():
        ep = torch.export.export(m, (x,), dynamic_shapes=({1: Dim("t", min=1, max=100)},), strict=True)
    program = ex._lower(ep.run_decompositions({}), BACKENDS["xnnpack"]).to_executorch(ex._backend_config())
    report = ex.delegation_report(program.exported_program().graph_module)
    assert report["delegate_calls"] == 1 and report["ops_outside_delegate"] == {}, report


def test_rounded_is_torchaos_rounding_without_the_zero_point():
    """(q - zp) * s with q = round(x / s) + zp: the zero point cancels, so `rounded` never computes it. It
    must still give torchao's dequantized int8 (fake_quant_act) on rows with outliers, all-positive and
    all-negative rows; it may differ only at exact ties, by one step."""
    from edge.quant.smooth import fake_quant_act

    ar = ActResidual(nn.Linear(640, 8, bias=False))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 640, generator=g) * torch.rand(300, 1, generator=g) * 10
    x[:, torch.randint(0, 640, (5,), generator=g)] *= 30
    x[100:200] = x[100:200].abs()
    x[200:] = -x[200:].abs()
    got, want = ar.rounded(x), fake_quant_act(x)
    step = (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / 255
    differ = got != want
    assert differ.float().mean() < 1e-4, differ.sum()
    assert ((got - want).abs() <= step * 1.001).all()
