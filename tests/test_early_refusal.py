"""Late failures: an output that cannot be written is refused before the slow work starts.

An unwritable --dump-logits failed after every stage had run (minutes); `--out .` reached the export.
Each test replaces the slow function with one that records the call, so a refusal that came too late
shows up as a call.
"""

from __future__ import annotations

import os

import pytest

from conftest import run_cli


class Reached(Exception):
    """The slow work was started."""


@pytest.fixture
def slow_work(monkeypatch):
    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr("edge.validate.run.validate", reached)
    monkeypatch.setattr("edge.api.export", reached)


@pytest.mark.parametrize(
    "dump, needle",
    [
        ("/proc/gemma-edge-test/d.npz", "does not exist"),  # /proc refuses new entries even to root
        ("/proc/d.npz", "cannot be written"),
        ("{tmp}", "is a folder"),
        ("{tmp}/no/such/folder/d.npz", "does not exist"),
        ("{tmp}/file/d.npz", "does not exist"),  # under a file
    ],
)
def test_an_unwritable_dump_logits_is_refused_before_validating(slow_work, tmp_path, dump, needle):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("validate", str(tmp_path), "--dump-logits", dump.format(tmp=tmp_path))
    assert code == 2 and f"--dump-logits {dump.format(tmp=tmp_path)}" in err and needle in err, err
    assert "hint:" in err


def test_a_writable_dump_logits_is_left_as_it_was(slow_work, tmp_path):
    new, old = tmp_path / "new.npz", tmp_path / "old.npz"
    old.write_bytes(b"keep")
    for dump in (new, old):
        with pytest.raises(Reached):
            run_cli("validate", str(tmp_path / "bundle"), "--dump-logits", str(dump))
    assert not new.exists() and old.read_bytes() == b"keep"  # the probe neither leaves nor truncates a file


@pytest.mark.parametrize("option, name", [("--dump-logits", "d.npz"), ("--report", "report")])
def test_nothing_is_written_into_the_bundle_it_validates(slow_work, tmp_path, option, name):
    """A bundle holds only what its manifest lists: a dump or a report written into it would make the
    next command refuse the bundle. Refused before validating, the folder left as it was."""
    bundle = tmp_path / "bundle"
    (bundle / "sub").mkdir(parents=True)
    for inside in (bundle / name, bundle / "sub" / name, tmp_path / "bundle" / ".." / "bundle" / name):
        code, _, err = run_cli("validate", str(bundle), option, str(inside))
        assert code == 2 and "inside the bundle" in err and "hint:" in err, err
    assert sorted(p.name for p in bundle.rglob("*")) == ["sub"]
    with pytest.raises(Reached):  # beside the bundle is fine
        run_cli("validate", str(bundle), option, str(tmp_path / name))


def test_a_missing_device_logits_is_refused_before_validating(slow_work, tmp_path):
    code, _, err = run_cli("validate", str(tmp_path), "--device-logits", str(tmp_path / "none.npz"))
    assert code == 2 and "cannot read --device-logits" in err and "hint:" in err, err


@pytest.mark.parametrize("out", [".", "..", "/", "sub/..", "{cwd}", "{parent}"])
def test_an_out_that_names_no_folder_of_its_own_is_refused(slow_work, tmp_path, monkeypatch, out):
    (tmp_path / "work" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    out = out.format(cwd=os.getcwd(), parent=tmp_path)
    code, _, err = run_cli("export", "--random-weights", "--out", out, "--force")
    assert code == 2 and f"--out {out}" in err and "hint:" in err, err


def test_an_ordinary_out_reaches_the_export(slow_work, tmp_path):
    with pytest.raises(Reached):
        run_cli("export", "--random-weights", "--out", str(tmp_path / "b"))
