"""edge validate on the tiny bundle: every stage, device dumps, injected bugs, tampering, torch-free mode."""

import shutil

import numpy as np
import pytest

from conftest import edge_cli
from edge.errors import EdgeError
from edge.validate import golden
from edge.validate import stages as st
from edge.validate.metrics import Observed, Reference, between, full_kld, per_position
from edge.validate.run import validate, verdict


@pytest.fixture(scope="module")
def validated(tiny_bundle, tmp_path_factory):
    dump = tmp_path_factory.mktemp("dump") / "device.npz"
    return validate(tiny_bundle["path"], dump_logits=dump), dump


def test_every_host_stage_is_scored(validated):
    r, _ = validated
    assert list(r["stages"]) == ["reference", "re-authored", "quantized", "lowered"]
    s = {k: v["overall"] for k, v in r["stages"].items()}
    assert s["re-authored"]["max_abs_dlogit"] < 1e-4  # the golden file is our own fp32 model
    assert s["reference"]["max_abs_dlogit"] < 1e-3  # transformers on the same weights agrees
    assert s["quantized"]["mean_kld"] > s["re-authored"]["mean_kld"]  # int8 costs something
    assert s["lowered"]["positions"] == sum(len(p.ids) for p in golden.load(r["bundle"] + "/golden.npz"))
    assert {"within_window", "past_window"} <= set(r["stages"]["lowered"])
    assert r["probes"] == {"bos_first": True, "tokenizer_matches_golden": True}
    assert r["verdict"]["final_stage"] == "lowered" and r["verdict"]["passed"] in (True, False)


def test_each_stage_is_compared_with_the_one_before_it(validated):
    """vs_previous: what one step changed, pointwise. Re-authored is our fp32 model, the golden file's
    source, so it equals the reference stage to float rounding; int8 moves the logits more than that."""
    r, _ = validated
    st_ = r["stages"]
    assert "vs_previous" not in st_["reference"]
    assert [st_[s]["vs_previous"]["stage"] for s in ("re-authored", "quantized", "lowered")] == [
        "reference", "re-authored", "quantized"]  # fmt: skip
    fp32 = st_["re-authored"]["vs_previous"]
    assert fp32["mean_kld"] < 1e-6 and fp32["top1_flips"] == 0
    q = st_["quantized"]["vs_previous"]
    assert q["mean_kld"] > 100 * fp32["mean_kld"] and q["positions"] == st_["quantized"]["overall"]["positions"]
    # re-authored is what golden.npz holds: quantized vs it is quantized vs the reference, over the same ids
    assert q["mean_kld"] == pytest.approx(st_["quantized"]["overall"]["mean_kld"], rel=1e-3)


def test_stage_against_stage_is_the_exact_kld_when_k_covers_the_vocabulary():
    rng = np.random.default_rng(2)
    ref_logits = rng.normal(0, 3, (12, 64)).astype(np.float32)
    a_logits = ref_logits + rng.normal(0, 0.3, ref_logits.shape).astype(np.float32)
    b_logits = a_logits + rng.normal(0, 0.3, ref_logits.shape).astype(np.float32)
    ref = Reference.from_logits(ref_logits, k=64)
    targets = np.append(rng.integers(0, 64, 11), -1)
    a, b = (Observed.from_logits(ref, x, targets) for x in (a_logits, b_logits))
    c = between(a, b)
    assert np.allclose(c["kld"], full_kld(a_logits, b_logits), rtol=1e-4, atol=1e-7)
    assert np.array_equal(c["same_top1"], (a_logits.argmax(-1) == b_logits.argmax(-1)).astype(float))
    assert np.allclose(between(a, a)["kld"], 0, atol=1e-9)


def test_device_dump_reads_back_exactly(validated, tiny_bundle):
    r, dump = validated
    back = validate(tiny_bundle["path"], stages=["device"], device_logits=dump)
    assert back["stages"]["device"]["overall"] == r["stages"]["lowered"]["overall"]


def test_a_broken_device_is_named_and_fails(validated, tiny_bundle, tmp_path):
    r, dump = validated
    observed, meta = st.load_dump(dump)
    rng = np.random.default_rng(0)
    for obs in observed.values():  # the device runtime scrambles logits: a wrong kernel, a bad cache
        obs.at_ref_topk += rng.normal(0, 3, obs.at_ref_topk.shape).astype(np.float32)
    bad = tmp_path / "bad.npz"
    st.dump(bad, observed, meta)
    # (the tiny random model's own stages sit at the band's edge: near-tie top-1 flips on flat logits,
    # so the device stage is judged alone here; the stage walk is tested on synthetic rows below)
    out = edge_cli("validate", tiny_bundle["path"], "--stages", "device", "--device-logits", str(bad))
    assert out.returncode == 1, out.stderr
    assert "FAIL: device added mean KLD" in out.stdout and "mean KLD" in out.stdout.splitlines()[-1]


def test_tampered_bundle_exits_2_naming_the_file(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle["path"], copy)
    with open(copy / "golden.npz", "r+b") as f:
        f.seek(200)
        f.write(b"\x07")
    out = edge_cli("validate", str(copy), "--stages", "lowered")
    assert out.returncode == 2 and "golden.npz does not match its sha256" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_bundle_from_another_version_of_its_scheme_is_refused_for_the_quantized_stage(tiny_bundle, tmp_path):
    """The quantized stage rebuilds the scheme by name; a manifest recording another definition of it
    (here: another lowering band) must not be compared with this version's model."""
    import json

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle["path"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["quant"]["scheme"]["lowering_max_kld"] *= 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeError, match="lowering_max_kld differ"):
        validate(copy, stages=["quantized"])


def test_a_scheme_field_added_since_the_bundle_was_made_reads_as_its_default(tiny_bundle, tmp_path):
    """A manifest written before a Scheme field existed (here `float16`) held that field's default: the
    quantized stage still rebuilds it; the same field recorded with another value is refused."""
    import json

    for value, refused in ((None, False), (True, True)):
        copy = tmp_path / f"b-{value}"
        shutil.copytree(tiny_bundle["path"], copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        del manifest["quant"]["scheme"]["float16"]
        if value is not None:
            manifest["quant"]["scheme"]["float16"] = value
        (copy / "manifest.json").write_text(json.dumps(manifest))
        if refused:
            with pytest.raises(EdgeError, match="float16 differ"):
                validate(copy, stages=["quantized"])
        else:
            assert validate(copy, stages=["quantized"])["stages"]["quantized"]["overall"]["positions"] > 0


def test_bad_inputs_exit_2(validated, tiny_bundle, tmp_path):
    _, dump = validated
    cases = [
        (["--stages", "lowred"], "unknown stage"),
        (["--stages", "device"], "needs --device-logits"),
        (["--stages", "device", "--device-logits", str(tmp_path / "none.npz")], "cannot read"),
    ]
    for extra, msg in cases:
        out = edge_cli("validate", tiny_bundle["path"], *extra)
        assert out.returncode == 2 and msg in out.stderr, (extra, out.stderr)
    # a dump from another artifact is refused
    other = tmp_path / "other.npz"
    observed, meta = st.load_dump(dump)
    st.dump(other, observed, {"bundle_sha256": "0" * 64})
    with pytest.raises(EdgeError, match="another artifact"):
        validate(tiny_bundle["path"], stages=["device"], device_logits=other)


def test_device_mode_runs_without_torch(validated, tiny_bundle):
    """A device with numpy only (plus its runtime) scores a dump; torch stages are refused clearly."""
    _, dump = validated
    out = edge_cli("validate", tiny_bundle["path"], "--stages", "device", "--device-logits", str(dump),
                   block_torch=True)  # fmt: skip
    assert out.returncode in (0, 1) and "device" in out.stdout, out.stderr
    out = edge_cli("validate", tiny_bundle["path"], "--stages", "quantized", block_torch=True)
    assert out.returncode == 2 and "need torch" in out.stderr


def test_kld_over_topk_is_a_lower_bound_of_the_full_kld():
    rng = np.random.default_rng(1)
    ref_logits = rng.normal(0, 3, (20, 1000)).astype(np.float32)
    test_logits = ref_logits + rng.normal(0, 0.5, ref_logits.shape).astype(np.float32)
    ref = Reference.from_logits(ref_logits, k=32)
    targets = np.append(rng.integers(0, 1000, 19), -1)
    pp = per_position(ref, Observed.from_logits(ref, test_logits, targets), targets)
    exact = full_kld(ref_logits, test_logits)
    assert np.all(pp["kld"] <= exact + 1e-6) and np.all(pp["kld"] > 0.5 * exact)
    same = per_position(ref, Observed.from_logits(ref, ref_logits, targets), targets)
    assert np.allclose(same["kld"], 0, atol=1e-6) and same["top1"].all() and (same["top5_overlap"] == 1).all()


def _row(kld, top1=1.0):
    return {"mean_kld": kld, "top1": top1, "max_abs_dlogit": 0.0}


def test_verdict_names_the_first_stage_that_breaks_the_band():
    band = {"mean_kld": 0.03, "top1": 0.92}
    results = {
        "re-authored": {"overall": _row(0.0)},
        "quantized": {"overall": _row(0.02)},
        "lowered": {
            "overall": _row(0.06),
            "within_window": _row(0.02),
            "past_window": _row(0.10),
        },
    }
    results["quantized"] |= {"within_window": _row(0.02), "past_window": _row(0.02)}
    v = verdict(results, band, window=512)
    assert v["passed"] is False and v["culprit"] == "lowered"
    assert v["sentence"].startswith("lowered added mean KLD 0.0400 on positions past the sliding window (512)")
    ok = verdict({"lowered": {"overall": _row(0.01, 0.95)}}, band, 512)
    assert ok["passed"] is True and "culprit" not in ok
    unrun = verdict({"quantized": {"overall": _row(0.01, 0.95)}}, band, 512)  # the artifact never ran
    assert unrun["passed"] is None and "culprit" not in unrun
    top1 = verdict({"quantized": {"overall": _row(0.01, 0.90)}}, band, None)
    assert top1["culprit"] == "quantized" and "top-1 0.900 < 0.92" in top1["sentence"]


def test_softcap_probe_catches_logits_beyond_gemma2s_cap():
    """Gemma 2's final softcap: eager logits stay within it; an artifact that lost the tanh does not."""
    import torch

    from conftest import tiny_config
    from edge.models.config import Family
    from edge.models.gemma import Gemma
    from edge.models.weights import assign, random_tensors
    from edge.runtime.eager import EagerRunner
    from edge.validate.run import softcap_peaks

    cfg = tiny_config(Family.GEMMA2, final_softcap=2.0)
    m = Gemma(cfg, max_seq_len=32).eval()
    assign(m, random_tensors(cfg), "random")
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach() * 50)  # logits far beyond the cap
    ids = [2, *range(10, 30)]
    with torch.no_grad():
        capped = np.asarray(EagerRunner(m).all_logits(ids), dtype=np.float32)
    ref = Reference.from_logits(capped, k=16)
    targets = np.append(ids[1:], -1)
    ok = softcap_peaks({"p": Observed.from_logits(ref, capped, targets)}, 2.0)
    assert ok["ok"] and 1.0 < ok["max_abs_logit"] <= 2.0
    uncapped = np.arctanh(np.clip(capped / 2.0, -0.999999, 0.999999)) * 2.0  # the tanh undone
    bad = softcap_peaks({"p": Observed.from_logits(ref, uncapped, targets)}, 2.0)
    assert not bad["ok"] and bad["max_abs_logit"] > 2.0


def test_a_lowering_bug_is_caught_and_named(device_bundles, tmp_path):
    """An artifact whose weights were changed after export (as a lossy conversion would): every host
    stage before it stays within the fp32 band, the lowered stage breaks it, the verdict names it,
    and its comparison with the eager stage before it shows the jump, not only its distance from fp32."""
    import json

    import onnx
    from onnx import numpy_helper

    from edge.bundle import sha256

    bad = tmp_path / "bad-onnx"
    shutil.copytree(device_bundles["onnx"]["path"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    path = bad / manifest["artifact"]
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    # torch.onnx names the transposed projections val_N: the first 2-D one after the table is layer 0's
    name = next(
        n for n, t in inits.items()
        if len(t.dims) == 2 and min(t.dims) > 1 and "embed" not in n and t.data_type == onnx.TensorProto.FLOAT
    )  # fmt: skip
    w = numpy_helper.to_array(inits[name])
    # noise at 5% of the weights' spread (a mere rescale would vanish in Gemma 3's q/k RMSNorm)
    noise = np.random.default_rng(0).normal(0, 0.05 * w.std(), w.shape).astype(np.float32)
    inits[name].CopyFrom(numpy_helper.from_array(w + noise, name))
    onnx.save(model, str(path))
    manifest["files"][path.name] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    (bad / "manifest.json").write_text(json.dumps(manifest))

    r = validate(bad, stages=["reference", "re-authored", "quantized", "lowered"])
    s = r["stages"]
    for clean in ("reference", "re-authored", "quantized"):
        assert s[clean]["overall"]["max_abs_dlogit"] < 1e-3, clean
    assert r["verdict"]["passed"] is False and r["verdict"]["culprit"] == "lowered", r["verdict"]
    assert "lowered added mean KLD" in r["verdict"]["sentence"]
    assert s["lowered"]["vs_previous"]["stage"] == "quantized"
    assert s["lowered"]["vs_previous"]["mean_kld"] > 1e4 * s["quantized"]["vs_previous"]["mean_kld"]


def test_an_artifact_the_runtime_cannot_load_is_a_clear_error(tmp_path):
    """A .pte whose method fails to init (as the 270M int8 did: XNNPACK refused a scale <= 0) is an
    EdgeError naming the file (exit 2 in the CLI), not a RuntimeError traceback."""
    from edge.runtime.pte import PteRunner

    bad = tmp_path / "model.pte"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(EdgeError, match="model.pte does not load"):
        PteRunner(bad)


def test_the_api_refuses_a_dump_inside_the_bundle(tiny_bundle):
    """As the CLI does: a file added to the bundle would make every later command refuse it."""
    from pathlib import Path

    root = Path(tiny_bundle["path"])
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(EdgeError, match="inside the bundle"):
        validate(root, stages=["lowered"], dump_logits=root / "device.npz")
    assert sorted(p.name for p in root.iterdir()) == before
