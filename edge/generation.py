"""The generation loop, shared by every runner: prefill, then one token at a time, streamed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edge.errors import EdgeError
from edge.models.tokenizer import StreamDecoder, Tokenizer
from edge.runtime import Runner


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf"):  # NaN fails too: it compares false both ways
            raise EdgeError(
                f"--temperature {self.temperature} is not a finite value >= 0", hint="use 0 for greedy, or e.g. 0.8"
            )
        if self.top_k is not None and self.top_k < 1:
            raise EdgeError(
                f"--top-k {self.top_k} must be at least 1", hint="omit it to sample from the full vocabulary"
            )


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    prefill_tok_s: float
    decode_tok_s: float
    time_to_first_token_s: float
    stop_reason: str  # eos | max_new_tokens | cache_full
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "prompt_ids": self.prompt_ids,
            "output_ids": self.output_ids,
            "text": self.text,
            "prefill_tok_s": round(self.prefill_tok_s, 2),
            "decode_tok_s": round(self.decode_tok_s, 2),
            "time_to_first_token_s": round(self.time_to_first_token_s, 4),
            "stop_reason": self.stop_reason,
        } | self.extra


def pick(logits: np.ndarray, sampling: SamplingConfig, rng: np.random.Generator) -> int:
    if sampling.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < z.shape[0]:
        kth = np.partition(z, -sampling.top_k)[-sampling.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    return int(rng.choice(z.shape[0], p=p / p.sum()))


def encode_prompt(tokenizer: Tokenizer, prompt: str, chat: bool) -> list[int]:
    from edge.paths import utf8_text

    prompt = utf8_text(prompt, "the prompt")
    text = tokenizer.chat_prompt(prompt) if chat else prompt
    return tokenizer.encode(text, bos=True)


def generate(
    runner: Runner,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    sampling = sampling or SamplingConfig()
    if max_new_tokens < 1:
        raise EdgeError(f"--max-new-tokens {max_new_tokens} must be at least 1", hint="try --max-new-tokens 64")
    if len(prompt_ids) >= runner.max_seq_len:
        raise EdgeError(
            f"the prompt has {len(prompt_ids)} tokens; the KV cache holds {runner.max_seq_len} positions",
            hint="shorten the prompt, or raise --max-seq-len (for a bundle: export with a larger --max-seq-len)",
        )
    too_big = [i for i in prompt_ids if i >= runner.vocab_size]
    if too_big:
        raise EdgeError(
            f"the prompt has token ids beyond the model's vocabulary of {runner.vocab_size} (e.g. {too_big[0]})",
            hint="the tokenizer does not belong to this model",
        )
    rng = np.random.default_rng(sampling.seed)
    stops = set(tokenizer.stop_ids)
    stream = StreamDecoder(tokenizer)
    runner.reset()
    t0 = time.perf_counter()
    logits = runner.prefill(prompt_ids)
    t_prefill = time.perf_counter() - t0
    out: list[int] = []
    stop_reason = "max_new_tokens"
    t1 = time.perf_counter()
    pos = len(prompt_ids)
    while True:
        tok = pick(logits, sampling, rng)
        if tok in stops:
            stop_reason = "eos"
            break
        out.append(tok)
        piece = stream.feed(tok)
        if piece and on_text:
            on_text(piece)
        if len(out) >= max_new_tokens:
            break
        if pos >= runner.max_seq_len:
            stop_reason = "cache_full"
            break
        logits = runner.decode(tok)
        pos += 1
    t_decode = time.perf_counter() - t1
    tail = stream.flush() if hasattr(stream, "flush") else ""
    if tail and on_text:
        on_text(tail)
    n_decoded = pos - len(prompt_ids)  # decode() calls made
    return GenerationResult(
        prompt_ids=list(prompt_ids),
        output_ids=out,
        text=tokenizer.decode(out),
        prefill_tok_s=len(prompt_ids) / t_prefill if t_prefill > 0 else 0.0,
        decode_tok_s=n_decoded / t_decode if n_decoded and t_decode > 0 else 0.0,
        time_to_first_token_s=t_prefill,
        stop_reason=stop_reason,
    )
