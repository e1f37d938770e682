"""Readers refuse before allocating: every count, size and type in a header is checked (EdgeError).

Each case was a hang, a wrong model or a traceback: a GGUF or config.json claiming a billion layers
built per-layer tables until memory ran out; zero heads divided by zero; a string where a number
belongs reached int(); absurd tensor dims wrapped around numpy's int64 product and passed the size
check; nested metadata arrays recursed until RecursionError.
"""

from __future__ import annotations

import json
import struct
import time

import pytest
from gguf import GGUFValueType as V
from tiny_files import VOCAB, gguf_bytes, gguf_string, gguf_u32_kv, write_gguf, write_hf_folder

from edge.errors import EdgeError
from edge.models.weights.gguf import GGUFFile, config_from_gguf
from edge.models.weights.hf import load_hf


def _refused(fn, *needles: str):
    t0 = time.perf_counter()
    with pytest.raises(EdgeError) as e:
        fn()
    assert time.perf_counter() - t0 < 5, "refused only after the work it should have prevented"
    for n in needles:
        assert n in e.value.message, (n, e.value.message)
    assert e.value.hint
    return e.value


# --- GGUF: the header's counts and the tensor table ---


@pytest.mark.parametrize(
    "raw, needles",
    [
        (gguf_bytes(n_kv=2**63), ["metadata entries", "more than its"]),
        (gguf_bytes(n_tensors=2**40), ["tensors", "more than its"]),
        (gguf_bytes([gguf_u32_kv("general.alignment", 0)]), ["general.alignment is 0"]),  # was ZeroDivisionError
        (gguf_bytes([gguf_u32_kv("general.alignment", 48)]), ["not a power of two"]),
        (gguf_bytes(tensors=[("t", [2**40, 2**40], 0, 0)]), ["impossible in a"]),  # int64 product wrapped to 0
        (gguf_bytes(tensors=[("t", [], 0, 0)]), ["0 dimensions"]),
        (gguf_bytes(tensors=[("t", [1] * 5, 0, 0)]), ["5 dimensions"]),
        (gguf_bytes(tensors=[("t", [8], 0, 0), ("t", [8], 0, 32)], data=bytes(64)), ["'t' appears twice"]),
        (gguf_bytes(tensors=[("t", [8], 0, 4)], data=bytes(64)), ["not a multiple of the alignment"]),
        (gguf_bytes([gguf_u32_kv("a", 1), gguf_u32_kv("a", 2)]), ["'a' appears twice"]),
        (gguf_bytes([gguf_string("k") + struct.pack("<IIQ", V.ARRAY, V.UINT8, 2**62)]), ["truncated"]),
        (gguf_bytes(tensors=[("t", [8], 99, 0)]), ["unknown ggml type 99"]),
    ],
    ids=[
        "kv-count",
        "tensor-count",
        "alignment-0",
        "alignment-48",
        "dims-overflow",
        "no-dims",
        "5-dims",
        "duplicate-tensor",
        "misaligned",
        "duplicate-key",
        "array-count",
        "ggml-type",
    ],  # fmt: skip
)
def test_gguf_header_limits(tmp_path, raw, needles):
    p = tmp_path / "x.gguf"
    p.write_bytes(raw)
    _refused(lambda: GGUFFile(p), *needles)


def test_gguf_nested_arrays_cannot_recurse_without_bound(tmp_path):
    # 10,000 arrays each holding the next: was a RecursionError
    nested = struct.pack("<IQ", V.ARRAY, 1) * 10_000 + struct.pack("<IQ", V.UINT8, 0)
    p = tmp_path / "x.gguf"
    p.write_bytes(gguf_bytes([gguf_string("k") + struct.pack("<I", V.ARRAY) + nested]))
    _refused(lambda: GGUFFile(p), "nested more than")


# --- GGUF: the metadata GemmaConfig is built from ---


@pytest.mark.parametrize(
    "raw, needles",
    [
        ({"gemma3.block_count": (10**9, V.UINT32)}, ["block_count is 1000000000", "1 to 512"]),  # was a hang
        ({"gemma3.attention.head_count": (0, V.UINT32)}, ["head_count is 0"]),  # was ZeroDivisionError
        ({"gemma3.attention.head_count": ("four", V.STRING)}, ["head_count is 'four'"]),
        ({"gemma3.embedding_length": (64.0, V.FLOAT32)}, ["embedding_length is 64.0"]),
        ({"gemma3.block_count": (True, V.BOOL)}, ["block_count is True"]),
        ({"gemma3.attention.head_count": ([2, 4], V.ARRAY, V.UINT32)}, ["varies per layer"]),
        ({"gemma3.attention.head_count": (["2"], V.ARRAY, V.STRING)}, ["head_count is '2'"]),
        ({"gemma3.attention.head_count_kv": (3, V.UINT32)}, ["not a multiple of n_kv_heads 3"]),
        ({"gemma3.attention.sliding_window_pattern": ([True], V.ARRAY, V.BOOL)}, ["one true/false for each"]),
        ({"gemma3.attention.sliding_window_pattern": ("6", V.STRING)}, ["sliding_window_pattern is '6'"]),
        ({"tokenizer.ggml.bos_token_id": (VOCAB + 5, V.UINT32)}, ["bos_id is 305", "300-token"]),
        ({"gemma3.rope.freq_base": ("1e6", V.STRING)}, ["freq_base is '1e6'", "finite number"]),
        ({"gemma3.rope.freq_base": (float("nan"), V.FLOAT32)}, ["freq_base is nan"]),
        ({"gemma3.rope.freq_base": (-1.0, V.FLOAT32)}, ["rope_theta is -1.0"]),
        ({"gemma3.context_length": (0, V.UINT32)}, ["context_length is 0"]),
        ({"gemma3.rope.scaling.type": ([1], V.ARRAY, V.UINT8)}, ["not a string"]),  # was numpy's ambiguous truth
        ({"tokenizer.ggml.tokens": ("abc", V.STRING)}, ["not a list of strings"]),
        ({"gemma3.attention.layer_norm_rms_epsilon": (-1.0, V.FLOAT32)}, ["norm_eps is -1.0"]),
        ({"gemma3.attention.sliding_window": (0, V.UINT32)}, ["sliding_window is 0"]),
    ],
)
def test_gguf_metadata_types_and_ranges(tmp_path, raw, needles):
    p = write_gguf(tmp_path / "x.gguf", tensors={}, raw=raw)
    err = _refused(lambda: config_from_gguf(GGUFFile(p)), *needles)
    assert str(p) in err.message


# --- Hugging Face: config.json and the safetensors header ---


def _edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    cfg = edit(cfg) or cfg
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, needles",
    [
        (lambda c: c.update(num_hidden_layers=10**9), ["num_hidden_layers is 1000000000"]),  # was a hang
        (lambda c: c.update(num_attention_heads=0), ["n_heads is 0"]),  # was ZeroDivisionError
        (lambda c: c.update(hidden_size="64"), ["hidden_size is '64'"]),
        (lambda c: c.update(vocab_size=True), ["vocab_size is True"]),
        (lambda c: c.update(intermediate_size=128.5), ["intermediate_size is 128.5"]),
        (lambda c: c.update(layer_types=5), ["layer_types is 5"]),
        (lambda c: c.update(layer_types=["full_attention"]), ["layer_types has 1 entries for 6 layers"]),
        (lambda c: c.update(eos_token_id=[]), ["eos_token_id is []"]),
        (lambda c: c.update(rope_parameters="x"), ["rope_parameters is 'x'"]),
        (lambda c: c.update(bos_token_id=10**6), ["bos_id is 1000000"]),
        (lambda c: c.update(rms_norm_eps=None), ["norm_eps is None"]),
        (lambda c: c.update(num_key_value_heads=3), ["not a multiple of n_kv_heads 3"]),
        (lambda c: c.pop("vocab_size") and None, ["has no vocab_size"]),
        (lambda c: [c], ["not a JSON object"]),
        (lambda c: {"model_type": "gemma3", "text_config": 7}, ["text_config is 7"]),
    ],
)
def test_config_json_types_and_ranges(tmp_path, edit, needles):
    folder = write_hf_folder(tmp_path / "hf")
    _edit_config(folder, edit)
    err = _refused(lambda: load_hf(folder), *needles)
    assert str(folder / "config.json") in err.message


def test_config_json_that_is_not_utf8_or_huge(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    (folder / "config.json").write_bytes(b'{"model_type": "\xff"}')  # was UnicodeDecodeError
    _refused(lambda: load_hf(folder), "not valid JSON")
    (folder / "config.json").write_bytes(b" " * (2 << 20))
    _refused(lambda: load_hf(folder), "not a model config")


def _header(folder):
    raw = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite_safetensors(folder, header, data):
    body = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + data)


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda h, d: (h, d[: len(d) // 2]), "outside its"),
        (lambda h, d: ({**h, "x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, d), "shape"),
        (lambda h, d: ({**h, "x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, d), "dtype 'F99'"),
        (lambda h, d: ({**h, "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, d), "do not fill"),
        (lambda h, d: ({**h, "x": [1]}, d), "is not an object"),
        # found by tests/test_fuzz.py: a list as dtype was a TypeError (unhashable) in the check itself
        (lambda h, d: ({**h, "x": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, d), "dtype ['F32']"),
        (lambda h, d: ([1], d), "not a JSON object"),
    ],
)
def test_safetensors_header_is_checked_against_the_file(tmp_path, damage, needle):
    folder = write_hf_folder(tmp_path / "hf")
    _rewrite_safetensors(folder, *damage(*_header(folder)))
    err = _refused(lambda: load_hf(folder), "not a readable safetensors file", needle)
    assert "model.safetensors" in err.message


def test_safetensors_header_length_beyond_the_file(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    _refused(lambda: load_hf(folder), "its header claims")
