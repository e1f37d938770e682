import os

import pytest
import torch

from edge import api
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


# A tiny Gemma 3 with the real vocabulary size, registered as a variant: bundles in seconds.
TINY = dict(
    family=Family.GEMMA3,
    vocab_size=262_144,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=1,
    head_dim=16,
    hidden_dim=128,
    query_pre_attn_scalar=16,
    rope_theta=1_000_000.0,
    sliding_window=8,
    layer_types=gemma3_layer_types(2),
    post_norms=True,
    qk_norm=True,
    max_position=512,
)


# The same registration as Python source, for `edge` run in a subprocess.
REGISTER = (
    "from edge.models.variants import VARIANTS, Variant; from edge.models.config import *; "
    f"VARIANTS['tiny-test'] = Variant('tiny-test', ('tiny',), GemmaConfig(**{TINY!r}))"
).replace("<Family.GEMMA3: 'gemma3'>", "Family.GEMMA3")


@pytest.fixture(scope="session", autouse=True)
def tiny_variant():
    from edge.models.config import GemmaConfig
    from edge.models.variants import VARIANTS, Variant

    VARIANTS["tiny-test"] = Variant("tiny-test", ("tiny",), GemmaConfig(**TINY))
    yield
    VARIANTS.pop("tiny-test")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "tiny-int8"
    return api.export("tiny-test", "linux", "xnnpack", "int8", random_weights=True, max_seq_len=64, out=out)


@pytest.fixture(scope="session")
def device_bundles(tmp_path_factory):
    """Tiny fp32 bundles for the Raspberry Pi target, by backend (litert, onnx): the torch-free device path."""
    root = tmp_path_factory.mktemp("device-bundles")

    class Bundles(dict):
        def __missing__(self, backend):
            out = root / backend
            self[backend] = api.export(
                "tiny-test", "rpi", backend, "fp32", random_weights=True, max_seq_len=64, out=out
            )
            return self[backend]

    return Bundles()
