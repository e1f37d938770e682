"""The trusted model: transformers' own Gemma on the same tensors (the validator's `reference` stage)."""

from __future__ import annotations

import torch

from edge.models.config import Family, GemmaConfig
from edge.models.weights.hf import config_to_hf, to_hf_state_dict


def build_reference(cfg: GemmaConfig, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers *ForCausalLM in fp32 with eager attention, loaded with `tensors` (our names)."""
    import transformers

    kwargs = config_to_hf(cfg)
    model_type = kwargs.pop("model_type")
    classes = {
        Family.GEMMA1: (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        Family.GEMMA2: (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        Family.GEMMA3: (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }
    config_cls, model_cls = classes[cfg.family]
    assert config_cls.model_type == model_type
    hf_cfg = config_cls(**kwargs)
    hf_cfg._attn_implementation = "eager"  # the plain softmax path: the most literal reference
    model = model_cls(hf_cfg)
    state = to_hf_state_dict(cfg, tensors)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.float().eval()
