"""Hugging Face checkpoints: config.json <-> GemmaConfig, and safetensors names -> ours.

Only safetensors are read (never pickles). The name map is a table per family because
`post_attention_layernorm` means different things: in Gemma 1 it is the pre-MLP norm (the
Llama convention); in Gemma 2/3 it is the norm applied to the attention output.
Norm weights need no transform: transformers stores w and applies (1 + w), as we do.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch

from edge.errors import EdgeError
from edge.models.config import CONFIG_HINT, INT_LIMITS, Family, GemmaConfig

# HF layer-local name -> our layer-local name, per family.
_COMMON = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}
LAYER_MAPS: dict[Family, dict[str, str]] = {
    Family.GEMMA1: _COMMON | {"post_attention_layernorm.weight": "mlp_norm.weight"},
    Family.GEMMA2: _COMMON
    | {
        "post_attention_layernorm.weight": "post_attn_norm.weight",
        "pre_feedforward_layernorm.weight": "mlp_norm.weight",
        "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
    },
}
LAYER_MAPS[Family.GEMMA3] = LAYER_MAPS[Family.GEMMA2] | {
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
}
GLOBAL_MAP = {"embed_tokens.weight": "embed.weight", "norm.weight": "norm.weight"}
# Multimodal Gemma 3 checkpoints nest the text model; text-only ones use "model.".
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")

MODEL_TYPES = {"gemma": Family.GEMMA1, "gemma2": Family.GEMMA2, "gemma3_text": Family.GEMMA3}


def hf_to_ours(name: str, family: Family) -> str | None:
    """Our parameter name for a HF tensor name, or None when the name is not ours to load."""
    if name == "lm_head.weight":
        return "lm_head.weight"
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    else:
        return None
    if name in GLOBAL_MAP:
        return GLOBAL_MAP[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in LAYER_MAPS[family]:
        return f"layers.{m.group(1)}.{LAYER_MAPS[family][m.group(2)]}"
    return None


def to_hf_state_dict(cfg: GemmaConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under transformers' names (text-only *ForCausalLM), to build the reference model."""
    inv_layer = {v: k for k, v in LAYER_MAPS[cfg.family].items()}
    inv_global = {v: k for k, v in GLOBAL_MAP.items()}
    out = {}
    for name, t in tensors.items():
        if name == "lm_head.weight":
            out[name] = t
        elif name in inv_global:
            out["model." + inv_global[name]] = t
        else:
            m = _LAYER_RE.fullmatch(name)
            assert m, name
            out[f"model.layers.{m.group(1)}.{inv_layer[m.group(2)]}"] = t
    return out


class _BadConfig(Exception):
    """A config.json field that is missing or of the wrong type; config_from_hf names the file."""


def _config_error(key: str, v: object, what: str) -> _BadConfig:
    r = repr(v)
    return _BadConfig(f"{key} is {r if len(r) <= 60 else r[:57] + '...'}, not {what}")


def _whole(d: dict, key: str, default: object = None, limit: str | None = None) -> int:
    """A JSON whole number (not a bool, float or string), bounded by INT_LIMITS before it sizes anything."""
    if key not in d and default is None:
        raise _BadConfig(f"has no {key}")
    v = d.get(key, default)
    hi = INT_LIMITS.get(limit, 1 << 31)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
        raise _config_error(key, v, f"a whole number from 0 to {hi:,}")
    return v


def _real(d: dict, key: str, default: float | None) -> float | None:
    v = d.get(key, default)
    if v is None:
        return None
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise _config_error(key, v, "a finite number")
    return float(v)


def _object(d: dict, key: str) -> dict:
    v = d.get(key) or {}
    if not isinstance(v, dict):
        raise _config_error(key, v, "an object")
    return v


def config_from_hf(d: object, source: str = "config.json") -> GemmaConfig:
    """GemmaConfig from a parsed config.json; every field is type- and range-checked (EdgeError otherwise)."""
    try:
        return _config_from_hf(d)
    except _BadConfig as e:
        sep = " " if str(e).startswith("has no") else ": "
        raise EdgeError(f"{source}{sep}{e}", hint=CONFIG_HINT) from None
    except EdgeError as e:  # GemmaConfig's own checks (ranges, token ids, heads): say which file
        if e.hint == CONFIG_HINT:
            raise EdgeError(f"{source}: {e.message}", hint=e.hint) from None
        raise


def _config_from_hf(d: object) -> GemmaConfig:
    if not isinstance(d, dict):
        raise _BadConfig("not a JSON object")
    if d.get("model_type") == "gemma3" and "text_config" in d:
        d = _object(d, "text_config") | {"model_type": "gemma3_text"}
    mt = d.get("model_type")
    if not isinstance(mt, str) or mt not in MODEL_TYPES:
        raise EdgeError(
            f"config.json says model_type {str(mt)[:60]!r}, which is not a Gemma text model",
            hint=f"supported model types: {', '.join(MODEL_TYPES)}",
        )
    fam = MODEL_TYPES[mt]
    # The layer count sizes the per-layer tables below: bounded before they are built.
    n = _whole(d, "num_hidden_layers", limit="n_layers")
    rope = _object(d, "rope_parameters")
    full, sliding = _object(rope, "full_attention"), _object(rope, "sliding_attention")
    theta = _real(full, "rope_theta", _real(d, "rope_theta", 10_000.0 if fam != Family.GEMMA3 else 1e6))
    local_theta = _real(sliding, "rope_theta", _real(d, "rope_local_base_freq", 10_000.0))
    if fam != Family.GEMMA3:
        local_theta = theta
    if fam == Family.GEMMA1:
        layer_types: tuple[bool, ...] = (False,) * n
        window = None
    else:
        lt = d.get("layer_types")
        if lt is None:
            from edge.models.config import gemma2_layer_types, gemma3_layer_types

            layer_types = gemma2_layer_types(n) if fam == Family.GEMMA2 else gemma3_layer_types(n)
        elif not isinstance(lt, list) or not all(t in ("sliding_attention", "full_attention") for t in lt):
            raise _config_error("layer_types", lt, "a list of 'sliding_attention' / 'full_attention'")
        else:
            layer_types = tuple(t == "sliding_attention" for t in lt)
        window = d.get("sliding_window") and _whole(d, "sliding_window", limit="sliding_window")
    heads = _whole(d, "num_attention_heads", limit="n_heads")
    dim = _whole(d, "hidden_size", limit="dim")
    eos = d.get("eos_token_id", 1)
    if isinstance(eos, list):  # instruction-tuned checkpoints list <eos> and <end_of_turn>
        if not eos:
            raise _config_error("eos_token_id", eos, "a token id or a non-empty list of them")
        eos = eos[0]
    return GemmaConfig(
        family=fam,
        vocab_size=_whole(d, "vocab_size", limit="vocab_size"),
        dim=dim,
        n_layers=n,
        n_heads=heads,
        n_kv_heads=_whole(d, "num_key_value_heads", heads, limit="n_kv_heads"),
        head_dim=_whole(d, "head_dim", dim // heads if heads else 0, limit="head_dim"),
        hidden_dim=_whole(d, "intermediate_size", limit="hidden_dim"),
        norm_eps=_real(d, "rms_norm_eps", 1e-6),
        query_pre_attn_scalar=_real(d, "query_pre_attn_scalar", d.get("head_dim", 256)),
        rope_theta=theta,
        rope_local_theta=local_theta,
        sliding_window=window or None,
        layer_types=layer_types,
        attn_softcap=_real(d, "attn_logit_softcapping", None),
        final_softcap=_real(d, "final_logit_softcapping", None),
        post_norms=fam != Family.GEMMA1,
        qk_norm=fam == Family.GEMMA3,
        tie_embeddings=d.get("tie_word_embeddings", True),
        max_position=_whole(d, "max_position_embeddings", 8192, limit="max_position"),
        bos_id=d.get("bos_token_id", 2) or 2,  # null (or 0) means the default, as before
        eos_id=eos,
        pad_id=d.get("pad_token_id", 0) or 0,
    )


# safetensors: u64 header length, a JSON header {name: {dtype, shape, data_offsets}}, the data.
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}  # fmt: skip
_ST_MAX_HEADER = 100 << 20  # the safetensors library's own limit


def check_safetensors_header(path: Path) -> dict:
    """The header of a .safetensors file, checked against the file's size before any tensor is read:
    every tensor's dtype, shape and byte range must be possible and inside the data section."""
    size = path.stat().st_size
    bad = lambda why: EdgeError(f"{path} is not a readable safetensors file: {why}", hint="fetch or convert it again")
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the header length field")
        (n,) = struct.unpack("<Q", head)
        if n > min(_ST_MAX_HEADER, size - 8):
            raise bad(f"its header claims {n:,} bytes; the file has {size:,}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise bad(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise bad(f"the entry for {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPE_BYTES:
            raise bad(f"{name!r} has dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= data for x in shape)
        ):
            raise bad(f"{name!r} has shape {str(shape)[:60]}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data
        ):
            raise bad(f"{name!r} has byte range {str(offsets)[:60]}, outside its {data:,}-byte data section")
        if math.prod(shape) * _ST_DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
            raise bad(f"{name!r}'s shape {shape} and dtype {dtype} do not fill its byte range {offsets}")
    return header


def _int_if_integral(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def config_to_hf(cfg: GemmaConfig) -> dict:
    """transformers config kwargs for the same architecture (the reference stage and tests use it)."""
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=cfg.max_position,
        bos_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id,
        pad_token_id=cfg.pad_id,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
    )
    if cfg.family == Family.GEMMA1:
        return common | {"model_type": "gemma", "rope_theta": cfg.rope_theta}
    types = ["sliding_attention" if t else "full_attention" for t in cfg.layer_types]
    extra = {
        # transformers types it int, and with huggingface_hub >= 2 its configs are strict dataclasses
        # that refuse 256.0 ("expected int, got float"); the GGUF path computes it as a float.
        "query_pre_attn_scalar": _int_if_integral(cfg.query_pre_attn_scalar),
        "sliding_window": cfg.sliding_window,
        "layer_types": types,
        "attn_logit_softcapping": cfg.attn_softcap,
        "final_logit_softcapping": cfg.final_softcap,
    }
    if cfg.family == Family.GEMMA2:
        return common | extra | {"model_type": "gemma2", "rope_theta": cfg.rope_theta}
    rope = {
        "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta},
    }
    return common | extra | {"model_type": "gemma3_text", "rope_parameters": rope}


def load_hf(folder: str | Path) -> tuple[GemmaConfig, dict[str, torch.Tensor]]:
    """Read config.json and every *.safetensors in a HF folder; returns fp32 tensors by our names."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise EdgeError(f"{folder} has no config.json", hint="give a Hugging Face model folder or a .gguf file")
    if cfg_path.stat().st_size > 1 << 20:  # a config is a few kB; refuse to parse a huge one
        raise EdgeError(f"{cfg_path} is {cfg_path.stat().st_size:,} bytes, not a model config", hint=CONFIG_HINT)
    try:
        parsed = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise EdgeError(f"{cfg_path} is not valid JSON ({e})", hint="is this a Gemma checkpoint folder?") from e
    cfg = config_from_hf(parsed, str(cfg_path))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EdgeError(
            f"{folder} has no *.safetensors files",
            hint="only safetensors are read (pickled .bin checkpoints are refused); convert them first",
        )
    tensors: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for f in files:
        check_safetensors_header(f)
        try:
            raw = load_file(str(f))
        except Exception as e:  # safetensors raises its own error types for truncated headers/data
            raise EdgeError(f"{f} cannot be read: {e}", hint="the file is truncated or not safetensors") from e
        for name, t in raw.items():
            ours = hf_to_ours(name, cfg.family)
            if ours is None:
                if "vision" in name or "multi_modal" in name:
                    continue  # Gemma 3 multimodal: the vision tower is not part of the text decoder
                unknown.append(name)
            else:
                tensors[ours] = t.float()
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some checkpoints store the tied head explicitly
    if unknown:
        tensors |= {f"(unmapped) {n}": torch.empty(0) for n in unknown}  # reported by check_complete
    from edge.models.weights import check_complete

    check_complete(cfg, tensors, str(folder))
    return cfg, tensors
