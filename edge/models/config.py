"""GemmaConfig: the architecture facts of one Gemma text decoder, nothing else.

One dataclass covers Gemma 1, 2 and 3: the differences between the families are
switches here (softcaps, post-norms, QK-norm, sliding-window layers, per-layer RoPE
base), never branches on a family name inside the model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from enum import StrEnum

from edge.errors import EdgeError

# Upper bounds on a config's whole numbers: far above any Gemma (the 27B has 62 layers, dim 5376,
# 32 heads, an FFN of 21,504 and a 262,144 vocab), far below sizes whose per-layer tables and loops
# would exhaust memory before a single tensor is read. A header that claims more is refused.
INT_LIMITS = {
    "vocab_size": 1 << 21,
    "dim": 1 << 16,
    "n_layers": 512,
    "n_heads": 512,
    "n_kv_heads": 512,
    "head_dim": 1 << 12,
    "hidden_dim": 1 << 18,
    "max_position": 1 << 24,
    "sliding_window": 1 << 24,
}
_FLOATS = ("norm_eps", "query_pre_attn_scalar", "rope_theta", "rope_local_theta", "attn_softcap", "final_softcap")
_OPTIONAL = ("sliding_window", "attn_softcap", "final_softcap")
CONFIG_HINT = "the model's config (config.json or the GGUF metadata) is damaged, or not a Gemma text model's"


class Family(StrEnum):
    GEMMA1 = "gemma"
    GEMMA2 = "gemma2"
    GEMMA3 = "gemma3"


@dataclass(frozen=True)
class GemmaConfig:
    family: Family
    vocab_size: int
    dim: int  # d_model
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  # GeGLU inner width
    norm_eps: float = 1e-6
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (Gemma 2/3 decouple it
    # from head_dim; Gemma 1 uses head_dim).
    query_pre_attn_scalar: float = 256.0
    rope_theta: float = 10_000.0  # global (full-attention) layers
    rope_local_theta: float = 10_000.0  # sliding-window layers
    sliding_window: int | None = None  # None: every layer attends to the whole cache
    # layer_types[i] is True when layer i is a sliding-window (local) layer.
    layer_types: tuple[bool, ...] = field(default=())
    attn_softcap: float | None = None  # Gemma 2: tanh cap on attention scores
    final_softcap: float | None = None  # Gemma 2: tanh cap on the output logits
    post_norms: bool = False  # Gemma 2/3: RMSNorm after attention and after the MLP too
    qk_norm: bool = False  # Gemma 3: RMSNorm on q and k per head
    tie_embeddings: bool = True
    max_position: int = 32_768
    bos_id: int = 2
    eos_id: int = 1
    pad_id: int = 0

    def __post_init__(self) -> None:
        # Every number is checked here, where every reader's config is built: a wrong type or an
        # absurd size is an EdgeError before anything is allocated for it.
        for name, hi in INT_LIMITS.items():
            v = getattr(self, name)
            if v is None and name in _OPTIONAL:
                continue
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not 1 <= v <= hi:
                raise EdgeError(f"{name} is {_show(v)}, not a whole number from 1 to {hi:,}", hint=CONFIG_HINT)
            object.__setattr__(self, name, int(v))
        for name in _FLOATS:
            v = getattr(self, name)
            if v is None and name in _OPTIONAL:
                continue
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not (math.isfinite(v) and v > 0):
                raise EdgeError(f"{name} is {_show(v)}, not a finite number > 0", hint=CONFIG_HINT)
            object.__setattr__(self, name, float(v))
        for name in ("bos_id", "eos_id", "pad_id"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not 0 <= v < self.vocab_size:
                raise EdgeError(
                    f"{name} is {_show(v)}, not a token id of the {self.vocab_size:,}-token vocabulary",
                    hint=CONFIG_HINT,
                )
            object.__setattr__(self, name, int(v))
        for name in ("post_norms", "qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise EdgeError(f"{name} is {_show(getattr(self, name))}, not true or false", hint=CONFIG_HINT)
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (False,) * self.n_layers)
        if not isinstance(self.layer_types, tuple) or not all(isinstance(t, bool) for t in self.layer_types):
            raise EdgeError(f"layer_types is {_show(self.layer_types)}, not one kind per layer", hint=CONFIG_HINT)
        if len(self.layer_types) != self.n_layers:
            raise EdgeError(
                f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers", hint=CONFIG_HINT
            )
        if self.n_heads % self.n_kv_heads:
            raise EdgeError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}", hint=CONFIG_HINT
            )

    @property
    def n_rep(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def is_local(self, layer: int) -> bool:
        return self.sliding_window is not None and self.layer_types[layer]

    def num_params(self) -> int:
        """Parameter count with the tied embedding counted once."""
        d, hd = self.dim, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * d * self.hidden_dim
        norms = d * (4 if self.post_norms else 2) + (2 * hd if self.qk_norm else 0)
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * (attn + mlp + norms) + d + head

    def replace(self, **changes: object) -> GemmaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["family"] = self.family.value
        out["layer_types"] = ["sliding" if t else "full" for t in self.layer_types]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> GemmaConfig:
        d = dict(d)
        d["family"] = Family(d["family"])
        d["layer_types"] = tuple(t == "sliding" for t in d.get("layer_types", ()))
        return cls(**d)


def _show(v: object) -> str:
    """A value for an error message, cut short: a header may hold a megabyte where a number belongs."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def gemma3_layer_types(n_layers: int, pattern: int = 6) -> tuple[bool, ...]:
    """Gemma 3: five sliding-window layers, then one global layer, repeated."""
    return tuple(bool((i + 1) % pattern) for i in range(n_layers))


def gemma2_layer_types(n_layers: int) -> tuple[bool, ...]:
    """Gemma 2: sliding and global layers alternate, starting with sliding."""
    return tuple(i % 2 == 0 for i in range(n_layers))
