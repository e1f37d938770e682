"""Lowering leaves out the XNNPACK passes whose operator a partition lacks (edge/targets/executorch.py)."""

import contextlib

import torch
from test_export_executorch import lower, tiny_model
from torch import nn

from conftest import random_calibration
from edge.models.config import gemma3_layer_types
from edge.progress import Stages
from edge.quant.apply import quantize_model
from edge.quant.schemes import SCHEMES
from edge.targets import BACKENDS
from edge.targets import executorch as et


def test_the_program_is_the_same_without_the_passes_it_does_not_need(tmp_path, monkeypatch):
    model = tiny_model(n_kv_heads=2, seed=3, n_layers=2, layer_types=gemma3_layer_types(2, pattern=2))  # local, global
    quantize_model(model, SCHEMES["int4"], random_calibration(256))
    _, fast = lower(model, tmp_path, "fast.pte")
    monkeypatch.setattr(et, "xnnpack_passes_for_the_graph", contextlib.nullcontext)  # every pass
    _, full = lower(model, tmp_path, "full.pte")
    assert fast.program == full.program


def test_the_program_is_the_same_functionalized_once_and_preprocessed_in_parallel(monkeypatch):
    """to_edge's own run_decompositions({}) on a program trace() already ran it on is left out, and XNNPACK's
    partitions are preprocessed by two forked workers: the same bytes as ExecuTorch's own way (both serial)."""
    from torch.export import ExportedProgram

    model = tiny_model(n_kv_heads=2, seed=3, n_layers=2, layer_types=gemma3_layer_types(2, pattern=2))
    quantize_model(model, SCHEMES["int4"], random_calibration(256))
    calls = []
    run = ExportedProgram.run_decompositions

    def spy(self, table=None, *args, **kwargs):
        calls.append(table)
        return run(self, table, *args, **kwargs)

    monkeypatch.setattr(ExportedProgram, "run_decompositions", spy)
    meta = et.metadata(model.cfg, 64, 2, [1], model.cfg.vocab_size, True)

    def lowered():  # with the weights in model.ptd, as the bundles have them
        return et.export(model, 64, BACKENDS["xnnpack"], meta, Stages(), external_weights=True)

    parallel = et.xnnpack_preprocess_in_parallel
    monkeypatch.setattr(et, "xnnpack_preprocess_in_parallel", lambda: parallel(2))  # on any machine
    ours = lowered()
    ours_calls = list(calls)
    calls.clear()
    monkeypatch.setattr(et, "functionalized_once", lambda ep: contextlib.nullcontext())
    monkeypatch.setattr(et, "xnnpack_preprocess_in_parallel", lambda: parallel(1))
    stock = lowered()
    empty = lambda ts: sum(type(t) is dict and not t for t in ts)  # noqa: E731  (a CustomDecompTable == {})
    assert (empty(ours_calls), empty(calls)) == (1, 2)  # trace()'s; then to_edge's too
    assert ours.delegation["delegate_calls"] >= 2  # partitions for both workers
    assert ours.program == stock.program and ours.files == stock.files and ours.files


def test_a_pass_whose_operator_is_there_still_runs(monkeypatch):
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    ran = []
    transform = XNNPACKPassManager.transform

    def spy(self):
        ran.extend(p.__name__ for p in self.passes)
        return transform(self)

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 8, 3)

        def forward(self, x):
            return torch.relu(self.conv(x))

    monkeypatch.setattr(XNNPACKPassManager, "transform", spy)  # the passes as the filter left them
    et.lower_module(Conv().eval(), (torch.randn(1, 4, 16),), BACKENDS["xnnpack"])
    assert "Conv1dUnsqueezePass" in ran and "FuseActivationPass" in ran
    assert "PReLUReshapePass" not in ran and "DecomposeBatchNorm" not in ran


def _ops_by_module(ep) -> dict[str, list[str]]:
    """Each node's op name under the innermost module that made it (model.layers.1.attn.wq, ...)."""
    out: dict[str, list[str]] = {}
    for n in ep.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if n.op == "call_function" and stack:
            out.setdefault(list(stack.values())[-1][0], []).append(getattr(n.target, "__name__", str(n.target)))
    return out


def test_norms_and_linears_of_the_residual_stream_trace_without_reshapes():
    """Every operator of the traced graph is a kernel call each step in the delegate (~1-2 us apiece on the
    270M): the residual stream is 2-D rows, so its linears and norms take no reshape around them, and each
    norm's (1 + weight) is a constant, not an add."""
    model = tiny_model(n_kv_heads=1, seed=3, n_layers=2, layer_types=gemma3_layer_types(2, pattern=2))
    quantize_model(model, SCHEMES["int4"], random_calibration(256))
    ep, _ = et.trace(model, 64, BACKENDS["xnnpack"], model.cfg.vocab_size)
    ops = _ops_by_module(ep)
    kinds = ("norm", "wq", "wk", "wv", "wo", "gate", "up")
    stream = [m for m in ops if m.startswith("model.layers.") and m.endswith(kinds)]
    assert len(stream) == 2 * 12  # 6 norms and 6 plain linears a layer (mlp.down carries ActResidual)
    for m in stream:
        assert not any(op.startswith(("view", "_unsafe_view", "expand")) for op in ops[m]), (m, ops[m])
        if m.endswith("norm"):
            assert not any(op.startswith("add") for op in ops[m]), (m, ops[m])
    assert all(m.folded is None for m in model.modules() if hasattr(m, "folded"))  # constants only while tracing
