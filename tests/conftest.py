import os

import pytest
import torch

from edge.models.config import Family, GemmaConfig, gemma2_layer_types, gemma3_layer_types

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_grad_enabled(False)


def random_calibration(vocab_size: int, n: int = 4, length: int = 24, seed: int = 0) -> list[list[int]]:
    """Calibration sequences for a random-weight tiny model (BOS id 2 first, like real text)."""
    g = torch.Generator().manual_seed(seed)
    return [[2, *torch.randint(3, vocab_size, (length - 1,), generator=g).tolist()] for _ in range(n)]


def tiny_config(family: Family, n_kv_heads: int = 1, **overrides) -> GemmaConfig:
    """A few-layer Gemma of the given family: seconds to build, export and compare."""
    n_layers = 4 if family != Family.GEMMA3 else 6
    base = dict(
        family=family,
        vocab_size=256,
        dim=64,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        head_dim=16,
        hidden_dim=128,
        query_pre_attn_scalar=16,
        max_position=512,
    )
    if family == Family.GEMMA1:
        base |= dict(rope_theta=10_000.0, rope_local_theta=10_000.0)
    elif family == Family.GEMMA2:
        base |= dict(
            sliding_window=8,
            layer_types=gemma2_layer_types(n_layers),
            attn_softcap=50.0,
            final_softcap=30.0,
            post_norms=True,
            query_pre_attn_scalar=24,
        )
    else:
        base |= dict(
            sliding_window=8,
            layer_types=gemma3_layer_types(n_layers),
            rope_theta=1_000_000.0,
            rope_local_theta=10_000.0,
            post_norms=True,
            qk_norm=True,
        )
    return GemmaConfig(**(base | overrides))


FAMILIES = [Family.GEMMA1, Family.GEMMA2, Family.GEMMA3]


@pytest.fixture(params=FAMILIES, ids=[f.value for f in FAMILIES])
def family(request) -> Family:
    return request.param
