"""One re-authored decoder for Gemma 1, 2 and 3 text models, written to be exported.

Read top to bottom: RMSNorm, RoPE, the KV cache, attention, the MLP, a block, the model.
Every family difference is a switch in GemmaConfig (softcaps, post-norms, QK-norm,
sliding-window layers, per-layer RoPE base), never a branch on a family name.

Export-friendliness, decided up front:
- a static KV cache of `max_seq_len` positions per layer, held as buffers and written in
  place at explicit positions; no ring buffer: sliding-window layers keep the full length and
  the window is a mask computed from positions, so it stays right past the window;
- one code path for a prefill of T tokens and a decode of 1 token: forward(tokens, input_pos)
  where input_pos is the start position, as ExecuTorch's LLM runner passes it;
- no data-dependent Python control flow;
- grouped-query attention folds the query groups into the sequence axis instead of expanding
  K/V to every query head: litert-torch converts `q @ expand(k)^T` wrongly
  (shared/notes/litert-attention.md), and the fold is also cheaper.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from edge.models.config import GemmaConfig

_linear_forms = False


@contextmanager
def linear_forms() -> Iterator[None]:
    """Trace RMSNorm's mean square and RoPE's rotate-half as small constant linears (ExecuTorch export).

    The same values to float rounding, but ops that XNNPACK takes with a dynamic token count: it
    refuses a mean over the last axis (MeanDimConfig: 4-D over dims 2 and 3 only) and any slice of a
    tensor with a dynamic size (SliceCopyConfig), so each norm and each rotation cut the delegate
    (on the 270M int4: 246 delegate calls; 48 with these forms and edge/targets/executorch.py's
    infer_symbolic_view_dims). Not the default: eager keeps the reference's formulas, and LiteRT's and
    ONNX's quantizers take every FULLY_CONNECTED / MatMul constant for a weight of the scheme.
    """
    global _linear_forms
    kept, _linear_forms = _linear_forms, True
    try:
        yield
    finally:
        _linear_forms = kept


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is stored as an offset from 1 and applied as (1 + w)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.weight = nn.Parameter(torch.zeros(dim))
        # (1 + weight) as a constant while an export traces (folded_norms): else an add every call
        self.register_buffer("folded", None, persistent=False)
        for name, value in self.constants().items():
            self.register_buffer(name, value, persistent=False)

    def constants(self) -> dict[str, torch.Tensor]:
        """Non-persistent buffers (linear_forms), made again by Gemma.setup_cache when built on meta."""
        return {
            "inv_dim": torch.full((1, self.dim), 1.0 / self.dim, device="cpu"),
            # eps as the linear's bias, not a following add: coremltools 9's fuse_linear_bias pass
            # indexes the added constant's last axis and raises IndexError on a 0-d one.
            "eps_bias": torch.full((1,), self.eps, device="cpu"),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 and multiplied by (1 + w) before casting back, as the reference does
        # (transformers PR 29402: Gemma is (x * w).to(dtype), not x.to(dtype) * w).
        xf = x.float()
        if _linear_forms:  # on rows: litert-torch / coremltools mishandle a 4-D one (q_norm)
            sq = xf * xf
            if x.dim() == 2:  # the residual stream's rows: no reshape around the linear
                ms = F.linear(sq, self.inv_dim, self.eps_bias)
            else:
                ms = F.linear(sq.reshape(-1, self.dim), self.inv_dim, self.eps_bias).view(*x.shape[:-1], 1)
        else:
            ms = xf.pow(2).mean(-1, keepdim=True) + self.eps
        out = xf * torch.rsqrt(ms)
        scale = self.folded if self.folded is not None else 1.0 + self.weight.float()
        return (out * scale).type_as(x)


@contextmanager
def folded_norms(model: nn.Module) -> Iterator[None]:
    """Each RMSNorm's (1 + weight) computed once, as a constant, while an export traces the model."""
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    for m in norms:
        m.folded = 1.0 + m.weight.detach().float()
    try:
        yield
    finally:
        for m in norms:
            m.folded = None


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """(D/2,) float32 inverse frequencies of the non-interleaved ("rotate half") RoPE, as transformers builds them."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, 1, D) at positions pos (T,), computed in the graph; the 1 broadcasts over the heads.

    Not a precomputed (max_seq_len, D) table: for the 270M at 1024 positions the two tables (global
    and local theta) were 4.2 MB of constants in every artifact, 1.7% of the int4 size budget.
    """
    freqs = pos.float().view(-1, 1, 1) * inv_freq.view(1, 1, -1)  # (T, 1, D/2): torch.outer's products
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


ROTATE_PAIR = ((0.0, -1.0), (1.0, 0.0))  # (x1, x2) -> (-x2, x1) as a linear: exact, one nonzero term per output


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) token-major; cos, sin (T, 1, D); rotate: ROTATE_PAIR in x's dtype (linear_forms: a
    buffer, as a constant made in the graph stays outside XNNPACK, which wants its linears' weights static)."""
    B, T, H, D = x.shape
    if _linear_forms:  # the halves paired by a view and a transpose, each pair rotated by a 2x2 linear
        pairs = x.view(B, T, H, 2, D // 2).transpose(-1, -2).reshape(-1, 2)  # rows (x1_i, x2_i)
        rotated = F.linear(pairs, rotate).view(B, T, H, D // 2, 2).transpose(-1, -2).reshape(B, T, H, D)
    else:
        rotated = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], dim=-1)
    return x * cos + rotated * sin


def lookup(table: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
    """table(tokens), dequantizing only the rows read when the table is a torchao integer tensor.

    torchao's embedding on IntxUnpackedToInt8Tensor dequantizes the whole table at every call: for
    the 270M's 262144 x 640 rows, 0.67 GB of floats made and dropped per forward -- 27% of `edge
    export`'s int4 quantize stage (py-spy: GPTQ's calibration passes) and most of an eager decode
    step. The rows are gathered first and dequantized by torchao's own dequantize_affine: the same
    arithmetic on every element, so the same values. While tracing (export), the module call is
    kept: the ExecuTorch lowering fuses dequantize + embedding into its quantized lookup kernels.
    """
    w = table.weight
    if not hasattr(w, "qdata") or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return table(tokens)
    from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, dequantize_affine

    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[w.target_dtype]
    flat = tokens.reshape(-1)
    rows = dequantize_affine(
        w.qdata[flat], w.block_size, w.scale[flat], w.zero_point[flat], torch.int8, qmin, qmax, output_dtype=w.dtype
    )
    return rows.view(*tokens.shape, -1)


class KVCache(nn.Module):
    """Static cache of one layer: k, v (B, Hkv, S, D), written at explicit positions."""

    def __init__(self, max_batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (T,) int64; k, v (B, Hkv, T, D). Returns the whole cache (B, Hkv, S, D)."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.cache: KVCache | None = None
        for name, value in self.constants().items():
            self.register_buffer(name, value, persistent=False)

    def constants(self) -> dict[str, torch.Tensor]:
        return {"rotate": torch.tensor(ROTATE_PAIR, device="cpu")}

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (B*T, dim) rows, token-major; pos (T,); cos, sin (T, 1, D); mask (T*G, S) additive, each row of the (T, S)
        mask repeated for the G query heads that share a KV head (None for a fused cache: causal from the
        current position). Returns (B*T, dim).

        `cache` replaces the layer's own cache for this call (anything with KVCache.update's
        contract): how a functional export passes the cache in and out (edge/targets/litert.py)."""
        N, T = x.shape[0], pos.shape[0]
        B, G, D = N // T, self.n_heads // self.n_kv, self.hd
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # (N, H * D)
        if self.cfg.qk_norm:  # on rows of one head each
            q, k = self.q_norm(q.view(N * self.n_heads, D)), self.k_norm(k.view(N * self.n_kv, D))
        q = q.view(B, T, self.n_heads, D)
        k, v = k.view(B, T, self.n_kv, D), v.view(B, T, self.n_kv, D)
        rotate = self.rotate.to(q.dtype)
        q, k = apply_rope(q, cos, sin, rotate), apply_rope(k, cos, sin, rotate)
        cache = cache if cache is not None else self.cache
        assert cache is not None, "call Gemma.setup_cache() first"
        if getattr(cache, "fused", False):  # an export's cache that also attends (edge/targets/executorch.py)
            out = cache.attend(q, k, v, pos, mask, self.scale)  # token-major in and out: (B, T, Hq, D)
            return self.wo(out.reshape(N, self.n_heads * D))
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
        k_all, v_all = cache.update(pos, k, v)  # (B, Hkv, S, D)

        # Fold: query heads j*G .. j*G+G-1 share KV head j (transformers' repeat_kv order), so
        # (B, T, Hq, D) -> (B, Hkv, T*G, D), rows (t, g), attends to k_all with no K/V expansion; with one KV
        # head both folds are views. 3-D bmm, not a 4-D matmul: torch.matmul broadcasts through an expand of
        # the token-sized operand, which XNNPACK does not take with a dynamic size.
        S = k_all.shape[2]
        qf = q.view(B, T, self.n_kv, G, D).transpose(1, 2).reshape(B * self.n_kv, T * G, D)
        scores = torch.bmm(qf, k_all.reshape(B * self.n_kv, S, D).transpose(1, 2)) * self.scale
        if self.cfg.attn_softcap is not None:
            scores = torch.tanh(scores / self.cfg.attn_softcap) * self.cfg.attn_softcap
        scores = scores + mask  # (B*Hkv, T*G, S) + (T*G, S): the same mask for every group
        probs = F.softmax(scores.float(), dim=-1).type_as(q)
        out = torch.bmm(probs, v_all.reshape(B * self.n_kv, S, D))  # (B*Hkv, T*G, D)
        out = out.view(B, self.n_kv, T, G * D).transpose(1, 2).reshape(N, self.n_heads * D)
        return self.wo(out)


class MLP(nn.Module):
    """GeGLU with the tanh-approximate GELU."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__()
        self.local = cfg.is_local(layer)
        self.post_norms = cfg.post_norms
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        if cfg.post_norms:
            self.post_attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.post_mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), pos, cos, sin, mask, cache)
        if self.post_norms:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_norms:
            h = self.post_mlp_norm(h)
        return x + h


class Gemma(nn.Module):
    """forward(tokens (B, T) int64, input_pos (1,) int64 start position) -> logits.

    Returns the last position's logits (B, V) by default (what on-device runners need; it
    spares a (T, V) head matmul at prefill) or every position's (B, T, V) with all_logits=True.
    """

    def __init__(self, cfg: GemmaConfig, max_seq_len: int = 1024, max_batch: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Per-channel factor on the looked-up embedding: set only when one quantized table serves both
        # the lookup and a SmoothQuant-scaled head (edge/quant/apply.py, shared tables). None: no op.
        self.register_buffer("embed_rescale", None, persistent=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.max_seq_len = 0
        self.setup_cache(max_seq_len, max_batch)

    def setup_cache(self, max_seq_len: int, max_batch: int = 1, dtype: torch.dtype | None = None) -> None:
        """(Re)allocate the KV caches for max_seq_len positions, the RoPE frequencies and the modules' constants."""
        dtype = dtype or self.embed.weight.dtype
        self.max_seq_len = max_seq_len
        for layer in self.layers:
            cache = KVCache(max_batch, self.cfg.n_kv_heads, max_seq_len, self.cfg.head_dim, dtype)
            # in the model's mode: a new module trains, and the mode is part of what torch.export records
            layer.attn.cache = cache.train(self.training)
        for m in self.modules():
            for name, value in getattr(m, "constants", dict)().items():
                m.register_buffer(name, value, persistent=False)
        for name, theta in (("global", self.cfg.rope_theta), ("local", self.cfg.rope_local_theta)):
            self.register_buffer(f"rope_inv_freq_{name}", rope_inv_freq(self.cfg.head_dim, theta), persistent=False)

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.attn.cache.k.zero_()
            layer.attn.cache.v.zero_()

    def masks(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive masks (T, S) from positions: causal for global layers, plus the window for local."""
        q = pos.unsqueeze(1)  # (T, 1)
        kv = torch.arange(self.max_seq_len, dtype=pos.dtype, device=pos.device).unsqueeze(0)  # (1, S)
        causal = kv <= q
        # transformers' sliding_window_overlay: key kv is visible from query q when kv > q - window.
        window = self.cfg.sliding_window if self.cfg.sliding_window is not None else self.max_seq_len
        local = causal & (kv > q - window)
        neg_inf = torch.tensor(float("-inf"), dtype=self.embed.weight.dtype)
        zero = torch.tensor(0.0, dtype=self.embed.weight.dtype)
        return torch.where(causal, zero, neg_inf), torch.where(local, zero, neg_inf)

    def forward(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, all_logits: bool = False, caches: list | None = None
    ) -> torch.Tensor:
        """`caches`: one per layer, used instead of the model's own (a functional export's KV in/out)."""
        B, T = tokens.shape
        pos = input_pos[:1] + torch.arange(T, dtype=torch.int64, device=tokens.device)  # (T,)
        # Embeddings are stored unscaled; the reference multiplies by sqrt(dim) in the weights' dtype.
        x = lookup(self.embed, tokens) if isinstance(self.embed, nn.Embedding) else self.embed(tokens)
        x = x * torch.tensor(math.sqrt(self.cfg.dim), dtype=self.embed.weight.dtype)  # (B, T, dim)
        if self.embed_rescale is not None:
            x = x * self.embed_rescale
        # The residual stream as rows (B*T, dim): norms, linears and the MLP are per token, and on 2-D
        # rows each linear is one matmul with no reshape around it (an XNNPACK operator each, a step).
        x = x.reshape(B * T, self.cfg.dim)
        global_mask, local_mask = self.masks(pos)
        dtype = self.embed.weight.dtype
        tables = {}
        G = self.cfg.n_heads // self.cfg.n_kv_heads  # each mask repeated once here, not in every layer
        for local, name, mask in ((False, "global", global_mask), (True, "local", local_mask)):
            cos, sin = rope(pos, getattr(self, f"rope_inv_freq_{name}"))
            mask = mask[:, None].expand(T, G, mask.shape[-1]).reshape(T * G, -1)  # (T*G, S): rows (t, g)
            tables[local] = (cos.to(dtype), sin.to(dtype), mask)  # (T, 1, D), (T, 1, D), (T*G, S)
        for i, layer in enumerate(self.layers):
            cos, sin, mask = tables[layer.local]
            cache = caches[i] if caches is not None else None
            if cache is None and getattr(layer.attn.cache, "fused", False):
                mask = None  # a fused cache attends causally from the current position on its own
            x = layer(x, pos, cos, sin, mask, cache)
        x = self.norm(x).view(B, T, self.cfg.dim)
        if not all_logits:
            x = x[:, -1, :]  # (B, dim)
        logits = self.lm_head(x)  # (B, [T,] V)
        if self.cfg.final_softcap is not None:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits
