"""One error boundary: a bad file or argument is an EdgeError with a hint (exit 2), never a traceback.

Each case here ended in a traceback (or `Aborted.` / exit 1): files whose sha256 matches the manifest
but whose content is bad, GGUF tokenizer metadata of the wrong type, a damaged weight cache, a prompt
that is not UTF-8, `~nosuchuser/` paths, an empty device record.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as V
from tiny_files import VOCAB, golden_prompts, tiny_tokenizer_bytes, write_bundle, write_dump, write_gguf

from conftest import run_cli
from edge import bundle as bundle_mod
from edge.errors import EdgeError
from edge.models import loading
from edge.models.tokenizer import Tokenizer, build_sentencepiece_from_gguf
from edge.models.weights.gguf import GGUFFile
from edge.validate import golden
from edge.validate import stages as st

EDGE = Path(__file__).resolve().parent.parent / "edge"


def rehash(bundle: Path) -> None:
    """Make the manifest match the files again: the content is bad, the hashes are not."""
    m = json.loads((bundle / "manifest.json").read_text())
    for name in m["files"]:
        m["files"][name] = {"sha256": bundle_mod.sha256(bundle / name), "bytes": (bundle / name).stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "b")


def _npz(path: Path, **arrays) -> bytes:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path.read_bytes()


def _lying_npy_header(tmp_path: Path) -> bytes:
    """An .npz whose one member's .npy header claims 2**40 float64s over 32 bytes: numpy allocated
    the claimed array before reading a byte of it."""
    import io
    import zipfile

    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False, "shape": (2**40,)})
    member.write(bytes(32))
    path = tmp_path / "lying.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("names.npy", member.getvalue())
    return path.read_bytes()


def _golden_cases(tmp_path):
    p = golden_prompts()[0]
    ok = {"names": np.array(["p0"]), "p0.ids": p.ids, "p0.topk_idx": p.ref.topk_idx,
          "p0.topk_logit": p.ref.topk_logit, "p0.lse": p.ref.lse}  # fmt: skip
    return {
        "empty": b"",
        "not a zip": b"PK\x03\x04 not really",
        "no names": _npz(tmp_path / "a.npz", x=np.zeros(3)),
        "names not strings": _npz(tmp_path / "b.npz", **(ok | {"names": np.zeros(2)})),
        "missing array": _npz(tmp_path / "c.npz", **{k: v for k, v in ok.items() if k != "p0.lse"}),
        "ids past the vocabulary": _npz(tmp_path / "d.npz", **(ok | {"p0.ids": p.ids + VOCAB})),
        "top-k shapes differ": _npz(tmp_path / "e.npz", **(ok | {"p0.topk_logit": p.ref.topk_logit[:, :3]})),
        "positions differ": _npz(tmp_path / "f.npz", **(ok | {"p0.lse": p.ref.lse[:2]})),
        "lying header": _lying_npy_header(tmp_path),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "not a zip",
        "no names",
        "names not strings",
        "missing array",
        "ids past the vocabulary",
        "top-k shapes differ",
        "positions differ",
        "lying header",
    ],  # fmt: skip
)
def test_a_golden_file_with_a_matching_hash_but_bad_content(bundle, tmp_path, case):
    (bundle / "golden.npz").write_bytes(_golden_cases(tmp_path)[case])
    rehash(bundle)
    bundle_mod.load(bundle)  # the hashes match: the content is what is wrong
    with pytest.raises(EdgeError, match="golden.npz") as e:
        golden.load(bundle / "golden.npz", VOCAB, 64)
    assert e.value.hint
    code, _, err = run_cli("validate", str(bundle), "--stages", "device", "--device-logits", str(tmp_path / "d.npz"))
    assert code == 2 and "error:" in err and "hint:" in err, err


def test_a_tokenizer_with_a_matching_hash_but_bad_content(bundle, tmp_path):
    good = (bundle / "tokenizer.model").read_bytes()
    assert b"t100" in good
    (bundle / "tokenizer.model").write_bytes(good.replace(b"t100", b"\xff100", 1))  # a piece that is not UTF-8
    rehash(bundle)
    with pytest.raises(EdgeError, match="piece 100") as e:  # was a TypeError from protobuf's bytes
        Tokenizer(bundle / "tokenizer.model")
    assert "tokenizer.model" in e.value.message and e.value.hint


def test_an_empty_tokenizer_model(tmp_path):
    """Found by tests/test_fuzz.py: SentencePiece loads empty bytes, then raised RuntimeError on encode."""
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(EdgeError, match="holds no pieces"):
        Tokenizer(tmp_path / "tokenizer.model").encode("x")


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"tokenizer.ggml.tokens": ([1, 2, 3], V.ARRAY, V.UINT32)}, "no usable token list"),  # was TypeError
        ({"tokenizer.ggml.token_type": (["1"] * VOCAB, V.ARRAY, V.STRING)}, "no usable token list"),
        ({"tokenizer.ggml.bos_token_id": (VOCAB, V.UINT32)}, "bos_token_id is '300'"),  # was IndexError
        ({"tokenizer.ggml.unknown_token_id": ("3", V.STRING)}, "unknown_token_id is '3'"),  # was int('x')
        ({"tokenizer.ggml.add_space_prefix": ("yes", V.STRING)}, "add_space_prefix"),
    ],
)
def test_gguf_tokenizer_metadata_of_the_wrong_type(tmp_path, raw, needle):
    p = write_gguf(tmp_path / "x.gguf", tensors={}, raw=raw)
    with pytest.raises(EdgeError, match=needle) as e:
        build_sentencepiece_from_gguf(GGUFFile(p))
    assert e.value.hint


@pytest.mark.parametrize(
    "content",
    [b"", b"PK\x05\x06" + bytes(18), "empty-npz", "wrong format", "meta not an object", "bad field shape"],
)
def test_a_bad_device_record_is_exit_2(bundle, tmp_path, content):
    """An empty record was EOFError -> Click's `Aborted.` and exit 1 (the FAIL code)."""
    rec = tmp_path / "device.npz"
    if content == "empty-npz":
        _npz(rec)
    elif content == "wrong format":
        _npz(rec, format=np.array("something else"), meta=np.array("{}"))
    elif content == "meta not an object":
        _npz(rec, format=np.array(st.DUMP_FORMAT), meta=np.array("[1]"))
    elif content == "bad field shape":
        write_dump(rec)
        with np.load(rec) as z:
            arrays = dict(z)
        _npz(rec, **(arrays | {"p0.top5": arrays["p0.top5"][:, :2]}))
    else:
        rec.write_bytes(content)
    with pytest.raises(EdgeError, match="device.npz"):
        st.load_dump(rec)
    code, _, err = run_cli("validate", str(bundle), "--stages", "device", "--device-logits", str(rec))
    assert code == 2 and "error:" in err and "hint:" in err and "Aborted" not in err, err


def test_a_device_record_of_other_top_k_is_exit_2(bundle, tmp_path):
    rec = write_dump(tmp_path / "device.npz", golden_prompts(k=4))  # the bundle's golden file has top-8
    m = json.loads((bundle / "manifest.json").read_text())
    write_dump(rec, golden_prompts(k=4), m["files"]["model.pte"]["sha256"])
    code, _, err = run_cli("validate", str(bundle), "--stages", "device", "--device-logits", str(rec))
    assert code == 2 and "top-8" in err and "hint:" in err, err


def test_an_eof_error_that_escapes_a_reader_is_exit_2(monkeypatch):
    """The net under the readers: Click turns an EOFError into Abort, which printed `interrupted`."""

    def eof(*a, **k):
        raise EOFError("No data left in file")

    monkeypatch.setattr("edge.api.variants", eof)
    code, _, err = run_cli("variants")
    assert code == 2 and "error: a file ended before its data did" in err and "hint:" in err, err


def test_a_damaged_weight_cache_is_rebuilt(tmp_path, monkeypatch):
    """A damaged cache was a traceback (JSONDecodeError, safetensors' error) or the wrong weights."""
    from edge.models.variants import get_variant

    monkeypatch.setenv("EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "embedded_gguf", lambda: write_gguf(tmp_path / "tiny.gguf"))
    v = get_variant("gemma3-270m")
    first = loading._load_embedded(v)
    folder = tmp_path / "cache" / v.name
    damage = {
        "meta.json": lambda p: p.write_bytes(b"{not json"),
        "weights.safetensors": lambda p: p.write_bytes(p.read_bytes()[:100]),
        "tokenizer.model": lambda p: p.write_bytes(b"\x00garbage"),
    }
    for name, fn in damage.items():
        fn(folder / name)
        said = []
        monkeypatch.setattr(loading, "say", said.append)
        again = loading._load_embedded(v)
        assert again.config == first.config and again.tensors.keys() == first.tensors.keys()
        assert any("damaged" in s for s in said), (name, said)
        assert loading._load_embedded(v).config == first.config  # and the rebuilt cache reads


def test_a_damaged_cached_tokenizer_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "embedded_gguf", lambda: write_gguf(tmp_path / "tiny.gguf", tensors={}))
    cached = tmp_path / "cache" / "gemma3-270m" / "tokenizer.model"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x00 not a model")
    assert loading._random_tokenizer().vocab_size == VOCAB
    assert cached.read_bytes() == tiny_tokenizer_bytes(tmp_path)


def test_a_prompt_that_is_not_utf8(tmp_path):
    from edge.generation import encode_prompt

    tok = Tokenizer(tiny_tokenizer_bytes(tmp_path))
    for chat in (False, True):
        with pytest.raises(EdgeError, match="not valid UTF-8") as e:  # was UnicodeEncodeError
            encode_prompt(tok, "caf\udce9", chat)  # b"caf\xe9" (Latin-1) as Python's argv holds it
        assert e.value.hint
    code, _, err = run_cli("generate", "--random-weights", "--prompt", "caf\udce9")
    assert code == 2 and "--prompt is not valid UTF-8" in err and "hint:" in err, err


@pytest.mark.parametrize("args", [["validate", "~nosuchuser-edge/b"], ["bench", "~nosuchuser-edge/b"]])
def test_a_tilde_path_of_an_unknown_user(args):
    code, _, err = run_cli(*args)  # was RuntimeError: Could not determine home directory
    assert code == 2 and "~nosuchuser-edge" in err and "hint:" in err, err


def test_weights_under_a_tilde_path_of_an_unknown_user():
    from edge.models.variants import get_variant

    with pytest.raises(EdgeError, match="nosuchuser"):
        loading.load_weights(get_variant("gemma3-270m"), "~nosuchuser-edge/m.gguf")


def test_every_edge_error_has_a_hint():
    """Read from the source: an EdgeError(message) without a hint prints `error:` and no way forward."""
    missing = []
    for path in sorted(EDGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "EdgeError":
                if len(node.args) < 2 and not any(k.arg == "hint" for k in node.keywords):
                    missing.append(f"{path.relative_to(EDGE.parent)}:{node.lineno}")
    assert not missing, missing
