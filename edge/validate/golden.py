"""golden.npz: the golden prompts' ids and the fp32 reference's top-k logits at every position.

The reference is our re-authored model in fp32, eager: on the real 270M it equals transformers
reading the same GGUF exactly (max |dlogit| 0.0, tests/test_real_model.py), and it needs no
second model in memory. The validator's `reference` stage re-checks that equality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def load(path: Path) -> list[GoldenPrompt]:
    with np.load(path, allow_pickle=False) as z:
        return [
            GoldenPrompt(str(n), z[f"{n}.ids"], Reference(z[f"{n}.topk_idx"], z[f"{n}.topk_logit"], z[f"{n}.lse"]))
            for n in z["names"]
        ]
