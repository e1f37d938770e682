"""LiteRT (.tflite) through litert-torch: prefill / decode signatures with the KV cache passed in and out.

The interface follows litert-torch's own Gemma 3 export (shared/notes/litert-attention.md):
signatures `prefill_<N>` (fixed N) and `decode` (N = 1), inputs `tokens` int32 [1, N],
`input_pos` int32 [N] (consecutive positions), `kv_cache_k_<i>` / `kv_cache_v_<i>` float32
[1, n_kv_heads, max_seq_len, head_dim]; outputs the same KV tensors, written at input_pos with
`tfl.dynamic_update_slice`, and `logits` float32 [1, V] of the last position. Differences from the
stock export, recorded in the manifest's io section: every signature returns logits (a runner can
stop a prompt on a prefill), the attention mask is computed inside from input_pos (no `mask`
input), and V is stored like K, not transposed. So LiteRT-LM's stock Gemma 3 pipeline cannot
drive this file as is; our runner (edge/runtime/tflite.py) can, with only numpy + ai-edge-litert.

litert-torch lowers torchao's quantized tensors itself (converter v2, `use_v2=True`): weight-only
per-channel and blockwise int8 / int4, and dynamic int8 activations with per-channel weights;
dynamic activations with blockwise weights raise NotImplementedError there
(litert_torch/_convert/test/test_convert_torchao.py::test_drq_blockwise_raises_not_implemented).
"""

from __future__ import annotations

import torch
from torch import nn

from edge.targets.executorch import Lowered
from edge.targets.functional import functional_step, metadata  # noqa: F401  (the backend interface)

PREFILL_LENGTHS = (8, 32, 128)


def dus_write(cache: torch.Tensor, pos: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """tfl.dynamic_update_slice at [0, 0, pos[0], 0]: positions are consecutive from pos[0]."""
    from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice

    zero = torch.zeros([], dtype=torch.int32)
    return dynamic_update_slice(cache, new, [zero, zero, pos[0].to(torch.int32).reshape([]), zero])


class Signature(nn.Module):
    """(tokens, input_pos, kv_cache) -> {logits, kv_cache}: the model with its cache passed through."""

    def __init__(self, model: nn.Module, vocab: int) -> None:
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_cache: dict[str, torch.Tensor]) -> dict:
        n = len(self.model.layers)
        flat = [kv_cache[f"{kind}_{i}"] for i in range(n) for kind in ("k", "v")]
        logits, flat = functional_step(self.model, self.vocab, tokens, input_pos, flat, dus_write)
        names = [f"{kind}_{i}" for i in range(n) for kind in ("k", "v")]
        return {"logits": logits, "kv_cache": dict(zip(names, flat, strict=True))}


def sample_inputs(cfg, max_seq_len: int, n: int) -> dict:
    shape = (1, cfg.n_kv_heads, max_seq_len, cfg.head_dim)
    kv = {f"{kind}_{i}": torch.zeros(shape) for i in range(cfg.n_layers) for kind in ("k", "v")}
    return {
        "tokens": torch.zeros((1, n), dtype=torch.int32),
        "input_pos": torch.arange(n, dtype=torch.int32),
        "kv_cache": kv,
    }


def convert(model: nn.Module, max_seq_len: int, vocab: int, prefill: tuple[int, ...]) -> bytes:
    import litert_torch

    litert_torch.config.show_progress = False  # its own task log would bury our stage lines
    sig = Signature(model, vocab).eval()
    lengths = [n for n in prefill if n < max_seq_len]
    conv = litert_torch.signature("decode", sig, sample_kwargs=sample_inputs(model.cfg, max_seq_len, 1))
    for n in lengths:
        conv = conv.signature(f"prefill_{n}", sig, sample_kwargs=sample_inputs(model.cfg, max_seq_len, n))
    edge_model = conv.convert()
    return edge_model.model_content()


def export(model: nn.Module, max_seq_len: int, backend, meta: dict, stages) -> Lowered:
    from edge.targets import litert_quant
    from edge.targets.onnx_quant import dequantized

    prefill = tuple(n for n in PREFILL_LENGTHS if n < max_seq_len)
    with (
        stages.run("convert", f"litert-torch: decode + prefill {', '.join(map(str, prefill))}"),
        torch.no_grad(),
        dequantized(model, dynamic_ok=True) as found,
    ):
        program = convert(model, max_seq_len, meta["vocab_size"], prefill)
    weights = list({id(iw): iw for iw, _ in found.values()}.values())
    coverage = []
    if weights:
        linears = [w for w in weights if w.kind == "linear"]
        tables = [w for w in weights if w.kind == "embedding"]
        dynamic = {w.dynamic for w in linears}
        if len(dynamic) > 1:
            raise NotImplementedError("linears with and without dynamic activations in one scheme: not in LiteRT yet")
        with stages.run("quantize", "ai-edge-quantizer writes the scheme's integers and scales, unchanged"):
            program = litert_quant.quantize(program, linears, tables, dynamic.pop() if dynamic else False)
        coverage = [{"name": w.name, "bits": w.bits, "group": w.group, "dynamic_int8_act": w.dynamic} for w in weights]
    kv = {"dtype": "float32", "shape": meta["kv_shape"]}
    io = {
        "signatures": {
            **{f"prefill_{n}": {"tokens": [1, n], "input_pos": [n]} for n in prefill},
            "decode": {"tokens": [1, 1], "input_pos": [1]},
        },
        "inputs": {"tokens": "int32", "input_pos": "int32, consecutive positions", "kv_cache_{k,v}_<layer>": kv},
        "outputs": {"logits": [1, meta["vocab_size"]], "kv_cache_{k,v}_<layer>": kv},
        "meta": meta,
        "vs_stock_litert_lm": "prefill also returns logits; no mask input (computed from input_pos); V not "
        "transposed: LiteRT-LM's stock Gemma 3 pipeline cannot drive this file",
    }
    return Lowered(program, io, {"runtime": "LiteRT CPU (XNNPACK delegate by default)", "integer_weights": coverage})
