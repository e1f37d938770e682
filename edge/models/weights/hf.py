"""Hugging Face checkpoints: config.json <-> GemmaConfig, and safetensors names -> ours.

Only safetensors are read (never pickles). The name map is a table per family because
`post_attention_layernorm` means different things: in Gemma 1 it is the pre-MLP norm (the
Llama convention); in Gemma 2/3 it is the norm applied to the attention output.
Norm weights need no transform: transformers stores w and applies (1 + w), as we do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from edge.errors import EdgeError
from edge.models.config import Family, GemmaConfig

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


def config_from_hf(d: dict) -> GemmaConfig:
    if d.get("model_type") == "gemma3" and "text_config" in d:
        d = d["text_config"] | {"model_type": "gemma3_text"}
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise EdgeError(
            f"config.json says model_type {mt!r}, which is not a Gemma text model",
            hint=f"supported model types: {', '.join(MODEL_TYPES)}",
        )
    fam = MODEL_TYPES[mt]
    n = d["num_hidden_layers"]
    rope = d.get("rope_parameters") or {}
    theta = rope.get("full_attention", {}).get(
        "rope_theta", d.get("rope_theta", 10_000.0 if fam != Family.GEMMA3 else 1e6)
    )
    local_theta = rope.get("sliding_attention", {}).get("rope_theta", d.get("rope_local_base_freq", 10_000.0))
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
        else:
            layer_types = tuple(t == "sliding_attention" for t in lt)
        window = d.get("sliding_window")
    return GemmaConfig(
        family=fam,
        vocab_size=d["vocab_size"],
        dim=d["hidden_size"],
        n_layers=n,
        n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
        head_dim=d.get("head_dim", d["hidden_size"] // d["num_attention_heads"]),
        hidden_dim=d["intermediate_size"],
        norm_eps=d.get("rms_norm_eps", 1e-6),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar", d.get("head_dim", 256)),
        rope_theta=float(theta),
        rope_local_theta=float(local_theta),
        sliding_window=window,
        layer_types=layer_types,
        attn_softcap=d.get("attn_logit_softcapping"),
        final_softcap=d.get("final_logit_softcapping"),
        post_norms=fam != Family.GEMMA1,
        qk_norm=fam == Family.GEMMA3,
        tie_embeddings=d.get("tie_word_embeddings", True),
        max_position=d.get("max_position_embeddings", 8192),
        bos_id=d.get("bos_token_id", 2) or 2,
        eos_id=(d.get("eos_token_id", 1) if not isinstance(d.get("eos_token_id"), list) else d["eos_token_id"][0]),
        pad_id=d.get("pad_token_id", 0) or 0,
    )


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
    try:
        cfg = config_from_hf(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise EdgeError(f"{cfg_path} is not a usable config ({e})", hint="is this a Gemma checkpoint folder?") from e
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EdgeError(
            f"{folder} has no *.safetensors files",
            hint="only safetensors are read (pickled .bin checkpoints are refused); convert them first",
        )
    tensors: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for f in files:
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
