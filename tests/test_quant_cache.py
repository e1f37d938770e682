"""The quantization cache (edge/quant/cache.py): a hit gives the very tensors a fresh quantization gives."""

import json

import pytest
import torch
from safetensors import safe_open
from test_transcode import grid_model

from conftest import random_calibration
from edge import api
from edge.errors import EdgeError
from edge.quant import cache
from edge.quant.apply import quantize_model
from edge.quant.schemes import SCHEMES

IDENTITY = {"kind": "test", "sha256": "0" * 64}


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_QUANT_CACHE", str(tmp_path / "quant"))
    return tmp_path / "quant"


def tensors(model) -> dict:
    out = {}
    for name, t in cache._tensors(model).items():
        parts, fmt = cache._flat(name, t)
        out |= {n: (fmt, p.clone()) for n, p in parts.items()}
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert a[n][0] == b[n][0], n
        assert torch.equal(a[n][1], b[n][1]), n


@pytest.mark.parametrize("scheme", ["int4", "int8", "int4-hqq"])
def test_a_hit_fills_the_model_with_the_fresh_quantization(scheme, cache_root):
    calib, said = random_calibration(256), []
    model, grids = grid_model()
    fresh = quantize_model(model, SCHEMES[scheme], calib, grids=grids)
    want = tensors(model)

    model, grids = grid_model()  # a miss: quantizes and stores
    cache.quantize(model, SCHEMES[scheme], calib, grids, IDENTITY, say=said.append)
    assert_same(tensors(model), want)
    assert len(cache.entries()) == 1 and not said
    (folder,) = cache_root.iterdir()
    entry = json.loads((folder / cache.ENTRY).read_text())
    packed = entry["packed4"]
    four_bit = {n for n, (_, t) in want.items() if n not in entry["aliases"] and t.dtype == torch.int8
                and t.shape[-1] % 2 == 0 and -8 <= t.min() and t.max() <= 7}  # fmt: skip
    assert set(packed) == four_bit and (len(four_bit) > 10 or scheme == "int8")  # 4-bit values: two a byte
    with safe_open(str(folder / cache.STATE), framework="pt") as f:
        assert all(f.get_slice(n).get_dtype() == "U8" for n in packed)
    if SCHEMES[scheme].shared_table:  # the head's and the lookup's equal tables: one copy in the file
        assert any(
            a.endswith("qdata") and a.startswith("embed") != b.startswith("embed") for a, b in entry["aliases"].items()
        )

    model, grids = grid_model()  # a hit
    coverage = cache.quantize(model, SCHEMES[scheme], calib, grids, IDENTITY, say=said.append)
    assert any("from the cache" in s for s in said)
    assert_same(tensors(model), want)
    assert coverage == json.loads(json.dumps(fresh))
    ids = torch.tensor([[2, 7, 9, 11, 3, 5]])
    ref, _ = grid_model()
    quantize_model(ref, SCHEMES[scheme], calib, grids=grids)
    assert torch.equal(model(ids, torch.arange(6)), ref(ids, torch.arange(6)))


def test_inputs_that_differ_make_another_entry_and_no_cache_writes_none():
    calib = random_calibration(256)
    for scheme, identity, c in (("int4", IDENTITY, calib), ("int8", IDENTITY, calib),
                                ("int4", {"kind": "test", "sha256": "1" * 64}, calib),
                                ("int4", IDENTITY, random_calibration(256, seed=1))):  # fmt: skip
        model, grids = grid_model()
        cache.quantize(model, SCHEMES[scheme], c, grids, identity)
    assert len(cache.entries()) == 4
    model, grids = grid_model()
    cache.quantize(model, SCHEMES["int4-hqq"], calib, grids, IDENTITY, use_cache=False)
    cache.quantize(grid_model()[0], SCHEMES["int4-hqq"], calib, None, None)  # weights of unknown identity
    assert len(cache.entries()) == 4
    assert cache.clear()[0] == 4 and cache.entries() == []


def test_a_corrupt_entry_is_removed_and_rebuilt_never_used(cache_root):
    calib, said = random_calibration(256), []
    model, grids = grid_model()
    cache.quantize(model, SCHEMES["int4"], calib, grids, IDENTITY)
    want = tensors(model)
    (entry,) = cache_root.iterdir()
    data = bytearray((entry / cache.STATE).read_bytes())
    data[-5] ^= 0x40  # one bit of one tensor
    (entry / cache.STATE).write_bytes(bytes(data))

    model, grids = grid_model()
    cache.quantize(model, SCHEMES["int4"], calib, grids, IDENTITY, say=said.append)
    assert any("do not match their recorded sha256" in s for s in said)
    assert_same(tensors(model), want)
    assert cache._verified(entry, cache.key_inputs(SCHEMES["int4"], IDENTITY, calib), said.append) is not None


def test_an_entry_that_does_not_fit_the_model_is_exit_2_and_removed(cache_root):
    calib = random_calibration(256)
    model, grids = grid_model()
    cache.quantize(model, SCHEMES["int4"], calib, grids, IDENTITY)
    (entry,) = cache_root.iterdir()
    record = json.loads((entry / cache.ENTRY).read_text())
    name = next(n for n, f in record["formats"].items() if f.startswith("IntxUnpacked"))
    record["formats"][name] = "tensor torch.float32"  # as a recipe change without a version bump would
    (entry / cache.ENTRY).write_text(json.dumps(record))
    model, grids = grid_model()
    with pytest.raises(EdgeError, match="does not fit this model") as e:
        cache.quantize(model, SCHEMES["int4"], calib, grids, IDENTITY)
    assert e.value.hint and not entry.exists()


def test_the_source_identity_is_the_content(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF one")
    b.write_bytes(b"GGUF one")
    ida, idb = (cache.source_identity({"kind": "gguf", "path": str(p)}, {}) for p in (a, b))
    assert ida == idb  # the path is not the identity, the bytes are
    b.write_bytes(b"GGUF two")
    assert cache.source_identity({"kind": "gguf", "path": str(b)}, {}) != ida
    assert cache.source_identity({"kind": "gguf", "path": str(tmp_path / "gone.gguf")}, {}) is None
    rnd = cache.source_identity({"kind": "random", "seed": 0}, {"dim": 64})
    assert rnd != cache.source_identity({"kind": "random", "seed": 1}, {"dim": 64})


def test_an_export_from_the_cache_writes_the_same_artifact(tmp_path, cache_root):
    a = api.export("tiny-small", "linux", "xnnpack", "int4", random_weights=True, max_seq_len=32, out=tmp_path / "a")
    assert len(cache.entries()) == 1
    b = api.export("tiny-small", "linux", "xnnpack", "int4", random_weights=True, max_seq_len=32, out=tmp_path / "b")
    assert next(s for s in b["stages"] if s["name"] == "quantize")["seconds"] < 5  # a hit, not a second quantization
    assert a["files"] == b["files"]  # sha256 and size of every file, the artifact's included
    assert a["quant"]["coverage"] == b["quant"]["coverage"]


def test_edge_cache_ls_and_clear_show_and_remove_the_entries(cache_root):
    from conftest import edge_cli

    model, grids = grid_model()
    cache.quantize(model, SCHEMES["int4"], random_calibration(256), grids, IDENTITY)
    (cache_root / ".abc.partial-1").mkdir()  # a killed writer's leftover: not an entry, but cleared
    listed = edge_cli("cache", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["entries"]
    assert [(r["scheme"], r["source"]) for r in rows] == [("int4", "test")] and rows[0]["bytes"] > 0
    cleared = edge_cli("cache", "clear")
    assert cleared.returncode == 0 and "removed 1 entries" in cleared.stdout
    assert list(cache_root.iterdir()) == []
