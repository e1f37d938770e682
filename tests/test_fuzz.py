"""Fuzzing the readers of files from strangers: GGUF, safetensors, config.json, manifest.json,
golden.npz, device records and tokenizer files.

Each example damages a fresh copy of a tiny known-good file (truncation at every section boundary,
bit flips, absurd counts and sizes, wrong JSON types, path components) and reads it the way the
commands do. The outcome must be a clean result or an EdgeError with a hint: never another exception,
a hang (an alarm interrupts an example after ALARM_S) or a write anywhere (the folder is compared
before and after).

Time: the default profile ("ci") tries few examples (the file runs in well under a minute on two
cores); `HYPOTHESIS_PROFILE=long pytest -m fuzz tests/test_fuzz.py` tries many more. The examples
tried per reader and their outcomes are printed at the end of the run.
"""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
import signal
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_files import (
    VOCAB,
    gguf_boundaries,
    golden_prompts,
    tiny_tensors,
    tiny_tokenizer_bytes,
    write_bundle,
    write_dump,
    write_gguf,
    write_hf_folder,
)

from edge import bundle as bundle_mod
from edge.errors import EdgeError
from edge.models.tokenizer import Tokenizer, build_sentencepiece_from_gguf
from edge.models.weights.gguf import GGUFFile, config_from_gguf, load_gguf
from edge.models.weights.hf import load_hf
from edge.validate import golden
from edge.validate import stages as vstages

pytestmark = pytest.mark.fuzz

_COMMON = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=False)
settings.register_profile("ci", max_examples=500, **_COMMON)
settings.register_profile("long", max_examples=3000, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ = settings.get_profile(PROFILE)
ALARM_S = 20  # one example reads a few kB: anything near this is a hang

COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            tr.write_line(f"\nfuzz examples per reader (profile {PROFILE!r}):")
            for reader, c in sorted(COUNTS.items()):
                tr.write_line(f"  {reader:<14} {sum(c.values()):>6} tried: {dict(c)}")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if not p.is_symlink()}


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"no result after {ALARM_S} s")


def outcome(reader: str, root: Path, read) -> str:
    """Run read(); a clean result or an EdgeError with a hint, nothing written under root, no hang.
    Any other exception propagates: hypothesis shrinks the input that raised it and reports it."""
    before = _tree(root)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, ALARM_S)
    try:
        read()
        result = "clean"
    except EdgeError as e:
        assert e.hint, f"EdgeError without a hint: {e.message}"
        result = "EdgeError"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert _tree(root) == before, "a reader wrote or removed a file"
    COUNTS[reader][result] += 1
    return result


# --- byte-level damage ---

ABSURD = [0, 1, 2**8 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


@st.composite
def damaged(draw, base: bytes, cuts: list[int]):
    """base with one or more of: cut at a section boundary (or one byte either side), bits flipped,
    a u32/u64 at a boundary set to an absurd value, a run of bytes replaced."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["cut", "flip", "absurd", "splice"]))
        if not data:
            break
        if op == "cut":
            at = draw(st.sampled_from(cuts)) + draw(st.sampled_from([-1, 0, 0, 1]))
            del data[max(0, min(at, len(data))) :]
        elif op == "flip":
            for _ in range(draw(st.integers(1, 8))):
                i = draw(st.integers(0, len(data) - 1))
                data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "absurd":
            at = min(draw(st.sampled_from(cuts)), len(data))
            width = draw(st.sampled_from([4, 8]))
            value = draw(st.sampled_from(ABSURD) | st.integers(0, 2 ** (8 * width) - 1)) % 2 ** (8 * width)
            data[at : at + width] = value.to_bytes(width, "little")
        else:
            i = draw(st.integers(0, len(data) - 1))
            data[i : i + draw(st.integers(1, 16))] = draw(st.binary(min_size=0, max_size=16))
    return bytes(data)


# --- JSON-level damage ---

PATH_PARTS = ["..", ".", "", "/", "../golden.npz", "/etc/passwd", "a/b", "model.pte\x00", "manifest.json",
              " model.pte", "C:\\x", "~root/x", "golden.npz/..", "\u202e", "golden.npz", "tokenizer.model"]  # fmt: skip
json_scalars = (
    st.none()
    | st.booleans()
    | st.sampled_from(ABSURD + [-1, -(2**63), 10**30])
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.sampled_from(PATH_PARTS)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def edited_json(draw, doc):
    """doc with values set to other JSON values (absurd numbers, wrong types, path components),
    keys removed or added, or replaced whole."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))))
        if not path:
            if draw(st.integers(0, 9)) == 0:
                doc = draw(json_values)
            continue
        *head, last = path
        node = doc
        for k in head:
            node = node[k]
        action = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if action == "delete" and isinstance(node, dict):
            node.pop(last, None)
        elif action == "add" and isinstance(node, dict):
            node[draw(st.sampled_from(PATH_PARTS) | st.text(max_size=8))] = draw(json_values)
        else:
            node[last] = draw(json_values)
    return doc


def _json_bytes(doc) -> bytes:
    return json.dumps(doc).encode()


# --- GGUF: header, metadata, tensor table, then everything built from them ---


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
    p = write_gguf(tmp_path_factory.mktemp("gguf") / "base.gguf", tensors=tiny_tensors("gemma3", 1), n_layers=1)
    return p.read_bytes(), gguf_boundaries(p)


def _read_gguf(path: Path) -> None:
    f = GGUFFile(path)
    cfg = config_from_gguf(f)
    load_gguf(f, cfg)
    Tokenizer(build_sentencepiece_from_gguf(f)).encode("hello t10 <bos>")


@FUZZ
@given(data=st.data())
def test_fuzz_gguf(gguf_base, tmp_path, data):
    base, cuts = gguf_base
    p = tmp_path / "x.gguf"
    p.write_bytes(data.draw(damaged(base, cuts)))
    outcome("gguf", tmp_path, lambda: _read_gguf(p))


# --- Hugging Face folder: the safetensors header and config.json ---


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    folder = write_hf_folder(tmp_path_factory.mktemp("hf") / "base")
    raw = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    cuts = sorted({8, 8 + n} | {8 + n + v["data_offsets"][i] for k, v in header.items() if k != "__metadata__"
                                for i in (0, 1)})  # fmt: skip
    return folder, raw, n, header, cuts


def _fresh(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors(hf_base, tmp_path, data):
    folder, raw, n, header, cuts = hf_base
    case = _fresh(folder, tmp_path / "case")
    if data.draw(st.booleans()):
        body = data.draw(damaged(raw, cuts))
    else:  # a header that parses, with wrong dtypes / shapes / offsets
        head = _json_bytes(data.draw(edited_json(header)))
        body = struct.pack("<Q", len(head)) + head + raw[8 + n :]
    (case / "model.safetensors").write_bytes(body)
    outcome("safetensors", tmp_path, lambda: load_hf(case))


@FUZZ
@given(data=st.data())
def test_fuzz_config_json(hf_base, tmp_path, data):
    folder = hf_base[0]
    case = _fresh(folder, tmp_path / "case")
    text = (folder / "config.json").read_bytes()
    if data.draw(st.integers(0, 3)) == 0:
        body = data.draw(damaged(text, list(range(0, len(text), max(1, len(text) // 16)))))
    else:
        body = _json_bytes(data.draw(edited_json(json.loads(text))))
    (case / "config.json").write_bytes(body)
    outcome("config.json", tmp_path, lambda: load_hf(case))


# --- a bundle: manifest.json, then golden.npz and the tokenizer it names ---


@pytest.fixture(scope="module")
def bundle_base(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("bundle") / "base")


def _rehash(bundle: Path) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    for name in m["files"]:
        m["files"][name] = {"sha256": bundle_mod.sha256(bundle / name), "bytes": (bundle / name).stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(m))


def _read_bundle(path: Path) -> None:
    """What `edge validate` reads before any runtime: the manifest, golden.npz and the tokenizer."""
    m = bundle_mod.load(path)
    golden.load(path / m["golden"]["file"], m["arch"]["vocab_size"], m["max_seq_len"])
    Tokenizer(path / m["tokenizer"]["file"])


@FUZZ
@given(data=st.data())
def test_fuzz_manifest(bundle_base, tmp_path, data):
    case = _fresh(bundle_base, tmp_path / "case")
    (tmp_path / "cwd").mkdir(exist_ok=True)
    text = (bundle_base / "manifest.json").read_bytes()
    if data.draw(st.integers(0, 4)) == 0:
        body = data.draw(damaged(text, list(range(0, len(text), max(1, len(text) // 16)))))
    else:
        body = _json_bytes(data.draw(edited_json(json.loads(text))))
    (case / "manifest.json").write_bytes(body)
    cwd = os.getcwd()
    os.chdir(tmp_path / "cwd")  # relative names resolve here, inside the compared folder
    try:
        outcome("manifest.json", tmp_path, lambda: _read_bundle(case))
    finally:
        os.chdir(cwd)


def _zip_cuts(raw: bytes) -> list[int]:
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        cuts = {zf.start_dir, len(raw) - 22}
        for i in zf.infolist():
            start = i.header_offset + 30 + len(i.filename.encode()) + len(i.extra)
            cuts |= {i.header_offset, start, start + 10, start + i.compress_size}
    return sorted(c for c in cuts if 0 <= c < len(raw))


@st.composite
def npz_arrays(draw, arrays: dict[str, np.ndarray]):
    """The arrays of an .npz with some removed or replaced by arrays of another dtype or shape."""
    out = dict(arrays)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(out)))
        action = draw(st.sampled_from(["drop", "dtype", "shape", "values"]))
        a = out[key]
        if action == "drop":
            out.pop(key)
        elif action == "dtype":
            dtype = draw(st.sampled_from(["U3", "f2", "i1", "u8", "b1", "f8", "i8"]))
            out[key] = a.astype(dtype) if a.dtype.kind != "U" or dtype == "U3" else np.zeros(a.shape, dtype)
        elif action == "shape":
            out[key] = np.resize(a, draw(st.sampled_from([(), (0,), (1,), (3, 0), (2, 2, 2), (a.size + 7,)])))
        else:
            fill = draw(st.sampled_from([np.nan, np.inf, -1, 2**31 - 1, VOCAB, 0]))
            try:
                out[key] = np.full_like(a, fill) if a.dtype.kind in "iuf" else a
            except (OverflowError, ValueError):  # a fill the dtype cannot hold: keep the array
                pass
        if not out:
            break
    return out


def _save_npz(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.fixture(scope="module")
def golden_base(bundle_base):
    raw = (bundle_base / "golden.npz").read_bytes()
    with np.load(bundle_base / "golden.npz") as z:
        arrays = dict(z)
    return raw, arrays, _zip_cuts(raw)


@FUZZ
@given(data=st.data())
def test_fuzz_golden(bundle_base, golden_base, tmp_path, data):
    raw, arrays, cuts = golden_base
    case = _fresh(bundle_base, tmp_path / "case")
    if data.draw(st.booleans()):
        (case / "golden.npz").write_bytes(data.draw(damaged(raw, cuts)))
    else:
        _save_npz(case / "golden.npz", data.draw(npz_arrays(arrays)))
    _rehash(case)  # the hash matches: only the content is bad
    outcome("golden.npz", tmp_path, lambda: _read_bundle(case))


@pytest.fixture(scope="module")
def dump_base(tmp_path_factory):
    path = write_dump(tmp_path_factory.mktemp("dump") / "base.npz")
    with np.load(path) as z:
        arrays = dict(z)
    raw = path.read_bytes()
    return raw, arrays, _zip_cuts(raw)


def _read_dump(path: Path) -> None:
    """What the device stage does with a record: load it, then score it against the golden prompts."""
    observed, _ = vstages.load_dump(path)
    try:
        vstages.score(golden_prompts(), observed, window=4)
    except ValueError as e:  # run.validate turns score's ValueErrors into EdgeError, as here
        raise EdgeError(f"device: {e}", hint="dump the logits again with this bundle") from e


@FUZZ
@given(data=st.data())
def test_fuzz_device_record(dump_base, tmp_path, data):
    raw, arrays, cuts = dump_base
    p = tmp_path / "device.npz"
    if data.draw(st.booleans()):
        p.write_bytes(data.draw(damaged(raw, cuts)))
    else:
        _save_npz(p, data.draw(npz_arrays(arrays)))
    outcome("device record", tmp_path, lambda: _read_dump(p))


# --- tokenizer.model ---


@pytest.fixture(scope="module")
def tokenizer_base(tmp_path_factory):
    raw = tiny_tokenizer_bytes(tmp_path_factory.mktemp("tok"))
    return raw, list(range(0, len(raw), max(1, len(raw) // 64)))


def _read_tokenizer(path: Path) -> None:
    tok = Tokenizer(path)
    ids = tok.encode("hello t10 <bos> <unk>x \n", bos=True)
    tok.decode(ids)
    tok.decode(range(tok.vocab_size))
    s = tok.stream()
    for i in ids:
        s.feed(i)
    s.flush()


@FUZZ
@given(data=st.data())
def test_fuzz_tokenizer(tokenizer_base, tmp_path, data):
    raw, cuts = tokenizer_base
    p = tmp_path / "tokenizer.model"
    p.write_bytes(data.draw(damaged(raw, cuts)))
    outcome("tokenizer", tmp_path, lambda: _read_tokenizer(p))
