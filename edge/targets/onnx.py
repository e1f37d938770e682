"""ONNX (.onnx) through torch.onnx.export (dynamo), run by onnxruntime: one graph for prefill and decode.

Inputs `tokens` int64 [1, T] (T dynamic), `input_pos` int64 [T] (consecutive positions) and
`past_k_<i>` / `past_v_<i>` float32 [1, n_kv_heads, max_seq_len, head_dim]; outputs `logits`
float32 [1, V] of the last position and `present_k_<i>` / `present_v_<i>`, the cache written at
input_pos (ScatterElements). The attention mask is computed inside from the positions.
"""

from __future__ import annotations

import torch
from torch import nn

from edge.targets import Lowered
from edge.targets.functional import functional_step, metadata, scatter_write  # noqa: F401  (backend interface)


class Graph(nn.Module):
    def __init__(self, model: nn.Module, vocab: int) -> None:
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, *kv: torch.Tensor) -> tuple:
        logits, kv = functional_step(self.model, self.vocab, tokens, input_pos, list(kv), scatter_write)
        return (logits, *kv)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{kind}_{i}" for i in range(n_layers) for kind in ("k", "v")]
    return ["tokens", "input_pos", *(f"past_{n}" for n in kv)], ["logits", *(f"present_{n}" for n in kv)]


def convert(model: nn.Module, max_seq_len: int, vocab: int, int8_head: bool = False) -> tuple[bytes, list[dict]]:
    """The .onnx bytes, and where each of the scheme's integer weights went (edge/targets/onnx_quant.py).
    `int8_head`: a dynamic int8 head on onnxruntime's int8 kernel (onnx_quant.INT8_COMPUTE), not exact."""
    from torch.export import Dim

    from edge.targets.onnx_quant import INT8_COMPUTE, dequantized, rewrite

    cfg = model.cfg
    kv = [torch.zeros(1, cfg.n_kv_heads, max_seq_len, cfg.head_dim) for _ in range(2 * cfg.n_layers)]
    args = (torch.tensor([[2, 3, 4]]), torch.arange(3), *kv)
    seq = Dim("seq", min=1, max=max_seq_len - 1)
    shapes = ({1: seq}, {0: seq}, tuple(None for _ in kv))  # *kv is one varargs parameter
    inputs, outputs = io_names(cfg.n_layers)
    with dequantized(model, fake_quant=True) as found:
        # torch.export first: torch.onnx.export's own call rewrote the varargs' dynamic shapes into a
        # list that torch.export then refused ("inputs[2] is a tuple, but dynamic_shapes[2] is a list").
        ep = torch.export.export(Graph(model, vocab).eval(), args, dynamic_shapes=shapes, strict=True)
        program = torch.onnx.export(
            ep, dynamo=True, input_names=inputs, output_names=outputs, optimize=True, verbose=False
        )
        del ep
        proto = program.model_proto
        del program
    coverage = rewrite(proto, found, INT8_COMPUTE if int8_head else ()) if found else []
    strip_debug_info(proto)
    if proto.ByteSize() >= 2**31:  # protobuf's limit: larger graphs need external data files
        raise NotImplementedError("an .onnx over 2 GB (external data) is not supported by the bundle yet")
    return proto.SerializeToString(), coverage


def _graphs(g):
    """A graph and the subgraphs its nodes hold (If / Loop / Scan bodies)."""
    yield g
    for node in g.node:
        for a in node.attribute:
            if a.HasField("g"):
                yield from _graphs(a.g)
            for sub in a.graphs:
                yield from _graphs(sub)


def strip_debug_info(proto) -> None:
    """Drop the exporter's per-node metadata (fx node, class hierarchy, Python stack trace): 2.1 of a tiny
    graph's 2.5 MB. onnxruntime reads none of it; a node's name still says where it came from."""
    nodes = [n for g in _graphs(proto.graph) for n in g.node] + [n for f in proto.functions for n in f.node]
    for node in nodes:
        del node.metadata_props[:]


def export(model: nn.Module, max_seq_len: int, backend, meta: dict, stages, int8_head: bool = False) -> Lowered:
    with stages.run("convert", "torch.onnx.export (dynamo), KV cache in and out"), torch.no_grad():
        program, coverage = convert(model, max_seq_len, meta["vocab_size"], int8_head)
    inputs, outputs = io_names(meta["n_layers"])
    kv = {"dtype": "float32", "shape": meta["kv_shape"]}
    io = {
        "inputs": {"tokens": "int64 [1, T], T dynamic", "input_pos": "int64 [T], consecutive", "past_{k,v}_<i>": kv},
        "outputs": {"logits": [1, meta["vocab_size"]], "present_{k,v}_<i>": kv},
        "input_names": inputs,
        "output_names": outputs,
        "meta": meta,
    }
    return Lowered(program, io, {"runtime": "onnxruntime CPUExecutionProvider", "integer_weights": coverage})
