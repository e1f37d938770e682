"""LiteRT-LM's own benchmark (litert-lm-api's `Benchmark`, its C++ engine) on a bundle's `model.litertlm`.

    .venv/bin/python benchmarks/peers/litert_lm_bench.py --litertlm BUNDLE/model.litertlm --prompt-len 128 \\
        --gen-len 128 --threads 2 --model-bytes N

Prints one JSON line with the fields `edge bench --json` gives (what benchmarks/compare.py reads). LiteRT-LM
reports load, time to first token and the mean prefill / decode rates; it gives no per-token latencies
(p90 is null). fp32 activations, as the bundle's own metadata prefers (LiteRT-LM's CPU default for a text
decoder is fp16, which the 270M's residual stream overflows); prompt and decode lengths as given.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--litertlm", required=True)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-num-tokens", type=int, default=None, help="the bundle's max_seq_len")
    p.add_argument("--model-bytes", type=int, default=None, help="bytes a token reads (the .tflite's size)")
    a = p.parse_args()

    import litert_lm
    from litert_lm import interfaces

    # Its XNNPACK weight cache goes to a folder of its own: by default LiteRT-LM writes it beside the model,
    # into the bundle, which then fails its verification (a file its manifest does not list). A fresh one
    # each run: a cold load, as our runner's (which packs the weights at every load).
    with tempfile.TemporaryDirectory(prefix="litert-lm-cache-") as cache:
        info = litert_lm.Benchmark(
            a.litertlm,
            interfaces.CPU(thread_count=a.threads),
            prefill_tokens=a.prompt_len,
            decode_tokens=a.gen_len,
            max_num_tokens=a.max_num_tokens,
            cache_dir=cache,
            activation_data_type=litert_lm.ActivationDataType.FLOAT32,
        ).run()
    decode = info.last_decode_tokens_per_second
    print(json.dumps({
        "runtime": f"LiteRT-LM (litert-lm-api {_version()})",
        "load_s": info.init_time_in_second,
        "time_to_first_token_ms": info.time_to_first_token_in_second * 1e3,
        "prefill_tokens": info.last_prefill_token_count,
        "prefill_tok_s": info.last_prefill_tokens_per_second,
        "decode_tokens": info.last_decode_token_count,
        "decode_tok_s": decode,
        "decode_ms_per_token": {"median": 1e3 / decode if decode else None, "p90": None},
        "memory_mb": {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        "model_bytes": a.model_bytes,
    }))  # fmt: skip


def _version() -> str:
    import importlib.metadata as md

    return md.version("litert-lm-api")


if __name__ == "__main__":
    main()
