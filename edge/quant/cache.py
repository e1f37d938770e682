"""The quantization cache: a scheme's quantized tensors, kept so that quantizing the same weights the
same way again takes seconds instead of minutes.

Quantizing the 270M int4 (calibration sampling, SmoothQuant's search, GPTQ) is most of an export's
CPU time, and its result depends only on the source weights, the scheme, the calibration text and
this recipe's version: a second export of the same model and scheme (another backend, another
target), and `edge validate`'s quantized stage, get the same tensors from here.

An entry is one folder under `<cache>/quant/<key>`: `tensors.safetensors` (plain tensors only: the
torchao weight subclasses are stored as their inner tensors, never pickled) and `entry.json` (the
key's inputs, the coverage report, each tensor's format, the file's sha256). A hit rebuilds the
quantized model's structure cheaply (quantize_model(skeleton=True)) and fills it from the entry;
every tensor the model holds must come from the entry with the same shape, dtype and format.
An entry whose hash does not match is removed and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from edge.bundle import sha256 as _sha256
from edge.errors import EdgeError

# Bump whenever quantize_model may give other numbers for the same inputs (a scheme's fields are in
# the key already; their realization, the calibration recipe and the formats are not).
RECIPE = "gemma-edge-quant-1"
STATE = "tensors.safetensors"
ENTRY = "entry.json"
CHOICE = "choice.json"  # an `auto-<key>` folder: what `--quant auto` chose (its tensors are a scheme's entry)
FIELDS = {"inputs", "sha256", "formats", "aliases", "requires_grad", "coverage"}


def root() -> Path:
    """<cache>/quant, or $EDGE_QUANT_CACHE (the tests keep theirs apart from the user's)."""
    from edge.models.loading import cache_dir

    return Path(os.environ.get("EDGE_QUANT_CACHE") or cache_dir() / "quant")


def source_identity(source: dict, config: dict) -> dict | None:
    """What the source weights are, by content: None when they cannot be identified (no caching)."""
    kind = source.get("kind")
    if kind == "random":
        return {"kind": "random", "seed": source.get("seed"), "config": config}
    if source.get("sha256"):
        return {"kind": kind, "sha256": source["sha256"]}
    path = Path(source.get("path", ""))
    if kind == "gguf" and path.is_file():
        return {"kind": kind, "sha256": _sha256(path)}
    if kind == "hf" and path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
        return {"kind": kind, "sha256": {p.name: _sha256(p) for p in files}}
    return None


_ADDED = {"head_exact_rows": 0}  # Scheme fields added after the recipe's version, with their defaults


def key_inputs(scheme, identity: dict, calib: list[list[int]] | None) -> dict:
    import importlib.metadata as md

    inputs = {
        "recipe": RECIPE,
        "source": identity,
        # a field added since entries were first written, at its default, is left out: their keys stay valid
        "scheme": {k: v for k, v in scheme.to_dict().items() if not (k in _ADDED and v == _ADDED[k])},
        "calibration_sha256": hashlib.sha256(json.dumps(calib).encode()).hexdigest() if calib else None,
        # Kernels and rounding of torch / torchao decide the numbers too.
        "torch": torch.__version__,
        "torchao": md.version("torchao"),
    }
    return json.loads(json.dumps(inputs))  # as entry.json reads back (tuples become lists)


def key_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def quantize(
    model: nn.Module,
    scheme,
    calib: list[list[int]] | None,
    grids: dict | None,
    identity: dict | None,
    progress: Callable | None = None,
    use_cache: bool = True,
    say: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    """quantize_model through the cache: a verified entry fills the model; otherwise quantize and store.

    identity: source_identity() of the weights (None: never cached). Returns the coverage report."""
    from edge.quant.apply import quantize_model

    if scheme.head_exact_rows:  # the tensors are its base scheme's, split afterwards: one entry for both
        from edge.quant import two_pass

        coverage = quantize(model, two_pass.base_scheme(scheme), calib, grids, identity, progress, use_cache, say)
        return two_pass.apply(model, scheme, coverage)
    cacheable = use_cache and identity is not None and scheme.quantized and not scheme.float16
    if not cacheable:
        return quantize_model(model, scheme, calib, progress=progress, grids=grids)
    inputs = key_inputs(scheme, identity, calib)
    folder = root() / key_of(inputs)
    entry = _verified(folder, inputs, say)
    if entry is not None:
        t0 = time.perf_counter()
        quantize_model(model, scheme, calib, grids=grids, skeleton=True)
        _fill(model, folder, entry)
        say(f"quantized tensors from the cache ({folder}, {time.perf_counter() - t0:.1f} s)")
        return entry["coverage"]
    coverage = quantize_model(model, scheme, calib, progress=progress, grids=grids)
    try:
        _store(model, folder, inputs, coverage)
    except OSError as e:  # a full disk or a read-only cache costs the next export time, not this one
        say(f"quantization cache not written ({e.strerror or e}): the next export quantizes again")
    return coverage


def _choice_inputs(base, identity: dict, calib: list[list[int]] | None, budget: float) -> tuple[dict, Path]:
    inputs = {**key_inputs(base, identity, calib), "auto_budget": budget}
    return inputs, root() / f"auto-{key_of(inputs)}"


def auto_choice(base, identity: dict | None, calib, budget: float, use_cache: bool, say) -> dict | None:
    """The manifest record of an earlier `--quant auto` search with the same inputs and budget, or None."""
    if not use_cache or identity is None:
        return None
    inputs, folder = _choice_inputs(base, identity, calib, budget)
    try:
        entry = json.loads((folder / CHOICE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        entry = None
    record = entry.get("record") if isinstance(entry, dict) and entry.get("inputs") == inputs else None
    if isinstance(record, dict) and isinstance(record.get("int4"), list):
        if all(isinstance(n, str) for n in record["int4"]):
            say(f"--quant auto: the choice from the cache ({folder}): {len(record['int4'])} linears at 4 bits")
            return record
    say(f"quantization cache entry {folder.name} is not used: unreadable or for other inputs; searching again")
    shutil.rmtree(folder, ignore_errors=True)
    return None


def store_auto(model: nn.Module, base, scheme, coverage, record: dict, identity: dict | None, calib, budget, say):
    """Keep what `--quant auto` chose, and the chosen model's tensors under its scheme's own key."""
    if identity is None:
        return
    inputs, folder = _choice_inputs(base, identity, calib, budget)
    try:
        tensors_inputs = key_inputs(scheme, identity, calib)
        _store(model, root() / key_of(tensors_inputs), tensors_inputs, coverage)
        choice = json.dumps({"inputs": inputs, "record": record}, indent=1)
        _replace_folder(folder, lambda tmp: (tmp / CHOICE).write_text(choice))
    except OSError as e:
        say(f"quantization cache not written ({e.strerror or e}): the next export searches again")


def _verified(folder: Path, inputs: dict, say) -> dict | None:
    """The entry's record if its inputs match and its tensors hash to what it recorded; else None (removed)."""
    if not (folder / ENTRY).is_file():
        return None
    why = None
    try:
        entry = json.loads((folder / ENTRY).read_text())
        if not isinstance(entry, dict) or not FIELDS <= entry.keys():
            why = "its record lacks fields this version reads"
        elif entry.get("inputs") != inputs:
            why = "its inputs differ from this export's"
        elif _sha256(folder / STATE) != entry.get("sha256"):
            why = "its tensors do not match their recorded sha256"
    except (OSError, ValueError) as e:
        why = f"unreadable ({e})"
    if why is None:
        return entry
    say(f"quantization cache entry {folder.name} is not used: {why}; quantizing again")
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer the quantization decides: all but the KV caches (made by setup_cache)."""
    from edge.models.gemma import KVCache

    skip = {f"{n}." for n, m in model.named_modules() if isinstance(m, KVCache)}
    out = dict(model.named_parameters(remove_duplicate=False))
    out |= dict(model.named_buffers(remove_duplicate=False))
    return {n: t for n, t in out.items() if t is not None and not any(n.startswith(p) for p in skip)}


def _flat(name: str, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], str]:
    """A tensor as plain tensors (a subclass: its inner tensors, by name) and its format."""
    t = t.detach()
    if type(t) is torch.Tensor or type(t) is nn.Parameter:
        return {name: t}, f"tensor {t.dtype}"
    inner, ctx = t.__tensor_flatten__()
    return {f"{name}::{i}": getattr(t, i) for i in inner}, f"{type(t).__name__} {ctx!r}"


def _nibbles(t: torch.Tensor) -> bool:
    """An int8 tensor whose values all fit 4 bits, with an even last axis: stored two values a byte."""
    return t.dtype == torch.int8 and t.dim() > 0 and t.shape[-1] % 2 == 0 and bool(((t >= -8) & (t <= 7)).all())


def _pack4(t: torch.Tensor) -> torch.Tensor:
    u = (t.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack4(b: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if b.dtype != torch.uint8 or list(b.shape) != [*shape[:-1], shape[-1] // 2]:
        return b  # not what was packed: the shape check that follows refuses it
    u = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(shape)
    return (u.to(torch.int16) - 8).to(torch.int8)


def _store(model: nn.Module, folder: Path, inputs: dict, coverage: list[dict]) -> None:
    from safetensors.torch import save_file

    plain, formats, aliases, seen, packed = {}, {}, {}, {}, {}
    tensors = _tensors(model)
    for name, t in tensors.items():
        parts, formats[name] = _flat(name, t)
        for n, p in parts.items():
            p = p.contiguous()
            # by content, not storage: a shared table is two equal tensors (head and lookup) in two storages
            ident = (str(p.dtype), tuple(p.shape), hashlib.blake2b(p.reshape(-1).view(torch.uint8).numpy()).hexdigest())
            if ident in seen:
                aliases[n] = seen[ident]
                continue
            seen[ident] = n
            plain[n] = p
            if _nibbles(plain[n]):  # torchao keeps 4-bit values one per int8: two per byte here
                packed[n] = list(p.shape)
                plain[n] = _pack4(plain[n])

    def write(tmp: Path) -> None:
        save_file(plain, str(tmp / STATE))
        entry = {
            "inputs": inputs,
            "sha256": _sha256(tmp / STATE),
            "formats": formats,
            "aliases": aliases,
            "packed4": packed,
            # torch.export records it, so the artifact's bytes depend on it
            "requires_grad": sorted(n for n, t in tensors.items() if t.requires_grad),
            "coverage": coverage,
        }
        (tmp / ENTRY).write_text(json.dumps(entry, indent=1))

    _replace_folder(folder, write)


def _replace_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """An entry written whole into a private folder and renamed into place: never half-written."""
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fill(model: nn.Module, folder: Path, entry: dict) -> None:
    """Copy the entry's tensors into the skeleton, checking that each has the entry's format."""
    from safetensors import safe_open

    formats, aliases, grads = entry["formats"], entry["aliases"], set(entry["requires_grad"])
    packed = entry.get("packed4", {})
    mine = _tensors(model)

    def mismatch(what: str) -> EdgeError:
        shutil.rmtree(folder, ignore_errors=True)
        return EdgeError(
            f"quantization cache entry {folder.name} does not fit this model: {what} (removed)",
            hint="run the command again (it quantizes afresh), or pass --no-cache",
        )

    for name in set(formats) - set(mine):  # a buffer the calibration sets (embed_rescale): None in the skeleton
        owner, _, attr = name.rpartition(".")
        mod = model.get_submodule(owner)
        if attr in mod._buffers and mod._buffers[attr] is None and formats[name].startswith("tensor "):
            mod._buffers[attr] = torch.empty(0)  # shape and dtype from the entry, below
            mine[name] = None
    if set(mine) != set(formats):
        raise mismatch(f"tensors differ ({', '.join(sorted(set(mine) ^ set(formats))[:3])})")
    with safe_open(str(folder / STATE), framework="pt") as f:
        stored = set(f.keys())
        for name, t in mine.items():
            if t is None:
                owner, _, attr = name.rpartition(".")
                model.get_submodule(owner)._buffers[attr] = f.get_tensor(aliases.get(name, name))
                continue
            parts, fmt = _flat(name, t)
            if fmt != formats[name]:
                raise mismatch(f"{name} is {fmt}, the entry holds {formats[name]}")
            for n, p in parts.items():
                src = aliases.get(n, n)
                if src not in stored:
                    raise mismatch(f"{n} is missing")
                value = f.get_tensor(src)
                if src in packed:
                    value = _unpack4(value, packed[src])
                if value.shape != p.shape or value.dtype != p.dtype:
                    raise mismatch(
                        f"{n} is {tuple(value.shape)} {value.dtype}, the model wants {tuple(p.shape)} {p.dtype}"
                    )
                with torch.no_grad():
                    p.copy_(value)
            if isinstance(t, nn.Parameter):
                t.requires_grad_(name in grads)


def entries() -> list[dict]:
    """The cache's entries: key, scheme, source kind, size, last use."""
    out = []
    base = root()
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        try:
            record = folder / (CHOICE if folder.name.startswith("auto-") else ENTRY)
            inputs = json.loads(record.read_text())["inputs"]
            what = {"scheme": inputs["scheme"]["name"], "source": inputs["source"]["kind"]}
            if record.name == CHOICE:
                what["scheme"] = f"auto choice ({inputs['scheme']['name']}, --max-kld {inputs['auto_budget']:g})"
        except (OSError, ValueError, KeyError, TypeError):
            what = {"scheme": None, "source": None, "broken": True}
        out.append({"key": folder.name, **what, "bytes": size, "path": str(folder)})
    return out


def clear() -> tuple[int, int]:
    """Remove every entry (and leftovers of interrupted writes); returns (entries, bytes) removed."""
    base, n, size = root(), 0, 0
    for folder in list(base.iterdir()) if base.is_dir() else []:
        if folder.is_dir():
            size += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            n += not folder.name.startswith(".")
            shutil.rmtree(folder, ignore_errors=True)
    return n, size
