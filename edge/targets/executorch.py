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
import collections.abc
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from edge.models.gemma import KVCache, folded_norms, linear_forms
from edge.targets import Backend, Lowered


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


# The weights file of a program whose constants live outside it (ExecuTorch's .ptd, FlatTensor).
WEIGHTS_FILE = "model.ptd"


# How each delegate computes. fp32 everywhere: Gemma 3's residual stream reaches ~1e5 on real
# prompts (270M: |x| up to 1.04e5 in block 14), past fp16's 65504, so an fp16 delegate
# (CoreML FLOAT16, Vulkan force_fp16) turns the logits into NaN on every golden prompt.
COMPUTE = {
    "xnnpack": {"precision": "fp32 (int8 for quantized linears)"},
    "coreml": {
        "precision": "fp32",  # ct.precision.FLOAT32: the ANE (fp16-only) is not used
        "compute_unit": "CPU_ONLY",  # ExecuTorch's llama default: decode is faster on the CPU than the GPU
        "minimum_deployment_target": "iOS18",
        "take_over_mutable_buffer": False,  # the OSS runtime has no CoreML state: KV written back outside
    },
    "vulkan": {"precision": "fp32", "force_fp16": False, "require_dynamic_shapes": False},
}


def _xnnpack_partitioner(checked: bool):
    """XNNPACK's partitioner; unchecked, the same one without its per-node check of preserved ops.

    XnnpackPartitioner.ops_to_not_decompose returns the ops it keeps whole (aten.linear, torchao's
    quantize / dequantize, ...) with a per-node check, and any check sends to_edge down its
    EDGE_DO_NOT_DECOMP path (exir/program/_program.py, _gen_edge_manager_for_partitioners: "has long
    standing issues"), which wraps every preserved node and decomposes the whole graph twice more:
    most of the 270M's `lower` stage. Without a check, ExecuTorch takes its direct path (pop the
    preserved ops from the decomposition table, decompose once): every node the checked path
    would have kept whole is kept the same way, so the program is the same -- `.pte` and `.ptd`
    byte-identical on the tiny int4, int8 and fp32 bundles and on the 270M (tests/test_export_executorch.py).
    The price: without the check, a preserved op that XNNPACK then refuses (a linear it cannot take)
    stays undecomposed and to_edge's sanity check raises; `_lower` then redoes the lowering the
    checked way. Only ops that have a decomposition are listed: the others (torchao's custom ops)
    are never decomposed either way, and the dequantize feeding the embedding lookup stays outside
    the delegate by design (ExecuTorch fuses it into its quantized embedding kernel).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    if checked:
        return XnnpackPartitioner()
    from executorch.exir.tracer import _default_decomposition_table

    class UncheckedXnnpackPartitioner(XnnpackPartitioner):
        def ops_to_not_decompose(self, ep):
            ops, _check = super().ops_to_not_decompose(ep)
            table = _default_decomposition_table()
            return [op for op in ops if op in table], None

    return UncheckedXnnpackPartitioner()


def _partitioners(backend: Backend, checked: bool = True) -> list:
    if backend.name == "xnnpack":
        return [_xnnpack_partitioner(checked)]
    if backend.name == "coreml":
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        c = COMPUTE["coreml"]
        specs = CoreMLBackend.generate_compile_specs(
            minimum_deployment_target=getattr(ct.target, c["minimum_deployment_target"]),
            compute_precision=ct.precision.FLOAT32,
            compute_unit=getattr(ct.ComputeUnit, c["compute_unit"]),
            model_type=CoreMLBackend.MODEL_TYPE.MODEL,
        )
        return [CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=c["take_over_mutable_buffer"])]
    if backend.name == "vulkan":
        from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner

        options = {k: COMPUTE["vulkan"][k] for k in ("require_dynamic_shapes", "force_fp16")}
        return [VulkanPartitioner(options)]
    raise ValueError(backend.name)


class UpdateCacheKVCache(KVCache):
    """The same cache, seq-major (B, S, Hkv, D) and written in place by `llama::update_cache`.

    For Vulkan. index_copy_ becomes index_put, which Vulkan lacks: the write would stay on the
    CPU, one delegate per layer, the whole cache copied in and out of the GPU at every step. A
    functional write (e.g. `where`) inside the delegate is no better: Vulkan does not write a
    functional result back into the buffer it owns (unless `alias_buffer_mutations`), so the
    cache would silently never advance. `update_cache` mutates the buffer itself, on the GPU;
    it is what ExecuTorch's own Vulkan LLM export uses (`-kv --use_sdpa_with_kv_cache`), and
    the stock Android runtime links its CPU kernel too. Attention reads the cache transposed.
    """

    @classmethod
    def swap_in(cls, cache: KVCache) -> tuple:
        kept = (cache.k, cache.v)
        cache.__class__ = cls
        for name, buf in zip(("k", "v"), kept, strict=True):
            b, h, seq, d = buf.shape
            cache.register_buffer(name, buf.new_zeros(b, seq, h, d), persistent=False)
        return kept

    @staticmethod
    def swap_out(cache: KVCache, kept: tuple) -> None:
        cache.__class__ = KVCache
        for name, buf in zip(("k", "v"), kept, strict=True):
            cache.register_buffer(name, buf, persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = pos[0].item()  # positions are consecutive: pos = start + arange(T)
        torch._check(start >= 0)
        torch._check(start + k.shape[2] <= self.k.shape[1])
        torch.ops.llama.update_cache(k.transpose(1, 2), self.k, start)
        torch.ops.llama.update_cache(v.transpose(1, 2), self.v, start)
        return self.k.transpose(1, 2), self.v.transpose(1, 2)


class SdpaKVCache(UpdateCacheKVCache):
    """The seq-major cache written by `llama::update_cache`, which also attends: `llama::custom_sdpa`.

    For XNNPACK (CPU). The plain attention (Attention.forward) multiplies the query by all max_seq_len
    cached positions and masks the unwritten ones: on the 270M int4, 4.1 ms of a 35 ms decode step and
    101 ms of a 128-token prefill's 511 ms went to those batched matmuls (ETDump, benchmarks/profile_pte.py).
    custom_sdpa (flash attention, grouped-query heads natively) reads the cache only up to start + T, causal
    from `start`: global layers only. A sliding-window layer needs a mask, which executorch 1.5.1's kernel
    takes only over the whole cache, and then it is slower than the plain attention (270M int4, decode at
    position ~130: 0.43 ms a layer, the global layers' causal calls 0.06-0.09 ms; docs/speed.md). It is
    ExecuTorch's own LLM export's attention, so the stock runners and apps link its kernels. Not for
    attention softcaps (Gemma 2): custom_sdpa has none.
    """

    fused = True

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, mask, scale: float
    ) -> torch.Tensor:
        """q (B, T, Hq, D), k, v (B, T, Hkv, D), token-major as the kernels take them -> (B, T, Hq, D),
        attending to cached positions < start + T."""
        start = pos[0].item()  # positions are consecutive: pos = start + arange(T)
        torch._check(start >= 0)
        torch._check(start + k.shape[1] <= self.k.shape[1])
        torch.ops.llama.update_cache(k, self.k, start)
        torch.ops.llama.update_cache(v, self.v, start)
        return torch.ops.llama.custom_sdpa(q, self.k, self.v, start, mask, 0.0, mask is None, scale)


KV_WRITE = {"vulkan": UpdateCacheKVCache, "xnnpack": SdpaKVCache}


def fused_attention(model: nn.Module, backend: Backend) -> bool:
    """Whether the export's global layers attend through their cache (SdpaKVCache): not with softcaps."""
    has_global = any(not b.local for b in model.layers)
    return KV_WRITE.get(backend.name) is SdpaKVCache and model.cfg.attn_softcap is None and has_global


@contextmanager
def kv_writes_for(model: nn.Module, backend: Backend) -> Iterator[str]:
    """Swap the caches' layout and write for the backend's while exporting; the model is restored."""
    cls = KV_WRITE.get(backend.name)
    if cls is SdpaKVCache and not fused_attention(model, backend):
        cls = None
    if cls is None:
        yield "index_copy_ (index_put) into (1, n_kv_heads, max_seq_len, head_dim) buffers"
        return
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama::update_cache, custom_sdpa)

    layers = [m for m in model.modules() if type(m) is KVCache]
    if cls is SdpaKVCache:  # the global layers' caches only (see SdpaKVCache)
        layers = [b.attn.cache for b in model.layers if not b.local and type(b.attn.cache) is KVCache]
    kept = {c: cls.swap_in(c) for c in layers}
    try:
        how = "llama::update_cache into (1, max_seq_len, n_kv_heads, head_dim) buffers"
        if cls is SdpaKVCache:
            how = (f"global layers: {how}, read by llama::custom_sdpa up to the current position; sliding-window"
                   " layers: index_copy_ into (1, n_kv_heads, max_seq_len, head_dim) buffers")  # fmt: skip
        yield how
    finally:
        for c, bufs in kept.items():
            cls.swap_out(c, bufs)


def _op_name(target) -> str:
    return target.name() if hasattr(target, "name") else getattr(target, "__name__", str(target))  # aten::mean.dim


def delegation_report(graph_module) -> dict:
    """Which operators run inside a delegate and which stay outside (portable / quantized kernels).

    Read on the program as serialized (after to_executorch): the KV write-backs (copy_) and the
    quantized embedding kernels only exist there.
    """
    outside: collections.Counter = collections.Counter()
    inside: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", "")
        if name == "executorch_call_delegate":
            lowered = getattr(graph_module, node.args[0].target)
            calls[lowered.backend_id] += 1
            for n in lowered.original_module.graph_module.graph.nodes:
                if n.op == "call_function" and getattr(n.target, "__name__", "") != "getitem":
                    inside[_op_name(n.target)] += 1
        elif name != "getitem" and "alloc" not in name:
            outside[_op_name(node.target)] += 1
    return {
        "delegate_calls": sum(calls.values()),
        "delegates": dict(calls),
        "ops_in_delegates": sum(inside.values()),
        "ops_outside_delegate": dict(sorted(outside.items())),
    }


def _external_weights(ep) -> None:
    """Tag every constant for the external weights file, the program's own and the delegates'.

    ExecuTorch merges both into one named-data store, which keeps each distinct byte string once
    (exir/_serialize/_serialize.py, serialize_for_executorch; _named_data_store.py dedups by sha256):
    the int8 lookup table and the head's identical int8 weights (Scheme.shared_table) are written
    once. Inside a .pte the two live in different stores (program constants vs the XNNPACK blob's
    named data) and would be written twice, so the weights go to model.ptd.
    """
    tag = WEIGHTS_FILE.removesuffix(".ptd")
    for node in ep.graph.nodes:
        if node.op == "placeholder":  # read by the XNNPACK serializer (node_visitor.py, delegate_constant_tag)
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag


def _backend_config(external_weights: bool = False):
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    return ExecutorchBackendConfig(
        extract_delegate_segments=True,
        # Required: fuses torchao's dequantize_affine + embedding into quantized_decomposed
        # embedding kernels (otherwise "Missing out variants: torchao::dequantize_affine").
        do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        # Non-delegated constants (the lookup table) to the same file as the delegates' (see _external_weights).
        external_constants=(lambda node: WEIGHTS_FILE.removesuffix(".ptd")) if external_weights else False,
        # The KV cache update (KVCache.update's index_copy_) is functionalized into index_put.out, which
        # copies the whole cache into a new buffer, then copy_ writes it back: per decode step the 270M
        # moved every layer's 1024-position K and V twice (perf: 19% of decode time in memmove). The
        # reinplace pass writes index_put in place into the mutable buffer (executorch
        # exir/passes/reinplace.py).
        run_reinplace_pass=True,
    )


def infer_symbolic_view_dims(gm: torch.fx.GraphModule):
    """Rewrite `view(x, [1, s0, 4, 256])` as `view(x, [1, -1, 4, 256])`: the same tensor, but lowerable.

    torch.export writes the token count into each reshape as a symbolic size, and XNNPACK's
    partitioner refuses any view with a symbolic size (ViewCopyConfig: "Symbolic reshape is not
    supported") while it takes one inferred (-1) dimension (op_view_copy.py serializes -1 as
    XNNPACK's dynamic 0). Every head split and merge then ran outside the delegate, cutting each
    layer into several delegate calls (each a partition to compile at export and a hand-off at run
    time). With exactly one symbolic size and the rest static, -1 names the same shape.
    """
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import PassResult

    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != exir_ops.edge.aten.view_copy.default:
            continue
        shape = list(node.args[1])
        symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        if len(symbolic) == 1 and -1 not in shape:
            shape[symbolic[0]] = -1
            node.args = (node.args[0], shape, *node.args[2:])
            changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, changed)


class _NodeBits(collections.abc.Set):
    """A set of graph nodes held as the bits of one int (bit i: the i-th node in graph order)."""

    def __init__(self, deps: CompactDependencies, bits: int) -> None:
        self._deps, self._bits = deps, bits

    def __contains__(self, node) -> bool:
        i = self._deps.index.get(node)
        return i is not None and (self._bits >> i) & 1 == 1

    def __len__(self) -> int:
        return self._bits.bit_count()

    @classmethod
    def _from_iterable(cls, it) -> set:  # what `a | b`, `a & b` and `a - b` build
        return set(it)

    def __iter__(self):
        import numpy as np

        raw = np.frombuffer(self._bits.to_bytes((self._bits.bit_length() + 7) // 8, "little"), np.uint8)
        nodes = self._deps.nodes
        return (nodes[i] for i in np.flatnonzero(np.unpackbits(raw, bitorder="little")))


class CompactDependencies:
    """torch.fx's and ExecuTorch's `_DependencyViewer` (node -> every node downstream / upstream of it), each
    transitive set held as the bits of one Python int.

    The originals (torch/fx/passes/infra/partitioner.py; executorch/exir/backend/canonical_partitioners/
    group_partitioner.py, which keeps upstreams too) store every node's transitive users as a Python set:
    O(N^2) entries for a graph of N nodes. XNNPACK's partitioner builds three such tables over the whole
    program (GroupBasedPartitioner.__init__ and its CapabilityBasedPartitioner base): on the 270M int4's
    ActResidual graph the process grew by 4.2 GB inside GroupBasedPartitioner (py-spy on `make test-full`,
    RSS 8.4 -> 12.6 GB), the export's peak; and quadratic in depth, so the 2B's 26 layers would need ~2x
    that. As bits: N^2 / 8 bytes. The partitioners only test membership and iterate, and every use reduces
    to a boolean or a set, so the order of iteration cannot change what they decide.
    """

    def __init__(self, graph_module) -> None:
        self.nodes = list(graph_module.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self._down: dict = {}
        for node in reversed(self.nodes):
            bits = 0
            for user in node.users:
                bits |= (1 << self.index[user]) | self._down.get(user, 0)
            self._down[node] = bits
        self._up: dict | None = None

    def downstreams_of(self, node) -> _NodeBits:
        return _NodeBits(self, self._down.get(node, 0))

    def upstreams_of(self, node) -> _NodeBits:
        if self._up is None:  # no partitioner reads it today: built only if one does
            self._up = {}
            for n in self.nodes:
                bits = 0
                for i in n.all_input_nodes:
                    bits |= (1 << self.index[i]) | self._up.get(i, 0)
                self._up[n] = bits
        return _NodeBits(self, self._up.get(node, 0))


@contextmanager
def compact_dependency_viewers() -> Iterator[None]:
    """Both `_DependencyViewer`s replaced by CompactDependencies while lowering; restored after."""
    import torch.fx.passes.infra.partitioner as fx_partitioner
    from executorch.exir.backend.canonical_partitioners import group_partitioner

    saved = fx_partitioner._DependencyViewer, group_partitioner._DependencyViewer
    fx_partitioner._DependencyViewer = group_partitioner._DependencyViewer = CompactDependencies
    try:
        yield
    finally:
        fx_partitioner._DependencyViewer, group_partitioner._DependencyViewer = saved


# XNNPACK passes that rewrite one kind of operator only, and that operator: a pass whose operator is not
# in the graph returns it unchanged, yet each retraces the whole program (ExportPass over fake tensors,
# ~6-8 s apiece on the 270M int4: py-spy on `edge export`, docs/export-cost.md).
_PASS_NEEDS = {
    "ConvertToUpsampleBilinear2d": ("upsample_bilinear2d",),
    "FuseBatchNormPass": ("batch_norm",),
    "DecomposeBatchNorm": ("batch_norm",),
    "Conv1dUnsqueezePass": ("convolution",),
    "PReLUReshapePass": ("prelu",),
}


@contextmanager
def xnnpack_passes_for_the_graph() -> Iterator[None]:
    """XnnpackBackend.preprocess runs every pass of XNNPACKPassManager's default list on each partition;
    while lowering, the passes whose operator the partition lacks are left out (the same program)."""
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    init = XNNPACKPassManager.__init__

    def only_needed(self, exported_program, passes=None) -> None:
        init(self, exported_program, passes)
        if passes:  # a list the caller chose is run as given
            return
        ops = {str(n.target) for n in exported_program.graph.nodes if n.op == "call_function"}
        needed = lambda p: any(k in op for k in _PASS_NEEDS.get(p.__name__, ("",)) for op in ops)  # noqa: E731
        self.passes = [p for p in self.passes if p.__name__ not in _PASS_NEEDS or needed(p)]

    XNNPACKPassManager.__init__ = only_needed
    try:
        yield
    finally:
        XNNPACKPassManager.__init__ = init


@contextmanager
def vulkan_linear_outputs_kept() -> Iterator[None]:
    """Vulkan's quantized-linear fusion (executorch 1.5.1, backends/vulkan/patterns/quantized_linear.py,
    QuantizedLinearMatch) takes a view_copy after the matmul into the match whether or not a quantize
    follows, and gives the fused op that view's shape while the op itself keeps its input's leading dims:
    a linear on 2-D rows whose result is viewed into heads then fails (or worse, broadcasts) downstream.
    The view is only needed before an output quantize: elsewhere the match ends at the matmul."""
    from executorch.backends.vulkan.patterns import quantized_linear as ql

    init = ql.QuantizedLinearMatch.__init__

    def kept(self, mm_node) -> None:
        init(self, mm_node)
        view = getattr(self, "output_view_copy_node", None)
        if view is not None and self.quantize_output_node is None:
            self.all_nodes.remove(view)
            self.output_view_copy_node, self.output_node = None, self.anchor_node

    ql.QuantizedLinearMatch.__init__ = kept
    try:
        yield
    finally:
        ql.QuantizedLinearMatch.__init__ = init


# The partitions a forked worker preprocesses: set before the fork, so the workers inherit them, not pickle them.
_PREPROCESS_JOBS: list = []


def _preprocess_job(i: int):
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the CLI's handler, which unwinds the export's cleanup
    torch.set_num_threads(1)  # one core per worker
    backend, program, specs = _PREPROCESS_JOBS[i]
    return backend.preprocess(program, specs)


@contextmanager
def xnnpack_preprocess_in_parallel(workers: int | None = None) -> Iterator[None]:
    """BackendDetails.preprocess_multimethod preprocesses XNNPACK's partitions one after another; each is its
    own program (a deep copy, exir/backend/backend_api.py) and its result only bytes: with more than one core
    free, forked workers take them in parallel. The same bytes, in the same order (tests/test_lowering_passes.py)."""
    import os

    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir.backend.backend_details import BackendDetails

    workers = workers or len(os.sched_getaffinity(0))
    serial = BackendDetails.preprocess_multimethod.__func__
    own = XnnpackBackend.__dict__.get("preprocess_multimethod")

    def parallel(cls, edge_programs, compile_specs):
        import multiprocessing

        jobs = [(m, k) for m, programs in edge_programs.items() for k in range(len(programs))]
        if workers < 2 or len(jobs) < 2:
            return serial(cls, edge_programs, compile_specs)
        _PREPROCESS_JOBS[:] = [(cls, edge_programs[m][k], compile_specs[m][k]) for m, k in jobs]
        pool = multiprocessing.get_context("fork").Pool(min(workers, len(jobs)))
        try:
            done = pool.map(_preprocess_job, range(len(jobs)), chunksize=1)  # in the jobs' order
            pool.close()
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
            _PREPROCESS_JOBS.clear()
        out = {m: [None] * len(programs) for m, programs in edge_programs.items()}
        for i, (m, k) in enumerate(jobs):
            out[m][k] = done[i]
        return out

    XnnpackBackend.preprocess_multimethod = classmethod(parallel)
    try:
        yield
    finally:
        if own is None:
            del XnnpackBackend.preprocess_multimethod
        else:
            XnnpackBackend.preprocess_multimethod = own


@contextmanager
def functionalized_once(ep) -> Iterator[None]:
    """to_edge_transform_and_lower starts with `program.run_decompositions({})` (exir/program/_program.py,
    _gen_edge_manager_for_partitioners: "Functionalize program before asking partitioners to preserve
    ops"); every program we lower has had exactly that call (trace, lower_module), and a second one
    retraces the whole graph for the same program: ~a fifth of a lowering (py-spy, docs/export-cost.md).
    While lowering, that call on `ep` itself returns it."""
    from torch.export import ExportedProgram

    run = ExportedProgram.run_decompositions

    def once(self, decomp_table=None, *args, **kwargs):
        # an empty dict exactly: ExecuTorch's CustomDecompTable (a dict subclass) compares equal to {} however full
        if self is ep and type(decomp_table) is dict and not decomp_table and not args and not kwargs:
            return self
        return run(self, decomp_table, *args, **kwargs)

    ExportedProgram.run_decompositions = once
    try:
        yield
    finally:
        ExportedProgram.run_decompositions = run


def _lower(ep, backend: Backend, meta: dict | None = None):
    import executorch.kernels.quantized  # noqa: F401  (out variants of quantized_decomposed::embedding_*)
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    def lower(checked: bool):
        with (
            compact_dependency_viewers(),
            xnnpack_passes_for_the_graph(),
            functionalized_once(ep),
            xnnpack_preprocess_in_parallel(),
        ):
            return to_edge_transform_and_lower(
                ep,
                transform_passes=[infer_symbolic_view_dims],
                partitioner=_partitioners(backend, checked),
                compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
                constant_methods=meta,
            )

    if backend.name == "vulkan":
        with vulkan_linear_outputs_kept():
            return lower(checked=True)
    if backend.name != "xnnpack":
        return lower(checked=True)
    try:
        return lower(checked=False)  # the direct path (see _xnnpack_partitioner)
    except RuntimeError as e:
        if "was not decomposed or delegated" not in str(e):
            raise
        return lower(checked=True)


def lower_module(module: nn.Module, example: tuple, backend: Backend) -> bytes:
    """Any module (one linear, one block) through the same lowering as the model: for op-level checks."""
    with torch.no_grad():
        ep = torch.export.export(module.eval(), example, strict=False).run_decompositions({})  # as trace()
    return _lower(ep, backend).to_executorch(_backend_config()).buffer


def trace(model: nn.Module, max_seq_len: int, backend: Backend, vocab: int):
    """torch.export of the runner's forward(tokens, input_pos) in the forms the backend takes.

    Returns the exported program (decomposed to core ATen) and how the KV cache is written."""
    from torch.export import Dim

    wrapper = RunnerContract(model, vocab).eval()
    dynamic = not backend.static_shapes
    tokens = torch.tensor([[2, 3, 4]] if dynamic else [[2]], dtype=torch.int64)
    example = (tokens, torch.tensor([0], dtype=torch.int64))
    # T <= max_seq_len - 1: the runner refuses prompts that fill the whole context.
    shapes = ({1: Dim("seq", min=1, max=max_seq_len - 1)}, None) if dynamic else None
    with torch.no_grad(), kv_writes_for(model, backend) as kv_write, linear_forms(), folded_norms(model):
        # Non-strict (Python runs the model, no dynamo): the same program as strict (the 270M's logits bitwise
        # equal), traced faster on small models (docs/export-cost.md).
        ep = torch.export.export(wrapper, example, dynamic_shapes=shapes, strict=False)
        # index_copy_ (the cache write) has no ExecuTorch kernel: decompose it to index_put.
        return ep.run_decompositions({}), kv_write


def export(
    model: nn.Module, max_seq_len: int, backend: Backend, meta: dict, stages, external_weights: bool = False
) -> Lowered:
    """torch.export -> to_edge_transform_and_lower -> to_executorch; each step a timed stage.

    external_weights: every constant goes to model.ptd (each distinct tensor once) and the .pte
    holds the program only; the stock runners take the .ptd as their data path.
    """
    meta = {**meta, "use_sdpa_with_kv_cache": fused_attention(model, backend)}
    dynamic = not backend.static_shapes
    with stages.run("export", "torch.export of forward(tokens, input_pos)"):
        ep, kv_write = trace(model, max_seq_len, backend, meta["get_vocab_size"])
        if external_weights:
            _external_weights(ep)
    with stages.run("lower", f"to_edge + {backend.name} partitioner"):
        edge = _lower(ep, backend, meta)
        del ep
    with stages.run("serialize", "to_executorch + memory planning"):
        et = edge.to_executorch(_backend_config(external_weights))
        program = et.buffer
        # File names as ExecutorchProgramManager.write_tensor_data_to_file makes them (tag + ".ptd").
        files = {t if t.endswith(".ptd") else f"{t}.ptd": bytes(c) for t, c in (et._tensor_data or {}).items()}
        report = delegation_report(et.exported_program().graph_module)
        report["compute"] = COMPUTE[backend.name]
        del et, edge
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
        "kv_cache": f"inside the program, fp32, zero at load; written by {kv_write}",
        "compute": COMPUTE[backend.name],
        "logits_padded_to": meta["get_vocab_size"],
    }
    if files:
        io["weights_file"] = {
            "file": WEIGHTS_FILE,
            "format": "ExecuTorch FlatTensor (.ptd): every constant of the program, each distinct tensor once",
            "load": "pass it as the data path: TextLLMRunner(model, tokenizer, data_path), Android"
            " LlmModule(..., dataPath), Runtime.load_program(pte, data_path=...)",
        }
    return Lowered(program, io, report, files)
