"""The weight cache is written atomically under a name private to the writing process."""

import os

import pytest

from edge.models import loading


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        loading._write_atomic(target, fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]


def test_a_write_replaces_through_a_name_private_to_this_process(tmp_path):
    target = tmp_path / "tokenizer.model"
    seen = []
    loading._write_atomic(target, lambda tmp: (seen.append(tmp.name), tmp.write_text("new")))
    assert target.read_text() == "new"
    assert str(os.getpid()) in seen[0] and seen[0] != target.name  # two processes never share it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model"]
