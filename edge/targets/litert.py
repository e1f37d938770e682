"""LiteRT (.tflite) through litert-torch: prefill / decode signatures with the KV cache passed in and out.

The interface follows litert-torch's own Gemma 3 export (shared/notes/litert-attention.md):
signatures `prefill_<N>` (fixed N) and `decode` (N = 1), inputs `tokens` int32 [1, N],
`input_pos` int32 [N] (consecutive positions), `kv_cache_k_<i>` / `kv_cache_v_<i>` float32
[1, n_kv_heads, max_seq_len, head_dim]; outputs the same KV tensors, written at input_pos with
`tfl.dynamic_update_slice`, and `logits` float32 [1, 1, V] of the last position. Differences from
the stock export, recorded in the manifest's io section: every signature returns logits (a runner
can stop a prompt on a prefill), the attention mask is computed inside from input_pos (no `mask`
input), and V is stored like K, not transposed. LiteRT-LM needs none of those three (it passes the
KV tensors through by name, whatever their layout): it runs this file from `model.litertlm`
(`package`), and our runner (edge/runtime/tflite.py) runs the `.tflite` with only numpy +
ai-edge-litert.

litert-torch lowers torchao's quantized tensors itself (converter v2, `use_v2=True`): weight-only
per-channel and blockwise int8 / int4, and dynamic int8 activations with per-channel weights;
dynamic activations with blockwise weights raise NotImplementedError there
(litert_torch/_convert/test/test_convert_torchao.py::test_drq_blockwise_raises_not_implemented).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edge.targets import Lowered
from edge.targets.functional import functional_step, metadata  # noqa: F401  (the backend interface)

PREFILL_LENGTHS = (8, 32, 128)
LITERTLM = "model.litertlm"
TOKENIZER = "tokenizer.model"  # written into the bundle before `package` runs (edge/api.py)


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
        # [1, 1, V]: LiteRT-LM refuses any other rank ("Output logits must be (batch, seq, vocab)",
        # litert_lm runtime/executor/llm_litert_compiled_model_executor.cc, litert-lm-api 0.18.1).
        return {"logits": logits.unsqueeze(1), "kv_cache": dict(zip(names, flat, strict=True))}


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


def export(model: nn.Module, max_seq_len: int, backend, meta: dict, stages, float16_weights: bool = False) -> Lowered:
    """float16_weights: the model's weights hold fp16 values (scheme `fp16`): stored as fp16 constants."""
    from edge.targets import litert_quant
    from edge.targets.onnx_quant import dequantized

    prefill = tuple(n for n in PREFILL_LENGTHS if n < max_seq_len)
    with (
        stages.run("convert", f"litert-torch: decode + prefill {', '.join(map(str, prefill))}"),
        torch.no_grad(),
        dequantized(model, dynamic_ok=True) as found,
    ):
        program = convert(model, max_seq_len, meta["vocab_size"], prefill)
    weights = found.weights
    coverage = []
    if weights:
        with stages.run("quantize", "ai-edge-quantizer writes the scheme's integers and scales, unchanged"):
            program = litert_quant.quantize(program, weights)
        coverage = [{"name": w.name, "bits": w.bits, "group": w.group, "dynamic_int8_act": w.dynamic} for w in weights]
    if float16_weights:
        with stages.run("quantize", "ai-edge-quantizer stores every FULLY_CONNECTED / EMBEDDING_LOOKUP weight as fp16"):
            program = litert_quant.float16(program)
    kv = {"dtype": "float32", "shape": meta["kv_shape"]}
    io = {
        "signatures": {
            **{f"prefill_{n}": {"tokens": [1, n], "input_pos": [n]} for n in prefill},
            "decode": {"tokens": [1, 1], "input_pos": [1]},
        },
        "inputs": {"tokens": "int32", "input_pos": "int32, consecutive positions", "kv_cache_{k,v}_<layer>": kv},
        "outputs": {"logits": [1, 1, meta["vocab_size"]], "kv_cache_{k,v}_<layer>": kv},
        "meta": meta,
        "vs_stock_litert_torch_export": "prefill also returns logits; no mask input (computed from input_pos); "
        f"V not transposed. LiteRT-LM runs it as it is, from {LITERTLM}",
    }
    delegation = {"runtime": "LiteRT CPU (XNNPACK delegate by default)", "integer_weights": coverage}
    if backend.name == "litert-gpu":
        from edge.targets import gpu_ops

        delegation["runtime"] = "LiteRT GPU accelerator, fp32 precision (on this host: LiteRT CPU, the same program)"
        delegation["gpu"] = gpu_ops.check(program)
    return Lowered(program, io, delegation)


def package(folder: Path, artifact: str, max_seq_len: int, special: dict, chat: dict) -> dict:
    """`model.litertlm` beside the .tflite: the same program, the tokenizer and LiteRT-LM's metadata.

    Built with litert_lm_builder (what litert-torch's own `build_litertlm` wraps) called directly: its
    wrapper cannot set `prefer_activation_type`, and LiteRT-LM's CPU default for a text decoder is fp16
    activations, which the 270M's residual stream overflows; fp32 is what the validator measured.
    Returns the manifest's description of the file.
    """
    import contextlib
    import io
    import tempfile

    import litert_lm_builder as lb
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2

    user_prefix, user_suffix_model_prefix = chat["user_turn"].split("{prompt}")
    model_prefix = "<start_of_turn>model\n"
    assert user_suffix_model_prefix.endswith(model_prefix), chat["user_turn"]
    md = llm_metadata_pb2.LlmMetadata()
    md.start_token.token_ids.ids.append(special["bos"])
    for t in special["stop"]:
        md.stop_tokens.add().token_ids.ids.append(t)
    md.prompt_templates.user.prefix = user_prefix
    md.prompt_templates.user.suffix = user_suffix_model_prefix[: -len(model_prefix)]
    md.prompt_templates.model.prefix = model_prefix
    md.prompt_templates.model.suffix = md.prompt_templates.user.suffix
    md.max_num_tokens = max_seq_len
    md.llm_model_type.CopyFrom(llm_model_type_pb2.LlmModelType(gemma3=llm_model_type_pb2.Gemma3()))
    md.jinja_prompt_template = chat["jinja"]
    # The builder prints to stdout ("Adding prefer_activation_type"): keep stdout for our own output.
    with tempfile.TemporaryDirectory() as work, contextlib.redirect_stdout(io.StringIO()):
        meta_path = Path(work) / "llm_metadata.pb"
        meta_path.write_bytes(md.SerializeToString())
        builder = lb.LitertLmFileBuilder()
        builder.add_system_metadata(lb.Metadata(key="Authors", value="gemma-edge", dtype=lb.DType.STRING))
        builder.add_llm_metadata(str(meta_path))
        builder.add_sentencepiece_tokenizer(str(folder / TOKENIZER))
        builder.add_tflite_model(
            str(folder / artifact), lb.TfLiteModelType.PREFILL_DECODE, prefer_activation_type="fp32"
        )
        with open(folder / LITERTLM, "wb") as f:
            builder.build(f)
    return {
        "file": LITERTLM,
        "holds": f"{artifact} (the same program), {TOKENIZER}, LlmMetadata (gemma3, BOS, stop ids, turn "
        "templates, max_num_tokens), prefer_activation_type fp32",
        "runtime": "LiteRT-LM (tested with litert-lm-api 0.18.1: Engine(path), greedy tokens and "
        "per-token scores vs the eager model)",
    }
