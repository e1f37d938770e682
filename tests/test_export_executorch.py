"""ExecuTorch export on tiny random configs: the .pte equals the eager model of the same scheme."""

import json

import numpy as np
import pytest
import torch

from conftest import random_calibration, tiny_config
from edge import api
from edge.models.config import Family, gemma3_layer_types
from edge.models.gemma import Gemma
from edge.models.weights import assign, random_tensors
from edge.progress import Stages
from edge.quant.apply import quantize_model
from edge.quant.schemes import SCHEMES
from edge.runtime import replay
from edge.runtime.eager import EagerRunner
from edge.runtime.pte import PteRunner
from edge.targets import BACKENDS
from edge.targets import executorch as et
from edge.validate.metrics import full_kld

MAX_SEQ = 64


def lower(model, tmp_path, name="m.pte"):
    cfg = model.cfg
    meta = et.metadata(cfg, MAX_SEQ, 2, [1], cfg.vocab_size, True)
    low = et.export(model, MAX_SEQ, BACKENDS["xnnpack"], meta, Stages())
    path = tmp_path / name
    path.write_bytes(low.program)
    return path, low


def tiny_model(n_kv_heads=1, seed=0, family=Family.GEMMA3, **overrides):
    cfg = tiny_config(family, n_kv_heads=n_kv_heads, **overrides)
    m = Gemma(cfg, max_seq_len=MAX_SEQ).eval()
    tensors = random_tensors(cfg, seed)
    tensors["embed.weight"] *= 25  # a peaked output distribution, as a trained model has: few near-ties
    assign(m, tensors, "random")
    return m


def matches_eager_prefill_and_40_decode_steps(pte, model) -> None:
    eager = EagerRunner(model)
    prompt = list(range(5, 15))
    a, b = pte.prefill(prompt), eager.prefill(prompt)
    worst = np.abs(a - b).max()
    for _ in range(40):  # 10 + 40 positions: past the window of 8 many times over
        tok = int(b.argmax())
        a, b = pte.decode(tok), eager.decode(tok)
        worst = max(worst, np.abs(a - b).max())
    assert worst < 1e-3


@pytest.mark.full  # GQA (Gemma 2); the MQA case (the 270M's) runs in CI on an exported bundle, below
def test_fp32_pte_with_two_kv_heads_matches_eager(tmp_path):
    model = tiny_model(2)
    path, low = lower(model, tmp_path)
    matches_eager_prefill_and_40_decode_steps(PteRunner(path), model)
    assert low.delegation["delegate_calls"] > 0


def test_fp32_bundle_matches_eager_has_the_runner_contract_and_its_tied_table_once(tmp_path):
    """`edge export --quant fp32` on XNNPACK: the .pte equals the eager model over a prefill and 40
    decode steps that cross the sliding window; the stock runner's methods; the tied table (lookup and
    head, the same bytes) stored once in model.ptd (inside a .pte it was written twice)."""
    from edge.models.loading import load_weights
    from edge.models.variants import get_variant

    b = api.export(
        "tiny-test", "linux", "xnnpack", "fp32", random_weights=True, max_seq_len=MAX_SEQ, out=tmp_path / "b"
    )
    pte = api.open_runner(b)
    matches_eager_prefill_and_40_decode_steps(pte, load_weights(get_variant("tiny-test"), None, True, 0).build(MAX_SEQ))
    assert b["delegation"]["delegate_calls"] > 0
    assert {"forward", "get_max_seq_len", "get_max_context_len", "use_kv_cache", "enable_dynamic_shape",
            "get_eos_ids", "get_bos_id", "get_vocab_size"} <= set(pte.program.method_names)  # fmt: skip
    assert pte.constant("get_max_seq_len") == MAX_SEQ and pte.constant("enable_dynamic_shape") is True
    assert pte.max_T == MAX_SEQ - 1
    assert b["io"]["methods"]["forward"]["inputs"][1]["shape"] == [1]
    arch = b["arch"]
    assert arch["tie_embeddings"]
    table = arch["vocab_size"] * arch["dim"] * 4
    assert b["io"]["weights_file"]["file"] == "model.ptd"
    assert table < b["files"]["model.ptd"]["bytes"] < 1.1 * table and b["files"]["model.pte"]["bytes"] < 1e6


# All in `make test-full` (CI time: each 2-8 min here, ExecuTorch's passes re-trace every op with fake
# tensors: the tiny int4's 824 delegated ops lower in 165 s). CI lowers the real 270M int4 instead
# (tests/test_real_export.py: the same check on the android default, real weights).
SCHEMES_IN_CI: set[str] = set()


@pytest.mark.parametrize(
    "scheme",
    [s if s in SCHEMES_IN_CI else pytest.param(s, marks=pytest.mark.full) for s in BACKENDS["xnnpack"].schemes[1:]],
)
def test_lowering_adds_no_error(tmp_path, scheme):
    """Every scheme: the .pte vs the eager model quantized the same way, teacher-forced over 48 positions."""
    model = tiny_model(n_kv_heads=2, seed=7)
    quantize_model(model, SCHEMES[scheme], random_calibration(model.cfg.vocab_size))
    path, _ = lower(model, tmp_path)
    ids = [int(i) for i in torch.randint(0, model.cfg.vocab_size, (48,), generator=torch.Generator().manual_seed(3))]
    want = replay(EagerRunner(model), ids)
    got = replay(PteRunner(path), ids)
    kld = full_kld(want, got)
    assert kld.mean() < SCHEMES[scheme].lowering_max_kld, kld.mean()
    # A random tiny model's logits are nearly flat, so dynamic-activation rounding can flip near-ties;
    # where the eager model has a real preference (top-1 ahead by > 0.05), the .pte must share it.
    top2 = np.sort(want, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 0.05
    assert decided.sum() >= len(ids) // 2
    agree = want.argmax(-1)[decided] == got.argmax(-1)[decided]
    assert agree.mean() >= SCHEMES[scheme].lowering_min_top1, agree.mean()


def test_quantization_coverage_names_every_weight():
    model = tiny_model()
    rows = quantize_model(model, SCHEMES["int4"], random_calibration(model.cfg.vocab_size))
    names = {r["name"] for r in rows}
    assert {"embed", "lm_head", "layers.0.attn.wq", "layers.5.mlp.down"} <= names
    assert all(r["scheme"] != "fp32" for r in rows)  # every width of the tiny config divides 32
    json.dumps(rows)  # it goes into the manifest


def test_coverage_reports_what_group_size_skips():
    cfg = tiny_config(Family.GEMMA1, hidden_dim=72)  # 72 is not a multiple of 32: mlp.down cannot be grouped
    m = Gemma(cfg, max_seq_len=16).eval()
    assign(m, random_tensors(cfg), "random")
    rows = {r["name"]: r for r in quantize_model(m, SCHEMES["rtn-int4"], random_calibration(cfg.vocab_size))}
    assert "not a multiple of group 32" in rows["layers.0.mlp.down"]["skipped"]
    assert rows["layers.0.mlp.down"]["scheme"] == "fp32"
    assert isinstance(m.layers[0].mlp.down.weight, torch.nn.Parameter)  # really left in fp32
    assert rows["layers.0.mlp.up"]["scheme"].startswith("8da4w")


# int8's mlp.down is on planes (tests/test_transcode.py lowers those); its head is in slices, as here.
@pytest.mark.parametrize("scheme,site", [("int8", "layers.0.attn.wq"),
                                         ("int8", "lm_head"), ("int4-hqq", "layers.0.attn.wq"),
                                         ("int4-g128", "layers.0.attn.wq")])  # fmt: skip
def test_a_quantized_linear_lowers_exactly(tmp_path, scheme, site):
    """One 8da linear, lowered alone, equals eager to float rounding: the op-level half of
    "lowering adds no error" (whole models are chaotic under dynamic activation quantization).
    int4's group scales are rounded to bf16 in eager, as XNNPACK stores them: without that,
    the relative error was 1.2e-3 on the real 270M."""
    from executorch.runtime import Runtime

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(256, 96, bias=False))
    lin[0].weight.data = torch.randn(96, 256, generator=g) * 0.05
    x = torch.randn(1, 7, 256, generator=g)
    x[..., 3] *= 30  # an outlier channel, as Gemma's norms produce
    s = SCHEMES[scheme]
    from torchao.quantization import quantize_

    from edge.quant.apply import _as_realized, _bf16_group_scales, _splits, _torchao_config
    from edge.quant.split import split_linears

    q = s.quant_for(site)
    if _splits(q):  # int8 groups: column slices, each per-channel (edge/quant/split.py)
        split_linears(lin, {"0"}, q.group)
    quantize_(lin, _torchao_config(_as_realized(q), False))
    _bf16_group_scales(lin)
    want = lin(x)
    path = tmp_path / "lin.pte"
    path.write_bytes(et.lower_module(lin, (x,), BACKENDS["xnnpack"]))
    got = Runtime.get().load_program(str(path)).load_method("forward").execute([x])[0]
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-5, rel


@pytest.mark.full  # two lowerings each (~4 min a pair here); every real export in CI takes our path
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_our_lowering_writes_the_stock_lowerings_program(tmp_path, monkeypatch, scheme):
    """XNNPACK without its per-node check of preserved ops (ExecuTorch's direct path, no
    EDGE_DO_NOT_DECOMP: a faster `lower`) and the partitioners' dependency sets as bits (less memory)
    write the very bytes that the stock lowering writes."""
    import contextlib

    model = tiny_model(n_kv_heads=2, seed=7, n_layers=2, layer_types=gemma3_layer_types(2))
    quantize_model(model, SCHEMES[scheme], random_calibration(model.cfg.vocab_size))
    calls = []
    direct = et._xnnpack_partitioner
    monkeypatch.setattr(et, "_xnnpack_partitioner", lambda checked: calls.append(checked) or direct(checked))
    _, ours = lower(model, tmp_path, "ours.pte")
    assert calls == [False]  # it took the direct path, no fallback
    monkeypatch.setattr(et, "_xnnpack_partitioner", lambda checked: direct(True))
    monkeypatch.setattr(et, "compact_dependency_viewers", contextlib.nullcontext)
    _, stock = lower(model, tmp_path, "stock.pte")
    assert ours.program == stock.program and ours.files == stock.files
    assert ours.delegation["delegate_calls"] > 0


def test_compact_dependencies_are_the_stock_dependency_sets():
    """CompactDependencies answers what ExecuTorch's _DependencyViewer answers, for every node of a real
    exported graph (a tiny Gemma): the same downstream and upstream sets."""
    from executorch.exir.backend.canonical_partitioners.group_partitioner import _DependencyViewer

    model = tiny_model(n_kv_heads=2, seed=7, n_layers=2, layer_types=gemma3_layer_types(2))
    example = (torch.tensor([[2, 3, 4]]), torch.tensor([0]))
    gm = torch.export.export(et.RunnerContract(model, model.cfg.vocab_size), example, strict=True).graph_module
    stock, ours = _DependencyViewer(gm), et.CompactDependencies(gm)
    nodes = list(gm.graph.nodes)
    assert len(nodes) > 100
    for n in nodes:
        down, up = ours.downstreams_of(n), ours.upstreams_of(n)
        assert set(down) == stock.downstreams_of(n) and len(down) == len(stock.downstreams_of(n))
        assert set(up) == stock.upstreams_of(n)
        assert all(m in down for m in stock.downstreams_of(n)) and n not in down
    assert max(len(ours.downstreams_of(n)) for n in nodes) > len(nodes) // 2
    assert (ours.downstreams_of(nodes[0]) | {"x"}) >= {"x"}  # set algebra builds plain sets


def test_a_linear_xnnpack_refuses_falls_back_to_the_checked_path(monkeypatch):
    """Without the check, a preserved linear that XNNPACK then refuses (its weight is an input, not a
    constant) would stay undecomposed and undelegated: to_edge raises, and `_lower` redoes it checked."""
    from executorch.runtime import Runtime

    class InputWeight(torch.nn.Module):
        def forward(self, x, w):
            return torch.nn.functional.linear(x, w)

    calls = []
    direct = et._xnnpack_partitioner
    monkeypatch.setattr(et, "_xnnpack_partitioner", lambda checked: calls.append(checked) or direct(checked))
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    program = et.lower_module(InputWeight(), (x, w), BACKENDS["xnnpack"])
    assert calls == [False, True]
    out = Runtime.get().load_program(program).load_method("forward").execute([x, w])[0]
    torch.testing.assert_close(out, x @ w.T)


def test_global_layers_attend_through_llamas_custom_sdpa(tmp_path):
    """XNNPACK: the global layers' caches are written by llama::update_cache and read by llama::custom_sdpa
    up to the current position (not all max_seq_len); the sliding-window layers keep the plain attention.
    The .pte still equals eager over a prefill and 40 decode steps past the window, and the runner
    contract says so (use_sdpa_with_kv_cache)."""
    model = tiny_model(2)  # Gemma 3: layers 0-4 sliding-window, 5 global
    n_global = sum(not b.local for b in model.layers)
    path, low = lower(model, tmp_path)
    outside = low.delegation["ops_outside_delegate"]
    assert outside.get("llama::custom_sdpa.out") == n_global >= 1
    assert outside.get("llama::update_cache.out") == 2 * n_global
    assert outside.get("aten::index_put_") == 2 * (len(model.layers) - n_global)
    pte = PteRunner(path)
    assert pte.constant("use_sdpa_with_kv_cache") is True
    matches_eager_prefill_and_40_decode_steps(pte, model)
    assert all(type(b.attn.cache).__name__ == "KVCache" for b in model.layers)  # restored after the export
    # The runner takes the program's outputs uncloned (edge/runtime/pte.py): what it returned must not
    # change when the next call reuses the program's memory.
    pte.reset()
    first = pte.prefill([5, 6, 7])
    kept = first.copy()
    pte.decode(9)
    assert np.array_equal(first, kept)
