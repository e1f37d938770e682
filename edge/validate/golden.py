"""golden.npz: the golden prompts' ids and the fp32 reference's top-k logits at every position.

The reference is our re-authored model in fp32, eager: on the real 270M it equals transformers
reading the same GGUF exactly (max |dlogit| 0.0, tests/test_real_model.py), and it needs no
second model in memory. The validator's `reference` stage re-checks that equality.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.validate.metrics import Reference
from edge.validate.prompts import GOLDEN_PROMPTS

TOP_K = 128


@dataclass
class GoldenPrompt:
    name: str
    ids: np.ndarray  # (T,) int32, BOS first
    ref: Reference


def prompt_ids(tokenizer, vocab_size: int, max_len: int) -> dict[str, list[int]]:
    """Golden prompt ids; ids beyond a (random-weight) model's vocabulary become <unk>; cut to fit the cache."""
    out = {}
    for name, (text, chat) in GOLDEN_PROMPTS.items():
        ids = tokenizer.encode(tokenizer.chat_prompt(text) if chat else text, bos=True)
        out[name] = [i if i < vocab_size else 3 for i in ids][: max_len - 1]
    return out


def capture(model, tokenizer, max_seq_len: int, k: int = TOP_K) -> list[GoldenPrompt]:
    """Run the fp32 eager model over every golden prompt from an empty cache."""
    from edge.runtime.eager import EagerRunner

    runner = EagerRunner(model)
    vocab = model.cfg.vocab_size
    k = min(k, vocab)
    return [
        GoldenPrompt(name, np.asarray(ids, np.int32), Reference.from_logits(runner.all_logits(ids), k))
        for name, ids in prompt_ids(tokenizer, vocab, max_seq_len).items()
    ]


def save(path: Path, prompts: list[GoldenPrompt]) -> None:
    arrays = {"names": np.array([p.name for p in prompts])}
    for p in prompts:
        arrays |= {f"{p.name}.ids": p.ids, f"{p.name}.topk_idx": p.ref.topk_idx,
                   f"{p.name}.topk_logit": p.ref.topk_logit, f"{p.name}.lse": p.ref.lse}  # fmt: skip
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


# All arrays of an .npz together, uncompressed: far above a golden file or logits dump of any Gemma
# (the 270M's golden.npz holds ~2 MB), far below what a compressed "zip bomb" could ask of memory.
MAX_NPZ_BYTES = 1 << 30
# What a damaged .npz raises from zipfile, zlib or numpy's .npy reader: all mean "not this file".
_NPZ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, RuntimeError, NotImplementedError,
               zipfile.BadZipFile, zlib.error, struct.error)  # fmt: skip


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@contextmanager
def read_npz(path: str | Path, what: str, hint: str) -> Iterator[np.lib.npyio.NpzFile]:
    """np.load of an .npz we wrote, with every failure an EdgeError naming the file: its members' .npy
    headers are read first, and an array larger than its member's bytes, or all of them larger than
    MAX_NPZ_BYTES, is refused before numpy allocates it. Reading arrays inside the block is covered."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            total = 0
            for info in zf.infolist():
                with zf.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version not in _HEADER_READERS:
                        raise ValueError(f"{info.filename} is a .npy of version {version}")
                    shape, _, dtype = _HEADER_READERS[version](member)
                n = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if n > info.file_size or dtype.hasobject:
                    raise ValueError(f"{info.filename} claims {n:,} bytes of {dtype} in {info.file_size:,}")
                total += n
        if total > MAX_NPZ_BYTES:
            raise ValueError(f"its arrays hold {total:,} bytes, more than {MAX_NPZ_BYTES:,}")
        with np.load(path, allow_pickle=False) as z:
            yield z
    except OSError as e:  # absent, unreadable: the file itself is not there to judge
        raise EdgeError(f"cannot read {path}: {e.strerror or e}", hint=hint) from None
    except _NPZ_ERRORS as e:
        raise EdgeError(f"{path} is not {what} ({type(e).__name__}: {str(e)[:200]})", hint=hint) from None


def _array(path: Path, z, key: str, ndim: int, kind: str, rows: int | None = None) -> np.ndarray:
    a = z[key]
    if a.ndim != ndim or a.dtype.kind not in kind or (rows is not None and a.shape[0] != rows) or not a.size:
        raise EdgeError(
            f"{path}: {key} is a {a.dtype} array of shape {a.shape}, not what golden.npz holds",
            hint="export the bundle again",
        )
    return a


def load(path: Path, vocab_size: int | None = None, max_len: int | None = None) -> list[GoldenPrompt]:
    """The golden prompts; every array's shape and dtype is checked, and with vocab_size / max_len the
    ids too (a runner fed an id outside its vocabulary or past its cache fails inside the runtime)."""
    path = Path(path)
    hint = "export the bundle again"
    out = []
    with read_npz(path, "a golden.npz", hint) as z:
        names = _array(path, z, "names", 1, "U")
        if len(set(names.tolist())) != len(names):
            raise EdgeError(f"{path}: the prompt names repeat", hint=hint)
        for n in names.tolist():
            ids = _array(path, z, f"{n}.ids", 1, "iu")
            t = len(ids)
            idx = _array(path, z, f"{n}.topk_idx", 2, "iu", t)
            logit = _array(path, z, f"{n}.topk_logit", 2, "f", t)
            lse = _array(path, z, f"{n}.lse", 1, "f", t)
            if logit.shape != idx.shape:
                raise EdgeError(f"{path}: {n}.topk_logit and {n}.topk_idx differ in shape", hint=hint)
            top = vocab_size if vocab_size is not None else np.iinfo(np.int64).max
            if ids.min() < 0 or idx.min() < 0 or ids.max() >= top or idx.max() >= top:
                raise EdgeError(f"{path}: prompt {n} has token ids outside the vocabulary", hint=hint)
            if max_len is not None and t > max_len:
                raise EdgeError(f"{path}: prompt {n} has {t} tokens, more than the cache's {max_len}", hint=hint)
            out.append(GoldenPrompt(str(n), ids, Reference(idx, logit, lse)))
    return out
