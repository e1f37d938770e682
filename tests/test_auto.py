"""`--quant auto` (edge/quant/auto.py): the fewest 4-bit-heavy bytes within a KLD budget, or a refusal."""

import json

import pytest
import torch
from test_cli import edge
from test_export_executorch import tiny_model

from conftest import random_calibration
from edge.errors import EdgeError
from edge.quant import auto
from edge.quant.schemes import SCHEMES, Scheme


def _log_probs(model, texts) -> list[torch.Tensor]:
    """The plain formula, independent of edge.quant.sensitivity.Reference: log-softmax of each text's logits."""
    from edge.runtime.eager import EagerRunner

    runner = EagerRunner(model)
    return [torch.log_softmax(torch.from_numpy(runner.all_logits(list(ids))), -1) for ids in texts]


def _kld(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    total = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(ref, got, strict=True))
    return total / sum(p.shape[0] for p in ref)


FRAGILE = "layers.2.mlp.up"


@pytest.fixture(scope="module")
def fragile_model():
    """A tiny model with one tensor that int4 rounding ruins (as in test_sensitivity.py)."""
    model = tiny_model(n_kv_heads=2, seed=3)
    cols = [5, 40]
    with torch.no_grad():
        # tiny_model peaks the output (x25) for few near-ties; the text it samples itself would then be
        # its own argmax path, at probability 1.0 in fp32, where every KLD is 0. A trained model's is not.
        model.embed.weight /= 25
        model.layers[2].mlp_norm.weight[cols] = -1.0  # Gemma's norm multiplies by (1 + w): these inputs are 0
        w = model.get_submodule(FRAGILE).weight
        w[:, cols] = 50 * w.abs().max()
    return model


@pytest.fixture(scope="module")
def calib(fragile_model):
    return random_calibration(fragile_model.cfg.vocab_size)


@pytest.fixture(scope="module")
def ladder(fragile_model, calib):
    """A budget no configuration misses: auto takes every linear to 4 bits, and its record has both ends."""
    _, _, _, record = auto.choose(fragile_model, calib, None, budget=10.0)
    kld = {r["n_int4"]: r["mean_kld"] for r in record["explored"]}
    return record, kld


def test_a_loose_budget_takes_every_linear_to_4_bits(ladder, fragile_model):
    record, kld = ladder
    names = auto.flexible(fragile_model, SCHEMES[auto.BASE], None)
    assert len(names) == 7 * fragile_model.cfg.n_layers  # q k v o gate up down; the head is the shared table
    assert record["chosen"]["n_int4"] == len(names) and sorted(record["int4"]) == sorted(names)
    assert set(kld) == {0, len(names)}  # both ends met it: no bisection
    assert kld[len(names)] > kld[0] > 0
    ranked = sorted(record["sensitivity_int4_rtn_g32"], key=record["sensitivity_int4_rtn_g32"].get)
    assert ranked[-1] == FRAGILE and record["int4"][-1] == FRAGILE  # the fragile one is the last to go


def test_a_budget_between_the_ends_picks_the_largest_ladder_step_within_it(ladder, fragile_model, calib):
    _, kld = ladder
    n_all = max(kld)
    budget = (kld[0] * kld[n_all]) ** 0.5
    before = {n: p.clone() for n, p in fragile_model.state_dict().items()}
    quantized, scheme, coverage, record = auto.choose(fragile_model, calib, None, budget=budget)
    chosen, explored = record["chosen"], {r["n_int4"]: r["mean_kld"] for r in record["explored"]}
    n = chosen["n_int4"]
    assert 0 <= n < n_all and chosen["mean_kld"] <= budget
    assert explored[n + 1] > budget  # bisection ends on a step over the budget right after the chosen one
    assert FRAGILE not in record["int4"]  # kept at 8 bits
    # The model returned is the one measured: its KLD on the held-out sampled text is the record's.
    held_out = auto.sampled_text(fragile_model, calib[0][0])
    want = min(auto.EVAL_TOKENS, fragile_model.max_seq_len)
    assert len(held_out) == auto.EVAL_TEXTS and all(len(ids) == want for ids in held_out)
    assert held_out == auto.sampled_text(fragile_model, calib[0][0])  # seeded
    assert not any(ids[1:9] == c[1:9] for ids in held_out for c in calib)  # not the calibration text
    ref = _log_probs(fragile_model, held_out)
    assert _kld(ref, _log_probs(quantized, held_out)) == pytest.approx(chosen["mean_kld"], abs=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in fragile_model.state_dict().items())  # fp32 left alone
    # Its scheme says exactly which linears are at 4 bits; the coverage report agrees.
    assert {name for name, _ in scheme.overrides} == set(record["int4"]) and scheme.name == "auto"
    four = {r["name"] for r in coverage if r["scheme"].startswith("8da4w")}
    assert four == set(record["int4"])
    sizes = [r["linear_mb"] for r in sorted(record["explored"], key=lambda r: r["n_int4"])]
    assert sizes == sorted(sizes, reverse=True)  # more 4-bit linears, fewer bytes


def test_an_impossible_budget_is_refused_with_the_best_figure(ladder, fragile_model, calib):
    _, kld = ladder
    with pytest.raises(EdgeError) as e:
        auto.choose(fragile_model, calib, None, budget=kld[0] / 2)
    assert f"{kld[0]:.5f}" in str(e.value) and "--max-kld" in e.value.hint


def test_every_scheme_survives_the_manifest_round_trip():
    """validate rebuilds an auto scheme from the manifest's JSON alone."""
    schemes = [*SCHEMES.values(), auto.scheme_with(SCHEMES[auto.BASE], ["layers.0.mlp.up", "layers.1.attn.wq"], 0.02)]
    for s in schemes:
        assert Scheme.from_dict(json.loads(json.dumps(s.to_dict()))) == s, s.name
    assert schemes[-1].quant_for("layers.0.mlp.up").bits == 4 and schemes[-1].quant_for("layers.0.mlp.gate").bits == 8
    assert schemes[-1].quant_for("layers.1.attn.wq").bits == 4 and schemes[-1].quant_for("layers.0.attn.wq").bits == 8


@pytest.mark.parametrize(
    "args, words",
    [
        (["--quant", "int4", "--max-kld", "0.1"], "--quant auto"),
        (["--quant", "auto", "--max-kld", "-1"], "out of range"),
        (["--backend", "coreml", "--target", "ios", "--quant", "auto"], "cannot lower --quant auto"),
    ],
)
def test_auto_bad_input_exits_2_with_a_hint(args, words, tmp_path):
    r = edge("export", "--variant", "270m", "--random-weights", "--out", str(tmp_path / "b"), *args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()


def test_an_auto_bundle_records_its_choice_and_validate_rebuilds_it(tmp_path):
    """The manifest alone says which linears are at 4 bits: `edge validate`'s quantized stage rebuilds
    that very model (the same logits as the one lowered), and the .pte is within the lowering band of it."""
    from edge import api
    from edge import bundle as bundle_mod
    from edge.runtime.eager import EagerRunner
    from edge.validate.run import _stage_logits

    held = {}
    m = api.export(
        "tiny-small", "linux", "xnnpack", "auto", random_weights=True, max_seq_len=64, out=tmp_path / "auto",
        max_kld=1.0, on_quantized=lambda model: held.setdefault("model", model),
    )  # fmt: skip
    rec = m["quant"]["auto"]
    assert m["quant"]["scheme"]["name"] == "auto" and rec["budget_mean_kld"] == 1.0
    assert rec["chosen"]["mean_kld"] <= 1.0 and len(rec["sensitivity_int4_rtn_g32"]) == 14
    assert [name for name, _ in m["quant"]["scheme"]["overrides"]] == rec["int4"]
    manifest = bundle_mod.load(m["path"])
    ids = [2, 40, 41, 42, 1000, 7]
    rebuilt = _stage_logits("quantized", manifest, {}, None)(ids)
    assert (rebuilt == EagerRunner(held["model"]).all_logits(ids)).all()
    pte = _stage_logits("lowered", manifest, {}, None)(ids)[:, : rebuilt.shape[-1]]  # padded to the tokenizer's
    assert abs(pte - rebuilt).max() < 1e-2 * abs(rebuilt).max()


def test_a_second_auto_export_takes_the_choice_and_its_tensors_from_the_cache(tmp_path, monkeypatch, capsys):
    """The search runs once: the second export reads the choice and the chosen tensors, and its artifact
    is byte for byte the first's."""
    from edge import api
    from edge.quant import cache

    monkeypatch.setenv("EDGE_QUANT_CACHE", str(tmp_path / "quant"))
    kw = dict(random_weights=True, max_seq_len=64, max_kld=1.0)
    a = api.export("tiny-small", "linux", "xnnpack", "auto", out=tmp_path / "a", **kw)
    assert "auto: sensitivity" in capsys.readouterr().err
    b = api.export("tiny-small", "linux", "xnnpack", "auto", out=tmp_path / "b", **kw)
    err = capsys.readouterr().err
    assert "the choice from the cache" in err and "auto: sensitivity" not in err
    assert "quantized tensors from the cache" in err
    assert a["quant"] == b["quant"]
    files = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name != "manifest.json")
    assert "model.pte" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert sorted(e["scheme"] for e in cache.entries()) == ["auto", "auto choice (int4, --max-kld 1)"]
