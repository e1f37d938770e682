"""A bundle is trusted only as a whole, --force deletes only bundles, and bad numbers never pass.

Each case here was a hole found by feeding the CLI hostile inputs: a file the manifest names but does
not hash, names outside the bundle, symlinks, --force on a user's folder, a folder appearing at --out
during the export, NaN logits, a failed probe, an unknown backend, bare NaN in --json output.
"""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import edge_cli
from edge import bundle as bundle_mod
from edge.errors import EdgeError
from edge.validate import stages as st
from edge.validate.run import validate, verdict


def _copy(tiny_bundle, tmp_path, name="b"):
    copy = tmp_path / name
    shutil.copytree(tiny_bundle["path"], copy)
    return copy


def _edit_manifest(copy, edit):
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m.update(files={}), "is not listed with its sha256"),  # an emptied list turned checks off
        (lambda m: m["files"].pop("golden.npz"), "is not listed with its sha256"),
        (lambda m: m.update(artifact="../model.pte"), "not the name of a file inside the bundle"),
        (lambda m: m["tokenizer"].update(file="/etc/passwd"), "not the name of a file inside the bundle"),
        (lambda m: m["files"].update({"../../etc/hostname": m["files"]["golden.npz"]}), "inside the bundle"),
        (lambda m: m["files"].update({"/etc/hostname": m["files"]["golden.npz"]}), "inside the bundle"),
        (lambda m: m["files"]["golden.npz"].update(sha256=None), "no valid sha256"),
        (lambda m: m["files"]["golden.npz"].update(bytes="12"), "no valid sha256"),
        (lambda m: m.pop("backend"), "has no 'backend'"),
        (lambda m: m.update(max_seq_len="64"), "'max_seq_len' is not a int"),
        (lambda m: m["io"]["weights_file"].update(file="other.ptd"), "is not listed"),
    ],
)
def test_every_file_the_manifest_names_is_verified(tiny_bundle, tmp_path, edit, needle):
    copy = _copy(tiny_bundle, tmp_path)
    _edit_manifest(copy, edit)
    with pytest.raises(EdgeError, match=needle) as e:
        bundle_mod.load(copy)
    assert e.value.hint


def test_a_manifest_that_is_not_an_object_exits_2(tiny_bundle, tmp_path):
    copy = _copy(tiny_bundle, tmp_path)
    for text in ("[1, 2]", '"x"', "null", "\xff\xfe"):
        (copy / "manifest.json").write_bytes(text.encode("latin-1"))
        out = edge_cli("validate", str(copy), "--stages", "lowered")
        assert out.returncode == 2 and "hint:" in out.stderr and "Traceback" not in out.stderr, (text, out.stderr)


def test_symlinks_and_unlisted_files_are_refused(tiny_bundle, tmp_path):
    copy = _copy(tiny_bundle, tmp_path)
    (copy / "golden.npz").unlink()
    (copy / "golden.npz").symlink_to(os.path.join(tiny_bundle["path"], "golden.npz"))  # same bytes, outside
    with pytest.raises(EdgeError, match="golden.npz is a link"):
        bundle_mod.load(copy)
    copy = _copy(tiny_bundle, tmp_path, "c")
    (copy / "evil.so").write_bytes(b"\x7fELF")
    with pytest.raises(EdgeError, match="evil.so is not part of the bundle"):
        bundle_mod.load(copy)


def test_a_swapped_artifact_cannot_validate(tiny_bundle, tmp_path):
    """The artifact was replaced and dropped from `files`: before, it ran unchecked and could PASS."""
    copy = _copy(tiny_bundle, tmp_path)
    (copy / "model.pte").write_bytes(b"not the exported program")
    _edit_manifest(copy, lambda m: m["files"].pop("model.pte"))
    out = edge_cli("validate", str(copy), "--stages", "lowered")
    assert out.returncode == 2 and "model.pte" in out.stderr and "Traceback" not in out.stderr


def test_force_never_deletes_a_folder_that_is_not_a_bundle(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"meow")
    out = edge_cli("export", "--variant", "tiny-test", "--random-weights", "--target", "linux",
                   "--max-seq-len", "64", "--out", str(mine), "--force")  # fmt: skip
    assert out.returncode == 2 and "not a bundle" in out.stderr and "hint:" in out.stderr
    assert (mine / "cat.jpg").read_bytes() == b"meow"
    # the check itself: a bundle or an empty folder may be replaced, anything else not
    bundle_mod.check_destination(tmp_path / "empty", force=True)
    (tmp_path / "empty").mkdir()
    bundle_mod.check_destination(tmp_path / "empty", force=True)
    with pytest.raises(EdgeError, match="not a bundle"):
        bundle_mod.check_destination(mine, force=True)


def test_a_folder_that_appears_at_out_during_the_export_is_kept(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(EdgeError, match="appeared during the export"):
        with bundle_mod.staging(out, force=True) as tmp:
            (tmp / "model.pte").write_bytes(b"x")
            out.mkdir()  # the user (or another export) puts something there meanwhile
            (out / "notes.txt").write_text("mine")
            bundle_mod.finalize(tmp, out, {"variant": "x"}, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not [d for d in tmp_path.iterdir() if ".partial-" in d.name]  # the work folder is gone too


def test_stale_work_folders_of_killed_exports_are_cleaned(tmp_path):
    out = tmp_path / "b"
    dead = tmp_path / ".b.partial-999999999-abc"  # no such pid
    live = tmp_path / f".b.partial-{os.getpid()}-abc"  # this process: a live export
    other = tmp_path / ".c.partial-999999999-abc"  # another --out's
    for d in (dead, live, other):
        d.mkdir()
    removed = bundle_mod.clean_stale(out)
    assert removed == [dead] and live.exists() and other.exists() and not dead.exists()


def _nan_dump(dump, tmp_path, fill):
    observed, meta = st.load_dump(dump)
    first = next(iter(observed.values()))
    first.at_ref_topk[3] = fill
    first.lse[3] = fill
    bad = tmp_path / f"bad-{fill}.npz"
    st.dump(bad, observed, meta)
    return bad


@pytest.fixture(scope="module")
def device_dump(tiny_bundle, tmp_path_factory):
    dump = tmp_path_factory.mktemp("dump") / "device.npz"
    validate(tiny_bundle["path"], stages=["lowered"], dump_logits=dump)
    return dump


@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_non_finite_logits_fail_and_json_stays_json(tiny_bundle, device_dump, tmp_path, fill):
    bad = _nan_dump(device_dump, tmp_path, fill)
    out = edge_cli("validate", tiny_bundle["path"], "--stages", "device", "--device-logits", str(bad), "--json")
    assert out.returncode == 1, out.stderr
    r = json.loads(out.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in --json output"))
    assert r["verdict"]["passed"] is False and r["verdict"]["culprit"] == "device"
    assert r["stages"]["device"]["overall"]["nonfinite_positions"] == 1


def test_nan_breaks_every_limit_of_a_band():
    row = {"mean_kld": float("nan"), "top1": float("nan"), "max_abs_dlogit": float("nan"), "positions": 4}
    v = verdict({"lowered": {"overall": row}}, {"mean_kld": 0.1, "top1": 0.5, "max_abs_logit": 1.0}, None)
    assert v["passed"] is False and len(v["broken"]) == 3


def test_a_failed_probe_fails_the_verdict():
    row = {"mean_kld": 0.0, "top1": 1.0, "max_abs_dlogit": 0.0, "positions": 4}
    band = {"mean_kld": 0.1, "top1": 0.5}
    assert verdict({"lowered": {"overall": row}}, band, None, {"bos_first": True})["passed"] is True
    v = verdict({"lowered": {"overall": row}}, band, None, {"bos_first": True, "tokenizer_matches_golden": False})
    assert v["passed"] is False and "tokenizer_matches_golden" in v["sentence"]


def test_without_the_artifact_a_verdict_is_measured_only():
    row = {"mean_kld": 0.0, "top1": 1.0, "max_abs_dlogit": 0.0, "positions": 4}
    v = verdict({"quantized": {"overall": row}}, {"mean_kld": 0.1}, None, {})
    assert v["passed"] is None and "not run" in v["sentence"]


def test_a_swapped_tokenizer_fails_its_probe(tiny_bundle, tmp_path, device_dump):
    """The tokenizer no longer reproduces the golden ids (here: the manifest claims another BOS): FAIL."""
    copy = _copy(tiny_bundle, tmp_path)
    _edit_manifest(copy, lambda m: m["special_ids"].update(bos=3))
    r = validate(copy, stages=["device"], device_logits=device_dump)
    assert r["probes"]["bos_first"] is False and r["verdict"]["passed"] is False


def test_an_unknown_backend_exits_2(tiny_bundle, tmp_path):
    copy = _copy(tiny_bundle, tmp_path)
    _edit_manifest(copy, lambda m: m.update(backend="warp-drive"))
    out = edge_cli("validate", str(copy))
    assert out.returncode == 2 and "warp-drive" in out.stderr and "hint:" in out.stderr


def test_a_default_run_that_cannot_run_the_artifact_exits_2(tiny_bundle, tmp_path):
    """coreml cannot run here: a default validate would have judged only the eager stages and passed."""
    copy = _copy(tiny_bundle, tmp_path)
    _edit_manifest(copy, lambda m: m.update(backend="coreml"))
    out = edge_cli("validate", str(copy))
    assert out.returncode == 2 and "cannot run on this host" in out.stderr and "--device-logits" in out.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["export", "--bogus"], "No such option: --bogus"),
        (["export", "--max-seq-len", "abc"], "Invalid value for '--max-seq-len'"),
        (["validate"], "Missing argument"),
        (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature nan is not a finite value"),
        (["generate", "--prompt", "hi", "--temperature", "inf"], "--temperature inf is not a finite value"),
    ],
)
def test_usage_errors_print_error_and_hint_and_exit_2(args, needle):
    """Typer's own usage errors came out as a boxed message without `error:` / `hint:`; NaN sampling
    temperatures reached numpy and a traceback."""
    out = edge_cli(*args)
    assert out.returncode == 2, out.stderr
    assert f"error: {needle}" in out.stderr or (needle in out.stderr and "error:" in out.stderr), out.stderr
    assert "hint:" in out.stderr and "Traceback" not in out.stderr
