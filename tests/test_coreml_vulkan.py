"""CoreML and Vulkan: lowering only (neither runs on this host), on a 2-layer random Gemma 3.

What is checked: the program lowers into the backend's delegate, it carries the runner's
constant methods and a static [1, 1] forward, the delegation report counts the delegate calls
and lists what stays outside, and the Vulkan KV write (swapped in for export only) is exact.
"""

import collections

import pytest
import torch

from conftest import random_calibration, tiny_config
from edge.models.config import Family
from edge.models.gemma import Gemma, KVCache
from edge.models.weights import assign, random_tensors
from edge.progress import Stages
from edge.quant.apply import quantize_model
from edge.quant.schemes import SCHEMES, Act, Scheme, WeightQuant
from edge.targets import BACKENDS, Lowered
from edge.targets import executorch as et

MAX_SEQ = 32
LAYERS = 2  # one sliding-window layer, one global layer


def tiny_model(seed: int = 0) -> Gemma:
    cfg = tiny_config(Family.GEMMA3, n_kv_heads=2, n_layers=LAYERS, layer_types=(True, False))
    m = Gemma(cfg, max_seq_len=MAX_SEQ).eval()
    assign(m, random_tensors(cfg, seed), "random")
    return m


def lower(model: Gemma, backend: str) -> Lowered:
    b = BACKENDS[backend]
    meta = et.metadata(model.cfg, MAX_SEQ, 2, [1, 106], model.cfg.vocab_size, not b.static_shapes)
    return et.export(model, MAX_SEQ, b, meta, Stages())


def vulkan_ops(program: bytes) -> collections.Counter:
    """Operator names inside the Vulkan delegates of a serialized program."""
    from executorch.backends.vulkan.serialization.vulkan_graph_serialize import (
        extract_vk_flatbuffer,
        flatbuffer_to_vk_graph,
    )
    from executorch.exir._serialize._program import _ExtendedHeader, deserialize_pte_binary

    prog = deserialize_pte_binary(program).program
    base = _ExtendedHeader.from_bytes(program[8:]).segment_base_offset
    ops: collections.Counter = collections.Counter()
    for d in prog.execution_plan[0].delegates:
        assert d.id == "VulkanBackend"
        if d.processed.location == 0:  # inline
            data = prog.backend_delegate_data[d.processed.index].data
        else:
            seg = prog.segments[d.processed.index]
            data = program[base + seg.offset : base + seg.offset + seg.size]
        ops.update(c.name for c in flatbuffer_to_vk_graph(extract_vk_flatbuffer(data)).chain)
    return ops


@pytest.fixture(scope="module", params=["coreml", "vulkan"])
def lowered(request, tmp_path_factory):
    backend = request.param
    if not BACKENDS[backend].available():
        pytest.skip(f"{BACKENDS[backend].package} is not installed")
    low = lower(tiny_model(), backend)
    path = tmp_path_factory.mktemp(backend) / "model.pte"
    path.write_bytes(low.program)
    return backend, low, path


def test_lowers_into_one_delegate_and_reports_what_stays_outside(lowered):
    backend, low, _ = lowered
    d = low.delegation
    assert d["delegate_calls"] == 1, d
    assert d["delegates"] == {{"coreml": "CoreMLBackend", "vulkan": "VulkanBackend"}[backend]: 1}
    assert d["ops_in_delegates"] > 100
    outside = d["ops_outside_delegate"]
    assert isinstance(outside, dict)
    if backend == "coreml":
        # take_over_mutable_buffer=False: the delegate returns the new caches, copy_ writes them back
        assert outside == {"aten::copy_": 2 * LAYERS}
    else:
        assert outside == {}  # the KV write (update_cache) and the cache itself live on the GPU
    assert d["compute"]["precision"] == "fp32"  # fp16 overflows Gemma 3's residual stream
    assert low.io["compute"] == d["compute"]


def test_program_has_the_runner_contract(lowered):
    from executorch.runtime import Runtime

    _, low, path = lowered
    prog = Runtime.get().load_program(path)  # loads without the backend; only forward would need it
    assert {"forward", "get_max_seq_len", "get_max_context_len", "use_kv_cache", "enable_dynamic_shape",
            "get_eos_ids", "get_bos_id", "get_vocab_size", "get_n_layers"} <= set(prog.method_names)  # fmt: skip

    def constant(name):
        return prog.load_method(name).execute([])[0]

    assert constant("get_max_seq_len") == MAX_SEQ
    assert constant("enable_dynamic_shape") is False  # the runner prefills one token per call
    assert list(prog.load_method("get_eos_ids").execute([])) == [1, 106]
    meta = prog.metadata("forward")
    assert meta.num_inputs() == 2 and meta.num_outputs() == 1
    assert meta.input_tensor_meta(0).sizes() == (1, 1) and meta.input_tensor_meta(1).sizes() == (1,)
    assert meta.output_tensor_meta(0).sizes() == (1, 256)
    assert low.io["methods"]["forward"]["max_T"] == 1


@pytest.mark.parametrize("lowered", ["vulkan"], indirect=True)
def test_vulkan_program_writes_the_cache_on_the_gpu(lowered):
    _, low, _ = lowered
    ops = vulkan_ops(low.program)
    assert ops["update_cache.default"] == 2 * LAYERS
    # q k v o gate up down and the head; each RMSNorm's mean square (4 per layer, q_norm and k_norm,
    # the final norm); RoPE's pair rotation of q and k
    assert ops["aten.linear.default"] == (7 + 6 + 2) * LAYERS + 1 + 1
    assert not any("index_put" in op for op in ops)


def test_vulkan_kv_write_is_exact_and_the_model_is_restored():
    """The export-time cache (seq-major, llama::update_cache) gives the eager logits bit for bit."""
    model = tiny_model(seed=3)
    ids = list(range(3, 20))

    def run():
        model.reset_cache()
        out = [model(torch.tensor([ids[:5]]), torch.tensor([0]))]  # a prefill, then decode steps
        out += [model(torch.tensor([[t]]), torch.tensor([5 + i])) for i, t in enumerate(ids[5:])]
        return torch.stack(out)

    want = run()
    with et.kv_writes_for(model, BACKENDS["vulkan"]) as how:
        assert "update_cache" in how
        caches = [m for m in model.modules() if isinstance(m, KVCache)]
        assert tuple(caches[0].k.shape) == (1, MAX_SEQ, 2, 16)
        got = run()
    assert torch.equal(want, got)
    assert all(type(c) is KVCache and tuple(c.k.shape) == (1, 2, MAX_SEQ, 16) for c in caches)
    assert torch.equal(run(), want)


def test_vulkan_int4_uses_the_fused_int4_kernels():
    """8da4w linears -> linear_dq8ca_q4gsw, the int4 g32 table -> embedding_q4gsw: nothing outside."""
    model = tiny_model()
    quantize_model(model, SCHEMES["int4-hqq"], random_calibration(model.cfg.vocab_size))
    low = lower(model, "vulkan")
    assert low.delegation["delegate_calls"] == 1 and low.delegation["ops_outside_delegate"] == {}
    ops = vulkan_ops(low.program)
    assert ops["et_vk.linear_dq8ca_q4gsw.default"] == 7 * LAYERS + 1
    assert ops["et_vk.embedding_q4gsw.default"] == 1
    assert not any("dequantize" in op for op in ops)


def test_coreml_lowers_weight_only_int8():
    """CoreML takes torchao weight-only int8 (constexpr dequant ops); 8da schemes it cannot convert."""
    w8 = WeightQuant(8, None, Act.FLOAT)
    model = tiny_model()
    quantize_model(model, Scheme("w8", "int8 weight-only", w8, w8, w8, None))
    low = lower(model, "coreml")
    assert low.delegation["delegate_calls"] == 1
    assert low.delegation["ops_outside_delegate"] == {"aten::copy_": 2 * LAYERS}
