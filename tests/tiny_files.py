"""Tiny synthetic input files for the reader tests and the fuzzers: GGUF, HF folders, bundles, dumps.

Each is built in milliseconds from code, so a test (or each of a fuzzer's examples) can damage a fresh
copy of a known-good file instead of downloading or exporting one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType, GGUFWriter
from gguf.quants import quantize

VOCAB = 300
DIM, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 64, 2, 1, 32, 128


def tiny_tensors(arch: str, n_layers: int = 2, seed: int = 0) -> dict[str, tuple[np.ndarray, Q]]:
    """GGUF name -> (float32 values in torch order, storage type) for a tiny Gemma of that family."""
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0, 0.02, (rows, cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:  # stored as 1 + w, like llama.cpp's converter writes them
        return (1.0 + rng.normal(0, 0.1, n)).astype(np.float32)

    t = {"token_embd.weight": (mat(VOCAB, DIM), Q.Q8_0), "output_norm.weight": (norm(DIM), Q.F32)}
    for i in range(n_layers):
        b = f"blk.{i}."
        t |= {
            b + "attn_norm.weight": (norm(DIM), Q.F32),
            b + "attn_q.weight": (mat(HEADS * HEAD_DIM, DIM), Q.F16),
            b + "attn_k.weight": (mat(KV_HEADS * HEAD_DIM, DIM), Q.Q8_0),
            b + "attn_v.weight": (mat(KV_HEADS * HEAD_DIM, DIM), Q.BF16),
            b + "attn_output.weight": (mat(DIM, HEADS * HEAD_DIM), Q.F32),
            b + "ffn_norm.weight": (norm(DIM), Q.F32),
            b + "ffn_gate.weight": (mat(HIDDEN, DIM), Q.Q8_0),
            b + "ffn_up.weight": (mat(HIDDEN, DIM), Q.F16),
            b + "ffn_down.weight": (mat(DIM, HIDDEN), Q.Q8_0),
        }
        if arch in ("gemma2", "gemma3"):
            t |= {b + "post_attention_norm.weight": (norm(DIM), Q.F32), b + "post_ffw_norm.weight": (norm(DIM), Q.F32)}
        if arch == "gemma3":
            t |= {b + "attn_q_norm.weight": (norm(HEAD_DIM), Q.F32), b + "attn_k_norm.weight": (norm(HEAD_DIM), Q.F32)}
    return t


def write_gguf(
    path: Path,
    arch: str = "gemma3",
    tensors: dict | None = None,
    n_layers: int = 2,
    raw: dict | None = None,
    **meta,
) -> Path:
    """A tiny Gemma GGUF. raw: {key: (value, GGUFValueType[, item type])} written as given, over
    what the writer set (wrong types, absurd values), or {key: None} to leave the key out."""
    tensors = tiny_tensors(arch, n_layers) if tensors is None else tensors
    w = GGUFWriter(path, arch)
    w.add_block_count(n_layers)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(HIDDEN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_context_length(1024)
    w.add_rope_freq_base(meta.pop("rope_freq_base", 1e6 if arch == "gemma3" else 1e4))
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(meta.pop("sliding_window", 16))
    for key, value in meta.items():  # extra keys, e.g. attn_logit_softcapping=50.0
        getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>"] + [f"t{i}" for i in range(4, VOCAB)])
    w.add_token_types([3, 3, 3, 3] + [1] * (VOCAB - 4))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    for key, spec in (raw or {}).items():
        if spec is None:
            w.kv_data[0].pop(key, None)
        else:
            w.add_key_value(key, *spec)
    for name, (values, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, quantize(values, qtype))
        else:
            w.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_boundaries(path: Path) -> list[int]:
    """Every offset where a GGUF section or field ends: after the magic, version and counts, after each
    metadata key and value, each tensor record, the header's padding and each tensor's data. Cutting
    the file at one of them leaves a prefix that parses up to a clean edge: the hardest truncations."""
    from edge.models.weights import gguf as g

    data = path.read_bytes()
    cur = g._Cursor(memoryview(data))
    cuts = [4, 8, 16, 24]
    cur.pos = 8
    n_tensors, n_kv = cur.u64(), cur.u64()
    for _ in range(n_kv):
        cur.string()
        cuts.append(cur.pos)
        cur.value(cur.u32())
        cuts.append(cur.pos)
    for _ in range(n_tensors):
        cur.string()
        [cur.u64() for _ in range(cur.u32())]
        cur.u32()
        cur.u64()
        cuts.append(cur.pos)
    f = g.GGUFFile(path)
    cuts += [f.data_offset] + [t.offset + t.nbytes for t in f.tensors.values()]
    return sorted(set(c for c in cuts if c < len(data)))


# --- a Hugging Face folder ---


def write_hf_folder(folder: Path, family=None) -> Path:
    """config.json and model.safetensors of a tiny random Gemma, without transformers (milliseconds)."""
    from safetensors.torch import save_file

    from conftest import tiny_config
    from edge.models.config import Family
    from edge.models.weights import random_tensors
    from edge.models.weights.hf import config_to_hf, to_hf_state_dict

    cfg = tiny_config(family or Family.GEMMA3)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    save_file(to_hf_state_dict(cfg, random_tensors(cfg)), str(folder / "model.safetensors"))
    return folder


# --- a bundle (manifest, tokenizer, golden.npz, a stand-in artifact) and a device dump ---


def tiny_tokenizer_bytes(tmp: Path) -> bytes:
    """A SentencePiece model built from the tiny GGUF's vocabulary."""
    from edge.models.tokenizer import Tokenizer

    return Tokenizer.from_gguf(write_gguf(tmp / "vocab.gguf", tensors={})).model_bytes


def golden_prompts(n: int = 2, length: int = 6, k: int = 8, seed: int = 0):
    from edge.validate.golden import GoldenPrompt
    from edge.validate.metrics import Reference

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = np.concatenate([[2], rng.integers(4, VOCAB, length - 1)]).astype(np.int32)
        ref = Reference.from_logits(rng.normal(size=(length, VOCAB)).astype(np.float32), k)
        out.append(GoldenPrompt(f"p{i}", ids, ref))
    return out


def write_bundle(out: Path) -> Path:
    """A bundle that bundle.load verifies: its manifest, a tokenizer and golden.npz that read, and a
    stand-in artifact (never run: the fuzzed readers stop before a runtime)."""
    from edge import bundle as bundle_mod
    from edge.validate import golden

    work = out.with_name(f".{out.name}.work")
    work.mkdir(parents=True)
    (work / "model.pte").write_bytes(b"a stand-in artifact")
    (work / "tokenizer.model").write_bytes(tiny_tokenizer_bytes(out.parent))
    golden.save(work / "golden.npz", golden_prompts())
    manifest = {
        "variant": "tiny-test",
        "backend": "xnnpack",
        "artifact": "model.pte",
        "max_seq_len": 64,
        "arch": {"vocab_size": VOCAB, "sliding_window": 8},
        "special_ids": {"bos": 2, "eos": 1},
        "tokenizer": {"file": "tokenizer.model"},
        "golden": {"file": "golden.npz"},
        "quant": {"scheme": {"name": "fp32"}},
        "io": {},
    }
    bundle_mod.finalize(work, out, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return out


def write_dump(path: Path, prompts=None, bundle_sha256: str = "0" * 64) -> Path:
    """A device logits dump (`edge validate --dump-logits`) of random logits on the golden prompts."""
    from edge.validate import stages as st
    from edge.validate.metrics import Observed

    rng = np.random.default_rng(1)
    observed = {}
    for p in prompts or golden_prompts():
        logits = rng.normal(size=(len(p.ids), VOCAB)).astype(np.float32)
        observed[p.name] = Observed.from_logits(p.ref, logits, st.targets_of(p))
    st.dump(path, observed, {"bundle_sha256": bundle_sha256})
    return path


# --- GGUF bytes by hand: the layouts GGUFWriter refuses to write ---


def gguf_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(8, "little") + b


def gguf_bytes(kvs: list[bytes] = (), tensors: list[tuple[str, list[int], int, int]] = (), data: bytes = b"",
               n_kv: int | None = None, n_tensors: int | None = None) -> bytes:  # fmt: skip
    """A GGUF v3 file from encoded metadata pairs (key string + u32 type + value) and tensor records
    (name, GGUF-order dims, ggml type, offset); the counts may lie."""
    out = b"GGUF" + (3).to_bytes(4, "little")
    out += (len(tensors) if n_tensors is None else n_tensors).to_bytes(8, "little")
    out += (len(kvs) if n_kv is None else n_kv).to_bytes(8, "little")
    out += b"".join(kvs)
    for name, dims, qtype, offset in tensors:
        out += gguf_string(name) + len(dims).to_bytes(4, "little")
        out += b"".join(d.to_bytes(8, "little") for d in dims)
        out += qtype.to_bytes(4, "little") + offset.to_bytes(8, "little")
    out += bytes(-len(out) % 32)
    return out + data


def gguf_u32_kv(key: str, value: int) -> bytes:
    return gguf_string(key) + int(GGUFValueType.UINT32).to_bytes(4, "little") + value.to_bytes(4, "little")
