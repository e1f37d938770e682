"""Weights: every source (GGUF, HF safetensors, random) yields {our name: fp32 tensor}; assign() checks it."""

from __future__ import annotations

import torch

from edge.errors import EdgeError
from edge.models.config import GemmaConfig


def expected_shapes(cfg: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of edge.models.gemma.Gemma for cfg, by name, with its shape."""
    d, hd = cfg.dim, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attn_norm.weight": (d,),
            p + "attn.wq.weight": (cfg.n_heads * hd, d),
            p + "attn.wk.weight": (cfg.n_kv_heads * hd, d),
            p + "attn.wv.weight": (cfg.n_kv_heads * hd, d),
            p + "attn.wo.weight": (d, cfg.n_heads * hd),
            p + "mlp_norm.weight": (d,),
            p + "mlp.gate.weight": (cfg.hidden_dim, d),
            p + "mlp.up.weight": (cfg.hidden_dim, d),
            p + "mlp.down.weight": (d, cfg.hidden_dim),
        }
        if cfg.qk_norm:
            shapes |= {p + "attn.q_norm.weight": (hd,), p + "attn.k_norm.weight": (hd,)}
        if cfg.post_norms:
            shapes |= {p + "post_attn_norm.weight": (d,), p + "post_mlp_norm.weight": (d,)}
    return shapes


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def check_complete(cfg: GemmaConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Fail, naming them, on missing, unexpected or mis-shaped tensors."""
    want = expected_shapes(cfg)
    missing = [n for n in want if n not in tensors]
    extra = [n for n in tensors if n not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_names(missing)}")
        if extra:
            parts.append(f"unexpected {len(extra)}: {_names(extra)}")
        raise EdgeError(
            f"{source}: the weights do not match the {cfg.family.value} architecture ({'; '.join(parts)})",
            hint="is this the right variant for these weights, and is the file complete?",
        )
    bad = [f"{n} {tuple(tensors[n].shape)} (expected {s})" for n, s in want.items() if tuple(tensors[n].shape) != s]
    if bad:
        raise EdgeError(
            f"{source}: tensor shapes do not match the variant's config: {_names(bad, 4)}",
            hint="the weights belong to another model size; pick the matching --variant",
        )


def assign(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Make checked tensors the model's parameters (no copy: the model may live on meta until now)."""
    check_complete(model.cfg, tensors, source)
    dtype = next(model.parameters()).dtype
    state = {k: v.to(dtype) for k, v in tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # assign=True replaced embed.weight: re-tie the head


def random_tensors(cfg: GemmaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights with the real model's scale: N(0, 0.02) matrices, small norm offsets."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        std = 0.1 if name.endswith("norm.weight") else 0.02
        out[name] = torch.randn(shape, generator=gen) * std
    return out
