"""GGUF: a fast reader, GemmaConfig from the metadata, and GGUF names -> our parameter names.

The reader parses the header, metadata and tensor table itself (gguf.GGUFReader spends ~15 s
on the 262,144-entry vocab arrays of a Gemma 3 file; this parses them in a fraction of a
second) and memory-maps the data section. Dequantization is gguf.quants.dequantize, so the
numbers are exactly llama.cpp's reference ones.

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian:
    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset)
    padding to general.alignment (default 32) | data section (tensor offsets are relative to it)
Strings are u64 length + UTF-8 bytes; arrays are u32 item type + u64 count + items.
GGUF dims are innermost first (ne0 = row length), the reverse of torch's order.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize as _gguf_dequantize

from edge.errors import EdgeError
from edge.models.config import (
    CONFIG_HINT,
    INT_LIMITS,
    Family,
    GemmaConfig,
    gemma2_layer_types,
    gemma3_layer_types,
)

_MAGIC = b"GGUF"
# v1 (2023) used 32-bit counts and lengths; llama.cpp itself no longer reads it.
SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_DEQUANT_SLICE_BYTES = 8 << 20
# ggml's GGML_MAX_DIMS; deeper array nesting than any converter writes (a recursion bomb otherwise).
_MAX_DIMS = 4
_MAX_ARRAY_DEPTH = 4
_MAX_ALIGNMENT = 1 << 20
# The fewest bytes one entry can take: a metadata pair (u64 key length, u32 type, a 1-byte value)
# and a tensor record (u64 name length, u32 n_dims, one u64 dim, u32 type, u64 offset). A count in
# the header is checked against them and the bytes left before anything is looped over.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8
_MIN_ITEM_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 4 + 8}
_CORRUPT_HINT = "the file is damaged or was not written by a GGUF converter; fetch or convert it again"

_SCALAR_FORMATS: dict[int, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order (GGUF dims reversed)
    offset: int  # absolute byte offset of the tensor's data in the file
    nbytes: int


class _Truncated(Exception):
    """The header runs past the end of the file."""


class _Cursor:
    """Sequential little-endian reads over the file's bytes (a memoryview of the memmap)."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0
        self.depth = 0

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise _Truncated

    def left(self) -> int:
        return len(self.buf) - self.pos

    def u32(self) -> int:
        self._need(4)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        self._need(8)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self) -> str:
        n = self.u64()
        self._need(n)
        s = str(self.buf[self.pos : self.pos + n], "utf-8")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            return self.array()
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise ValueError(f"unknown metadata value type {vtype}")
        size = struct.calcsize(fmt)
        self._need(size)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def array(self) -> Any:
        itype = self.u32()
        count = self.u64()
        fmt = _SCALAR_FORMATS.get(itype)
        if fmt is None and itype not in _MIN_ITEM_BYTES:
            raise ValueError(f"unknown metadata array item type {itype}")
        if count * (_MIN_ITEM_BYTES.get(itype) or struct.calcsize(fmt)) > self.left():
            raise _Truncated  # before the loop: a count of 2**64 would otherwise run until memory is gone
        if itype == GGUFValueType.STRING:
            return self._strings(count)
        if itype == GGUFValueType.ARRAY:
            if self.depth >= _MAX_ARRAY_DEPTH:
                raise ValueError(f"metadata arrays nested more than {_MAX_ARRAY_DEPTH} deep")
            self.depth += 1
            try:
                return [self.array() for _ in range(count)]
            finally:
                self.depth -= 1
        dtype = np.dtype(fmt)
        self._need(count * dtype.itemsize)
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * dtype.itemsize
        return out

    def _strings(self, count: int) -> list[str]:
        # The hot loop of the whole parse (262,144 tokens): local names, one unpack and one
        # decode per item.
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            if pos + 8 > end:
                raise _Truncated
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                raise _Truncated
            append(str(buf[pos : pos + n], "utf-8"))
            pos += n
        self.pos = pos
        return out


class GGUFFile:
    """A parsed GGUF file: .metadata, .tensors (torch-order shapes), raw blocks and dequantized arrays."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise EdgeError(f"{self.path} does not exist or is not a file", hint="give the path of a .gguf file")
        size = self.path.stat().st_size
        if size < 4:
            raise EdgeError(f"{self.path} is not a GGUF file ({size} bytes)", hint="give the path of a .gguf file")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.size = size
        try:
            self._parse(memoryview(self._data))
        except _Truncated:
            raise EdgeError(
                f"{self.path} is truncated: its header runs past the end of the file ({size:,} bytes)",
                hint="the download or copy was cut short; fetch the file again",
            ) from None
        except (UnicodeDecodeError, ValueError) as e:
            raise EdgeError(f"{self.path} has a corrupt GGUF header: {e}", hint=_CORRUPT_HINT) from None
        self._check_extent()

    def _parse(self, buf: memoryview) -> None:
        magic = bytes(buf[:4])
        if magic != _MAGIC:
            raise EdgeError(
                f"{self.path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
                hint="give a .gguf file (llama.cpp format), or a Hugging Face folder for safetensors",
            )
        cur = _Cursor(buf)
        cur.pos = 4
        self.version = cur.u32()
        if self.version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            what = "a big-endian GGUF" if swapped in SUPPORTED_VERSIONS else f"GGUF version {self.version}"
            raise EdgeError(
                f"{self.path} is {what}; only little-endian GGUF versions "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))} are supported",
                hint="re-convert the model with a current llama.cpp convert_hf_to_gguf.py",
            )
        n_tensors = cur.u64()
        n_kv = cur.u64()
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > cur.left():
            raise EdgeError(
                f"{self.path} is truncated or damaged: its header claims {n_kv:,} metadata entries and"
                f" {n_tensors:,} tensors, more than its {self.size:,} bytes can hold",
                hint=_CORRUPT_HINT,
            )
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            if key in self.metadata:
                raise ValueError(f"metadata key {key!r} appears twice")
            self.metadata[key] = cur.value(cur.u32())
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.u32()
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions (ggml allows 1 to {_MAX_DIMS})")
            dims = [cur.u64() for _ in range(n_dims)]
            type_id = cur.u32()
            rel = cur.u64()
            infos.append((name, dims, type_id, rel))
        align = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if (
            not isinstance(align, int | np.integer)
            or isinstance(align, bool | np.bool_)
            or not 0 < align <= _MAX_ALIGNMENT
            or align & (align - 1)
        ):
            raise ValueError(f"general.alignment is {align!r}, not a power of two up to {_MAX_ALIGNMENT}")
        align = int(align)
        self.data_offset = -(-cur.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, rel in infos:
            try:
                qtype = GGMLQuantizationType(type_id)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise EdgeError(
                    f"{self.path}: tensor {name} has unknown ggml type {type_id}",
                    hint="the file is newer than the installed gguf package; upgrade gguf",
                ) from None
            if name in self.tensors:
                raise ValueError(f"tensor {name!r} appears twice")
            if not all(0 < d <= self.size * block for d in dims):  # each element takes some bits of the file
                raise ValueError(f"tensor {name!r} has dimensions {dims}, impossible in a {self.size:,}-byte file")
            if dims[0] % block:
                raise EdgeError(
                    f"{self.path}: tensor {name} rows ({dims[0]}) are not whole {qtype.name} blocks",
                    hint=_CORRUPT_HINT,
                )
            if rel % align:
                raise ValueError(f"tensor {name!r} starts at offset {rel}, not a multiple of the alignment {align}")
            n = 1
            for d in dims:  # Python ints: numpy's int64 product wrapped around on absurd dims
                n *= d
            shape = tuple(int(d) for d in reversed(dims))
            self.tensors[name] = TensorInfo(name, qtype, shape, self.data_offset + rel, n // block * type_size)

    def _check_extent(self) -> None:
        if not self.tensors:
            return
        last = max(self.tensors.values(), key=lambda t: t.offset + t.nbytes)
        expected = last.offset + last.nbytes
        if expected > self.size:
            raise EdgeError(
                f"{self.path} is truncated: it has {self.size:,} bytes but its tensors need {expected:,} "
                f"(tensor {last.name} ends past the end of the file)",
                hint="the download or copy was cut short; fetch the file again",
            )

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def raw(self, name: str) -> tuple[GGMLQuantizationType, np.ndarray]:
        """The tensor's bytes as stored: uint8 view of the file, shape (*torch_shape[:-1], bytes per row).

        A row is torch_shape[-1] / block_size blocks of GGML_QUANT_SIZES[type][1] bytes each.
        """
        t = self._info(name)
        flat = self._data[t.offset : t.offset + t.nbytes]
        return t.ggml_type, flat.reshape(*t.shape[:-1], -1)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in torch order (a fresh, writable array)."""
        qtype, raw = self.raw(name)
        shape = self.tensors[name].shape
        rows = raw.reshape(-1, raw.shape[-1])  # (n_rows, bytes per row)
        out = np.empty((rows.shape[0], shape[-1]), dtype=np.float32)
        # In slices of rows: gguf.quants builds its result from a list of per-group pieces, which
        # would briefly double the 671 MB fp32 embedding of a 262k vocab.
        step = max(1, _DEQUANT_SLICE_BYTES // max(1, raw.shape[-1]))
        try:
            for s in range(0, rows.shape[0], step):
                out[s : s + step] = _gguf_dequantize(rows[s : s + step], qtype)
        except NotImplementedError:
            raise EdgeError(
                f"{self.path}: tensor {name} is {qtype.name}, which gguf.quants cannot dequantize",
                hint="re-quantize the model to a common type (Q8_0, Q4_K_M, F16)",
            ) from None
        return out.reshape(shape)

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise EdgeError(f"{self.path} has no tensor {name!r}", hint="is this a Gemma text model's GGUF?")
        return self.tensors[name]

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, arch={self.architecture!r}, tensors={len(self.tensors)})"


# --- GemmaConfig from the metadata ------------------------------------------------------------


@dataclass(frozen=True)
class _FamilyFacts:
    """What a Gemma family's GGUF does not say, i.e. what llama.cpp and transformers hard-code."""

    family: Family
    layer_types: Callable[[int], tuple[bool, ...]]  # True = sliding-window layer
    has_window: bool
    local_theta: float | None  # sliding layers' rope base; None = same as the global one
    attn_softcap: float | None  # used when the GGUF has no {arch}.attn_logit_softcapping
    final_softcap: float | None
    post_norms: bool
    qk_norm: bool


FAMILIES: dict[str, _FamilyFacts] = {
    "gemma": _FamilyFacts(Family.GEMMA1, lambda n: (False,) * n, False, None, None, None, False, False),
    # llama.cpp's defaults when a Gemma 2 file lacks the softcap keys: 50 and 30, as in HF's config.
    "gemma2": _FamilyFacts(Family.GEMMA2, gemma2_layer_types, True, None, 50.0, 30.0, True, False),
    # Gemma 3: local layers use rope base 10k (HF rope_local_base_freq), global ones {arch}.rope.freq_base.
    "gemma3": _FamilyFacts(Family.GEMMA3, gemma3_layer_types, True, 10_000.0, None, None, True, True),
}

# Gemma 2/3 scale attention scores by query_pre_attn_scalar ** -0.5. It equals head_dim (256) for
# every size except the 27B models, where it is dim / n_heads (HF configs: 144 = 4608/32 for
# Gemma 2 27B, 168 = 5376/32 for Gemma 3 27B). The GGUF has no key for it; llama.cpp
# (llama-model.cpp) recognizes the 27B by its layer count, as we do here.
_SCALAR_IS_DIM_OVER_HEADS: set[tuple[Family, int]] = {(Family.GEMMA2, 46), (Family.GEMMA3, 62)}

_REQUIRED = object()


def config_from_gguf(f: GGUFFile) -> GemmaConfig:
    """The architecture facts of a Gemma 1/2/3 GGUF; defaults the file does not carry come from FAMILIES."""
    arch = f.architecture
    facts = FAMILIES.get(arch)
    if facts is None:
        raise EdgeError(
            f"{f.path} holds a {arch or 'unnamed'!r} model; only Gemma 1/2/3 text models "
            f"(GGUF architectures {', '.join(FAMILIES)}) are supported",
            hint="pick a Gemma GGUF, e.g. gemma-3-270m",
        )

    def key(name: str, default: Any = _REQUIRED) -> Any:
        full = f"{arch}.{name}"
        if full in f.metadata:
            return f.metadata[full]
        if default is _REQUIRED:
            raise EdgeError(f"{f.path} lacks the metadata key {full}", hint="the GGUF is incomplete; re-convert it")
        return default

    def per_layer(name: str, limit: str) -> int:
        # Some converters write per-layer arrays; one value for every layer is all we support.
        v = key(name)
        if isinstance(v, np.ndarray | list):
            values = {_whole(f, f"{arch}.{name}", x, INT_LIMITS[limit]) for x in v}
            if len(values) != 1:
                raise EdgeError(
                    f"{f.path}: {arch}.{name} varies per layer ({sorted(values)[:8]}), which is unsupported",
                    hint="only models with the same value in every layer (every Gemma) load",
                )
            return values.pop()
        return _whole(f, f"{arch}.{name}", v, INT_LIMITS[limit])

    def whole(name: str, limit: str | None, default: Any = _REQUIRED, lo: int = 1) -> int:
        return _whole(f, f"{arch}.{name}", key(name, default), INT_LIMITS.get(limit, 1 << 31), lo)

    def real(name: str, default: Any = _REQUIRED) -> float | None:
        v = key(name, default)
        return None if v is None else _real(f, f"{arch}.{name}", v)

    scaling = key("rope.scaling.type", "none")
    if not isinstance(scaling, str):
        raise EdgeError(f"{f.path}: {arch}.rope.scaling.type is {_show(scaling)}, not a string", hint=CONFIG_HINT)
    factor = real("rope.scaling.factor", 1.0)
    if scaling != "none" or factor != 1.0:
        raise EdgeError(
            f"{f.path} uses rope scaling ({_show(scaling)}, factor {factor}), which GemmaConfig cannot express yet",
            hint="the models without rope scaling (Gemma 3 270M and 1B, Gemma 1/2) load",
        )

    # The sizes are checked against INT_LIMITS as they are read: the per-layer tables below are
    # built from them before GemmaConfig would see them.
    n_layers = whole("block_count", "n_layers")
    dim = whole("embedding_length", "dim")
    n_heads = per_layer("attention.head_count", "n_heads")
    head_dim = whole("attention.key_length", "head_dim", dim // n_heads)
    value_dim = whole("attention.value_length", "head_dim", head_dim)
    if value_dim != head_dim:
        raise EdgeError(
            f"{f.path}: key length {head_dim} != value length {value_dim}, which Gemma never has",
            hint="is this a Gemma GGUF? Its attention keys and values have the same length",
        )
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if not isinstance(tokens, list):
            raise EdgeError(
                f"{f.path}: tokenizer.ggml.tokens is {_show(tokens)}, not a list of strings", hint=_CORRUPT_HINT
            )
        vocab = len(tokens)
    elif "token_embd.weight" in f.tensors:
        vocab = f.tensors["token_embd.weight"].shape[0]
    else:
        raise EdgeError(f"{f.path} has neither a token list nor token_embd.weight", hint="the GGUF is incomplete")

    theta = real("rope.freq_base", 10_000.0)
    window = whole("attention.sliding_window", "sliding_window") if facts.has_window else None
    pattern = key("attention.sliding_window_pattern", None)
    if not facts.has_window:
        layer_types = (False,) * n_layers
    elif pattern is None:
        layer_types = facts.layer_types(n_layers)
    elif isinstance(pattern, np.ndarray | list):  # one bool per layer, True = sliding
        if len(pattern) != n_layers or not all(isinstance(x, bool | np.bool_) for x in pattern):
            raise EdgeError(
                f"{f.path}: {arch}.attention.sliding_window_pattern is {_show(pattern)}, not one true/false for each"
                f" of its {n_layers} layers",
                hint=_CORRUPT_HINT,
            )
        layer_types = tuple(bool(x) for x in pattern)
    else:  # every pattern-th layer is global (llama.cpp's set_swa_pattern)
        p = _whole(f, f"{arch}.attention.sliding_window_pattern", pattern, INT_LIMITS["n_layers"], lo=0)
        layer_types = tuple(p == 0 or i % p < p - 1 for i in range(n_layers))
    family = facts.family
    if family == Family.GEMMA1:
        scalar = float(head_dim)
    elif (family, n_layers) in _SCALAR_IS_DIM_OVER_HEADS:
        scalar = float(dim // n_heads)
    else:
        scalar = float(head_dim)
    attn_cap = real("attn_logit_softcapping", facts.attn_softcap)
    final_cap = real("final_logit_softcapping", facts.final_softcap)
    local_theta = real("rope.freq_base_swa", facts.local_theta if facts.local_theta is not None else theta)

    meta = f.metadata

    def token_id(name: str, default: int) -> int:
        return _whole(f, name, meta.get(name, default), INT_LIMITS["vocab_size"], lo=0)

    try:
        return GemmaConfig(
            family=family,
            vocab_size=vocab,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=per_layer("attention.head_count_kv", "n_kv_heads")
            if f"{arch}.attention.head_count_kv" in meta
            else n_heads,
            head_dim=head_dim,
            hidden_dim=per_layer("feed_forward_length", "hidden_dim"),
            norm_eps=real("attention.layer_norm_rms_epsilon", 1e-6),
            query_pre_attn_scalar=scalar,
            rope_theta=theta,
            rope_local_theta=local_theta,
            sliding_window=window,
            layer_types=layer_types,
            attn_softcap=attn_cap,
            final_softcap=final_cap,
            post_norms=facts.post_norms,
            qk_norm=facts.qk_norm,
            tie_embeddings="output.weight" not in f.tensors,
            max_position=whole("context_length", "max_position", 8192),
            bos_id=token_id("tokenizer.ggml.bos_token_id", 2),
            eos_id=token_id("tokenizer.ggml.eos_token_id", 1),
            pad_id=token_id("tokenizer.ggml.padding_token_id", 0),
        )
    except EdgeError as e:  # GemmaConfig's own checks (token ids in range, heads divide): name the file
        raise EdgeError(f"{f.path}: {e.message}", hint=e.hint) from None


def _show(v: object) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _whole(f: GGUFFile, key: str, v: Any, hi: int, lo: int = 1) -> int:
    """A metadata value that must be a whole number in lo..hi (a GGUF integer type, not bool/float/string)."""
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v.item()
    if not isinstance(v, int | np.integer) or isinstance(v, bool | np.bool_) or not lo <= v <= hi:
        raise EdgeError(f"{f.path}: {key} is {_show(v)}, not a whole number from {lo} to {hi:,}", hint=CONFIG_HINT)
    return int(v)


def _real(f: GGUFFile, key: str, v: Any) -> float:
    """A metadata value that must be a finite number (an integer or float type)."""
    if isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_):
        if np.isfinite(v):
            return float(v)
    raise EdgeError(f"{f.path}: {key} is {_show(v)}, not a finite number", hint=CONFIG_HINT)


# --- GGUF names -> our names -------------------------------------------------------------------


def _as_is(w: np.ndarray) -> np.ndarray:
    return w


def _minus_one(w: np.ndarray) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py stores 1 + w for every Gemma RMSNorm weight (all families,
    # q/k norms included) because ggml's rms_norm multiplies by the weight directly. We keep the
    # HF convention (w, with the model computing x * (1 + w)), so undo the offset.
    w -= 1.0
    return w


# GGUF name -> our name, and the transform. "{i}" is the block index.
# - No transpose: both store Linear weights [out, in]; the reader reverses GGUF's innermost-first
#   dims into torch order.
# - No Q/K permutation: llama.cpp runs Gemma with NEOX (half-split) rope, HF's layout, so
#   convert_hf_to_gguf.py leaves attn_q/attn_k alone (the interleaving permute is Llama-only).
# - token_embd is stored unscaled; the model multiplies embeddings by sqrt(dim) at run time.
# - ffn_norm is the pre-MLP norm in every family; post_attention_norm/post_ffw_norm (Gemma 2/3)
#   are applied to the attention and MLP outputs.
NAME_MAP: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray]], ...] = (
    ("token_embd.weight", "embed.weight", _as_is),
    ("output_norm.weight", "norm.weight", _minus_one),
    ("output.weight", "lm_head.weight", _as_is),  # only in untied files
    ("blk.{i}.attn_norm.weight", "layers.{i}.attn_norm.weight", _minus_one),
    ("blk.{i}.attn_q.weight", "layers.{i}.attn.wq.weight", _as_is),
    ("blk.{i}.attn_k.weight", "layers.{i}.attn.wk.weight", _as_is),
    ("blk.{i}.attn_v.weight", "layers.{i}.attn.wv.weight", _as_is),
    ("blk.{i}.attn_output.weight", "layers.{i}.attn.wo.weight", _as_is),
    ("blk.{i}.attn_q_norm.weight", "layers.{i}.attn.q_norm.weight", _minus_one),  # Gemma 3
    ("blk.{i}.attn_k_norm.weight", "layers.{i}.attn.k_norm.weight", _minus_one),  # Gemma 3
    ("blk.{i}.post_attention_norm.weight", "layers.{i}.post_attn_norm.weight", _minus_one),  # Gemma 2/3
    ("blk.{i}.ffn_norm.weight", "layers.{i}.mlp_norm.weight", _minus_one),
    ("blk.{i}.post_ffw_norm.weight", "layers.{i}.post_mlp_norm.weight", _minus_one),  # Gemma 2/3
    ("blk.{i}.ffn_gate.weight", "layers.{i}.mlp.gate.weight", _as_is),
    ("blk.{i}.ffn_up.weight", "layers.{i}.mlp.up.weight", _as_is),
    ("blk.{i}.ffn_down.weight", "layers.{i}.mlp.down.weight", _as_is),
)
_GLOBAL_RULES = {g: (ours, fn) for g, ours, fn in NAME_MAP if "{i}" not in g}
_BLOCK_RULES = {g.removeprefix("blk.{i}."): (ours, fn) for g, ours, fn in NAME_MAP if "{i}" in g}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_to_ours(name: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
    """Our parameter name and the transform for a GGUF tensor name; None when NAME_MAP has no rule."""
    if name in _GLOBAL_RULES:
        return _GLOBAL_RULES[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _BLOCK_RULES:
        ours, fn = _BLOCK_RULES[m.group(2)]
        return ours.format(i=m.group(1)), fn
    return None


def _ours_to_gguf(ours: str) -> str:
    for g, o, _ in NAME_MAP:
        if "{i}" not in o and o == ours:
            return g
        m = re.fullmatch(re.escape(o).replace(r"\{i\}", r"(\d+)"), ours)
        if m:
            return g.format(i=m.group(1))
    return ours


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{len(names)} ({shown}{', ...' if len(names) > limit else ''})"


def load_gguf(
    path: str | Path | GGUFFile,
    config: GemmaConfig | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[GemmaConfig, dict[str, torch.Tensor]]:
    """Read a Gemma GGUF: (config, {our name: fp32 tensor}). Checks names and shapes before dequantizing.

    config overrides the one read from the metadata (shapes are then checked against it).
    progress(our_name, i, n) is called after each tensor.
    """
    from edge.models.weights import expected_shapes

    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    cfg = config or config_from_gguf(f)
    want = expected_shapes(cfg)

    plan: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = []  # (gguf name, ours, transform)
    unexpected = []
    for name in f.tensors:
        rule = gguf_to_ours(name)
        if rule is None or rule[0] not in want:
            unexpected.append(name)
        else:
            plan.append((name, *rule))
    found = {ours for _, ours, _ in plan}
    missing = [_ours_to_gguf(n) for n in want if n not in found]
    if missing or unexpected:
        parts = ([f"missing {_some(missing)}"] if missing else []) + (
            [f"unexpected {_some(unexpected)}"] if unexpected else []
        )
        raise EdgeError(
            f"{f.path}: the tensors do not match a {cfg.n_layers}-layer {cfg.family.value} model: {'; '.join(parts)}",
            hint="is the file complete, and a text-only Gemma GGUF? (vision towers live in a separate mmproj file)",
        )
    bad = [
        f"{g} {f.tensors[g].shape} (expected {want[ours]})" for g, ours, _ in plan if f.tensors[g].shape != want[ours]
    ]
    if bad:
        raise EdgeError(
            f"{f.path}: tensor shapes do not match the config: {_some(bad, 3)}",
            hint="the config belongs to another model size" if config else "the GGUF metadata and tensors disagree",
        )

    out: dict[str, torch.Tensor] = {}
    for i, (g, ours, transform) in enumerate(plan):
        out[ours] = torch.from_numpy(transform(f.dequantize(g)))
        if progress is not None:
            progress(ours, i + 1, len(plan))
    return cfg, out
