"""`edge bench`: what a user of the artifact feels, measured through the bundle's own runner.

Load time; time to first token (the prompt's prefill plus picking the first token); prefill and decode
tokens/s; per-token decode latency (median and p90); memory (RSS once the model is loaded, and the
process's peak). The prompt is real text in the bundle's tokenizer, cut to `prompt_len` tokens; decode
is greedy for `gen_len` steps. A warm-up round (not counted) lets the runtime allocate, then `repeats`
rounds are timed and their medians reported, so that one hiccup of a shared machine does not decide.

Nothing here imports torch for a .tflite or .onnx bundle: it runs on a Raspberry Pi with numpy and the
runtime. The runners pass through the common protocol (edge/runtime): for .tflite that includes
copying the KV cache through Python on every call, which LiteRT-LM does not do, so a .tflite's decode
figure here is a floor for what the stock runtime reaches.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.progress import peak_rss_mb

# Plain prose, repeated as needed: the prompt's content does not change a dense model's arithmetic, but
# real tokens keep the timing honest for runtimes that special-case ids (and read like what users send).
PROSE = (
    "The harbour town woke slowly. Fishermen checked their nets while the bakery on the corner pushed "
    "warm bread into paper bags, and the first ferry of the day sounded its horn twice before leaving. "
    "Children ran along the sea wall, counting gulls, and an old man read yesterday's newspaper aloud to "
    "anyone who would listen. By noon the market square was full: tomatoes, lemons, cheeses wrapped in "
    "cloth, and a stall that sold nothing but brass keys for locks that no longer existed. "
)


def rss_mb() -> float:
    """Resident set size of this process now, in MB (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def prompt_ids(tokenizer, n: int) -> list[int]:
    """`n` token ids: BOS, then PROSE repeated until long enough, cut."""
    body = tokenizer.encode(PROSE, bos=False)
    ids = [tokenizer.bos_id]
    while len(ids) < n:
        ids += body
    return ids[:n]


def _check(name: str, value: int, low: int) -> None:
    if value < low:
        raise EdgeError(f"{name} {value} must be at least {low}", hint=f"try {name} {max(low, 1) * 8}")


def bench(
    bundle: str | Path,
    prompt_len: int = 128,
    gen_len: int = 64,
    threads: int | None = None,
    repeats: int = 3,
    say: Callable[[str], None] = lambda _: None,
) -> dict:
    from edge import bundle as bundle_mod
    from edge.models.tokenizer import Tokenizer
    from edge.runtime.runners import open_runner

    _check("--prompt-len", prompt_len, 1)
    _check("--gen-len", gen_len, 1)
    _check("--repeats", repeats, 1)
    if threads is not None:
        _check("--threads", threads, 1)
    threads = threads or os.cpu_count() or 1
    manifest = bundle_mod.load(bundle)  # verifies every file's sha256
    max_seq_len = int(manifest["max_seq_len"])
    if prompt_len + gen_len > max_seq_len:
        raise EdgeError(
            f"--prompt-len {prompt_len} + --gen-len {gen_len} = {prompt_len + gen_len} tokens do not fit the "
            f"bundle's max_seq_len {max_seq_len}",
            hint=f"use at most {max_seq_len} tokens in all, e.g. --prompt-len {max_seq_len // 2} "
            f"--gen-len {max_seq_len // 4}",
        )
    tokenizer = Tokenizer(Path(manifest["path"]) / manifest["tokenizer"]["file"])
    ids = prompt_ids(tokenizer, prompt_len)

    rss_before = rss_mb()
    t = time.perf_counter()
    runner = open_runner(manifest, threads=threads)
    load_s = time.perf_counter() - t
    rss_loaded = rss_mb()
    say(f"[bench] loaded {manifest['artifact']} in {load_s:.2f} s; {threads} threads")
    timed = time_runner(runner, ids, gen_len, repeats, say)
    memory = {
        "before_load": round(rss_before, 1),
        "after_load": round(rss_loaded, 1),
        "after_run": round(rss_mb(), 1),
        "peak": round(peak_rss_mb(), 1),  # before the bandwidth probe allocates its own buffer
    }
    del runner
    weights = manifest["io"].get("weights_file")
    model_files = [manifest["artifact"], *([weights["file"]] if weights else [])]
    model_bytes = sum(manifest["files"][f]["bytes"] for f in model_files)
    bandwidth = read_bandwidth_gb_s(threads)
    # Decode reads every weight once per token: the model files' bytes stand for what a token reads.
    ceiling = bandwidth * 1e9 / model_bytes
    decode = timed["decode_tok_s"]
    return {
        "bundle": manifest["path"],
        "variant": manifest["variant"],
        "backend": manifest["backend"],
        "scheme": manifest["quant"]["scheme"]["name"],
        "model_bytes": model_bytes,
        "threads": threads,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "repeats": repeats,
        "load_s": load_s,
        **timed,
        "memory_mb": memory,
        "read_bandwidth_gb_s": round(bandwidth, 1),
        "ceiling_tok_s": round(ceiling, 1),
        "ceiling_fraction": round(decode / ceiling, 3) if decode else None,
    }


def time_runner(runner, ids: list[int], gen_len: int, repeats: int, say: Callable[[str], None] = print) -> dict:
    """Time to first token, prefill / decode tok/s and per-token latency of any runner (edge/runtime's
    protocol): a warm-up round, then `repeats` timed rounds of prefill + `gen_len` greedy tokens, medians."""

    def one_round() -> tuple[float, float, list[float], list[int]]:
        runner.reset()
        t0 = time.perf_counter()
        token = int(np.argmax(runner.prefill(ids)))
        ttft = time.perf_counter() - t0
        steps, out = [], [token]
        for _ in range(gen_len - 1):
            t1 = time.perf_counter()
            token = int(np.argmax(runner.decode(token)))
            steps.append(time.perf_counter() - t1)
            out.append(token)
        return ttft, time.perf_counter() - t0, steps, out

    # Warm-up: a short prefill and a few decode steps allocate what the runtime allocates on first use.
    runner.reset()
    token = int(np.argmax(runner.prefill(ids[: min(8, len(ids))])))
    for _ in range(min(4, gen_len)):
        token = int(np.argmax(runner.decode(token)))
    rounds = []
    for r in range(repeats):
        rounds.append(one_round())
        ttft, total, steps, _ = rounds[-1]
        rate = len(steps) / sum(steps) if steps else float("nan")
        say(f"[bench] round {r + 1}/{repeats}: time to first token {ttft * 1e3:.0f} ms, decode {rate:.1f} tok/s")
    ttfts = [r[0] for r in rounds]
    steps = [s for r in rounds for s in r[2]]
    decode_rates = [len(r[2]) / sum(r[2]) for r in rounds if r[2]]
    return {
        "time_to_first_token_ms": statistics.median(ttfts) * 1e3,
        "prefill_tok_s": statistics.median(len(ids) / t for t in ttfts),
        "decode_tok_s": statistics.median(decode_rates) if decode_rates else None,
        "decode_ms_per_token": {
            "p50": float(np.percentile(steps, 50)) * 1e3 if steps else None,
            "p90": float(np.percentile(steps, 90)) * 1e3 if steps else None,
        },
        "generated_ids": rounds[0][3],
        "rounds_agree": all(r[3] == rounds[0][3] for r in rounds),
    }


def read_bandwidth_gb_s(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Memory read bandwidth of `threads` threads, GB/s: numpy maxima over `mib` MiB (far beyond the
    caches), one slice per thread (numpy releases the GIL inside a reduction; its SIMD max is a plain
    read loop); the best of `repeats`.

    Decode reads every weight once a token, so bandwidth / bytes read per token is its ceiling."""
    from concurrent.futures import ThreadPoolExecutor

    data = np.ones(mib * 2**20 // 8, dtype=np.float64)
    parts = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.max, parts))
            best = max(best, data.nbytes / (time.perf_counter() - t) / 1e9)
    return best
