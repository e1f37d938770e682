"""ExecuTorch: export the (quantized) eager model to a .pte that the stock LLM runners load.

The runner contract (read in executorch 1.5.1's extension/llm/runner; see the bundle's io section):
- `forward(tokens int64[1, T], input_pos int64[1]) -> logits float32[1, V]` for the last position,
  the KV cache inside the program (mutable buffers, zero-initialised by the runtime);
- constant methods, ints and bools only (a float aborts the C++ runner): get_max_seq_len (required),
  get_max_context_len, use_kv_cache, enable_dynamic_shape (true: the whole prompt in one call),
  get_eos_ids (replaces the tokenizer's eos), get_bos_id, get_vocab_size, get_n_layers, ...
- the runner samples over the TOKENIZER's vocabulary size, so logits are padded to it when the
  model's vocabulary is smaller (random-weight variants with the Gemma 3 tokenizer).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
from torch import nn

from edge.targets import Backend


class RunnerContract(nn.Module):
    """forward(tokens, input_pos) -> last-position logits (1, V_tokenizer)."""

    def __init__(self, model: nn.Module, pad_to: int) -> None:
        super().__init__()
        self.model = model
        self.pad = pad_to - model.cfg.vocab_size

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens, input_pos)  # (1, V)
        if self.pad > 0:
            logits = torch.cat([logits, logits.new_full((logits.shape[0], self.pad), float("-inf"))], dim=-1)
        return logits


def metadata(cfg, max_seq_len: int, bos_id: int, eos_ids: list[int], vocab: int, dynamic: bool) -> dict:
    return {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "get_vocab_size": vocab,
        "get_bos_id": bos_id,
        "get_eos_ids": list(eos_ids),
        "get_n_layers": cfg.n_layers,
        "get_max_batch_size": 1,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": dynamic,
    }


@dataclass
class Lowered:
    program: bytes
    io: dict
    delegation: dict = field(default_factory=dict)


def _partitioners(backend: Backend) -> list:
    if backend.name == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]
    if backend.name == "coreml":
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        specs = CoreMLBackend.generate_compile_specs(
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT16,
            compute_unit=ct.ComputeUnit.ALL,
        )
        # The open-source runtime is built without CoreML state support: keep the KV buffers outside.
        return [CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=False)]
    if backend.name == "vulkan":
        from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner

        return [VulkanPartitioner({"require_dynamic_shapes": False})]
    raise ValueError(backend.name)


def delegation_report(graph_module) -> dict:
    """Which operators run inside a delegate and which stay outside (portable / quantized kernels)."""
    outside: collections.Counter = collections.Counter()
    delegates = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", "")
        if name == "executorch_call_delegate":
            delegates += 1
        elif name != "getitem" and "alloc" not in name:
            op = node.target.name() if hasattr(node.target, "name") else str(node.target)  # 'aten::mean.dim'
            outside[op] += 1
    return {"delegate_calls": delegates, "ops_outside_delegate": dict(sorted(outside.items()))}


def export(model: nn.Module, max_seq_len: int, backend: Backend, meta: dict, stages) -> Lowered:
    """torch.export -> to_edge_transform_and_lower -> to_executorch; each step a timed stage."""
    import executorch.kernels.quantized  # noqa: F401  (out variants of quantized_decomposed::embedding_*)
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from torch.export import Dim

    wrapper = RunnerContract(model, meta["get_vocab_size"]).eval()
    dynamic = not backend.static_shapes
    tokens = torch.tensor([[2, 3, 4]] if dynamic else [[2]], dtype=torch.int64)
    example = (tokens, torch.tensor([0], dtype=torch.int64))
    # T <= max_seq_len - 1: the runner refuses prompts that fill the whole context.
    shapes = ({1: Dim("seq", min=1, max=max_seq_len - 1)}, None) if dynamic else None
    with stages.run("export", "torch.export of forward(tokens, input_pos)"), torch.no_grad():
        ep = torch.export.export(wrapper, example, dynamic_shapes=shapes, strict=True)
        # index_copy_ (the cache write) has no ExecuTorch kernel: decompose it to index_put.
        ep = ep.run_decompositions({})
    with stages.run("lower", f"to_edge + {backend.name} partitioner"):
        edge = to_edge_transform_and_lower(
            ep,
            partitioner=_partitioners(backend),
            compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
            constant_methods=meta,
        )
        del ep
        report = delegation_report(edge.exported_program().graph_module)
    with stages.run("serialize", "to_executorch + memory planning"):
        et = edge.to_executorch(
            ExecutorchBackendConfig(
                extract_delegate_segments=True,
                # Required: fuses torchao's dequantize_affine + embedding into quantized_decomposed
                # embedding kernels (otherwise "Missing out variants: torchao::dequantize_affine").
                do_quant_fusion_and_const_prop=True,
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
            )
        )
        program = et.buffer
    io = {
        "methods": {
            "forward": {
                "inputs": [
                    {"name": "tokens", "dtype": "int64", "shape": [1, "T" if dynamic else 1]},
                    {"name": "input_pos", "dtype": "int64", "shape": [1], "meaning": "start position"},
                ],
                "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, meta["get_vocab_size"]]}],
                "max_T": max_seq_len - 1 if dynamic else 1,
            },
            **{k: {"constant": v} for k, v in meta.items()},
        },
        "kv_cache": "inside the program: per layer k, v [1, n_kv_heads, max_seq_len, head_dim] fp32, zero at load",
        "logits_padded_to": meta["get_vocab_size"],
    }
    return Lowered(program, io, report)
