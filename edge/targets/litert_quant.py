"""Our scheme's integer weights written into the .tflite unchanged, through ai-edge-quantizer, without TensorFlow.

litert-torch's TensorFlow-free converter cannot lower torchao's quantized tensors (they stay as
STABLEHLO_CUSTOM_CALL ops, which the runtime refuses; its converter v2 that lowers them needs
TensorFlow). ai-edge-quantizer (a litert-torch dependency) quantizes a float .tflite, but by its own
rounding, and has no "pre-quantized" option. So: the model is converted in float with weights equal
to the scheme's dequantized ones (onnx_quant.dequantized), and ai-edge-quantizer is given an
algorithm, registered through its public registry (algorithm_manager.register_quantized_op) under
the DEQUANTIZED_WEIGHT_RECOVERY key (the recipe only accepts its enum's names), whose quant params
are looked up, by the float weight's bytes, in the table of our (q, scale): nothing is re-rounded.

What TFLite holds: FULLY_CONNECTED with int4 blockwise weights and dynamic int8 activations (per
token, asymmetric, as torchao computes them), or int8 per-channel; EMBEDDING_LOOKUP with int4
blockwise or int8 per-row tables. Not: int8 blockwise (our int8 scheme's g32 table and g64 / g128
slices), int4 blockwise weight-only. Blockwise scales are stored as fp16: the scheme's are bf16
already (apply._bf16_group_scales), so they pass exactly.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

from edge.targets.onnx_quant import IntWeight, _key

# The weights of the current quantize() call: {_key(float weight): {"linear" | "embedding": IntWeight}}. One
# float table can be both a head and a lookup (Scheme.shared_table): each op takes its own kind's weight.
_TABLE: dict[str, dict[str, IntWeight]] = {}


def _weight(op_info, content: np.ndarray) -> IntWeight | None:
    """The scheme's integer weight whose dequantized floats are `content`, as the op's kind uses it."""
    from ai_edge_quantizer import qtyping

    by_kind = _TABLE.get(_key(content), {})
    kind = "embedding" if op_info.op_name == qtyping.TFLOperationName.EMBEDDING_LOOKUP else "linear"
    return by_kind.get(kind) or next(iter(by_kind.values()), None)


_registered = False


def _exact_params(op_info, cfg, content=None, qsv=None):
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import dequantized_weight_recovery as dwr
    from ai_edge_quantizer.algorithms.utils import common_utils

    if content is None:  # activations: computed at run time (dynamic) or left float
        return dwr.get_tensor_quant_params(op_info, cfg, content, qsv)
    iw = _weight(op_info, content)
    if iw is None:
        raise NotImplementedError(
            f"a {op_info.op_name} weight {tuple(content.shape)} ({content.dtype}) is not one of the scheme's integer"
            " weights: _per_weight leaves fp32 constants float, so this one reached the quantizer in another dtype"
        )
    dim = common_utils.get_weight_quantized_dim(op_info, content, cfg.granularity)
    if cfg.granularity != qtyping.QuantGranularity.CHANNELWISE:
        block = int(cfg.granularity.value.split("_")[1])
        if block != _grouping(iw):
            raise NotImplementedError(f"{iw.name}: group {iw.group} in a recipe of blocks of {block}")
        scale = iw.scale.reshape(common_utils.get_blockwise_shape(content.shape, dim, block))
    else:
        if iw.group != content.shape[1] or dim != 0:
            raise NotImplementedError(f"{iw.name}: a grouped weight in a per-channel recipe")
        block, scale = 0, iw.scale.reshape(-1, 1)
    return qtyping.UniformQuantParams(
        num_bits=cfg.num_bits,
        quantized_dimension=dim,
        scale=scale.astype(np.float32),
        zero_point=np.zeros(scale.shape, np.int32),
        symmetric=True,
        block_size=block,
        quantized_data=iw.q,  # as is: torchao's int8 may hold -128, which the quantizer's own rounding clamps
    )


def _register() -> None:
    global _registered
    if _registered:
        return
    from ai_edge_quantizer import algorithm_manager, qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.algorithms.uniform_quantize import common_quantize
    from ai_edge_quantizer.algorithms.uniform_quantize import dequantized_weight_recovery as dwr

    for op, materialize in (
        (qtyping.TFLOperationName.FULLY_CONNECTED, common_quantize.materialize_fc_conv),
        (qtyping.TFLOperationName.EMBEDDING_LOOKUP, common_quantize.materialize_embedding_lookup),
    ):
        algorithm_manager.register_quantized_op(
            algorithm_key=AlgorithmName.DEQUANTIZED_WEIGHT_RECOVERY,
            tfl_op_name=op,
            init_qsv_func=dwr.init_qsvs,
            calibration_func=dwr.calibrate,
            materialize_func=functools.partial(_per_weight, materialize),
        )
    _registered = True


def _per_weight(materialize, op_info, graph_info, *args, **kwargs):
    """Materialize an op with its own weight's config, so one model mixes precisions.

    A recipe entry matches ops by a regex on their output tensors' names (recipe_manager.py), which
    litert-torch derives from class-qualified module paths, fused ops joining several, and which a
    signature's output loses altogether. So the recipe's one ".*" entry per op kind only selects this
    algorithm, and the config comes from the weight itself, looked up by its bytes like its integers:
    bits, grouping, and dynamic activations or a DEQUANTIZE (the transformation is chosen from the op
    config's compute_precision / explicit_dequantize, not from the params, so the whole config is
    swapped). A swapped config skips the recipe's policy check: checked here instead."""
    import dataclasses

    from ai_edge_quantizer import algorithm_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    tensor = graph_info.subgraph_tensors[op_info.op.inputs[1]]  # the FC weight / the lookup's table
    data = tfl_flatbuffer_utils.get_tensor_data(tensor, graph_info.buffers)
    if data is not None and data.dtype == np.float32:
        iw = _weight(op_info, data)
        if iw is None:  # a constant the scheme kept in fp32 (quant.coverage says why): the op stays float
            return _no_quantize(op_info, graph_info)
        cfg = _op_config(iw)
        algorithm_manager.check_op_quantization_config(AlgorithmName.DEQUANTIZED_WEIGHT_RECOVERY, op_info.op_name, cfg)
        op_info = dataclasses.replace(op_info, op_quant_config=cfg)
    return materialize(_exact_params, op_info, graph_info, *args, **kwargs)


def _no_quantize(op_info, graph_info) -> list:
    """The op's tensors as they are (ai-edge-quantizer's ParamsGenerator._get_params_for_no_quant_op)."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    keep = qtyping.OpToTensorParams(
        subgraph_op_id=op_info.subgraph_op_index, transformations=[qtyping.QuantTransformation.NO_QUANTIZE]
    )
    name = lambda i: tfl_flatbuffer_utils.get_tensor_name(graph_info.subgraph_tensors[i])  # noqa: E731
    ins = [
        qtyping.TensorTransformationParams(tensor_name=name(i), consumers=[keep]) for i in op_info.op.inputs if i != -1
    ]
    outs = [
        qtyping.TensorTransformationParams(tensor_name=name(i), producer=keep) for i in op_info.op.outputs if i != -1
    ]
    return ins + outs


def _grouping(w: IntWeight) -> int | None:
    """The recipe's block for a weight, None for per-channel: one group spanning the row is per-channel
    for int8, and for int4 a single block when the width is a block size the recipe knows."""
    width = w.q.shape[1]
    if w.group == width and (w.bits == 8 or width not in (32, 64, 128, 256)):
        return None
    return w.group


def _op_config(w: IntWeight):
    """The quantizer's op config that stores `w` as it is: its bits, its grouping, and dynamic int8
    activations (INTEGER compute) or, weight-only, a DEQUANTIZE before a float op. A lookup reads its
    table as integers ("INTEGER"); no activation is quantized there."""
    from ai_edge_quantizer import qtyping

    bits, group = w.bits, _grouping(w)
    dynamic = w.dynamic or w.kind == "embedding"
    if group and bits != 4:
        raise NotImplementedError(f"{w.name}: int{bits} in groups of {group}: TFLite holds blockwise int4 only")
    if group and not dynamic:
        raise NotImplementedError(
            f"{w.name}: blockwise weights need dynamic int8 activations in TFLite (no weight-only form)"
        )
    gran = qtyping.QuantGranularity(f"BLOCKWISE_{group}" if group else "CHANNELWISE")
    return qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=bits, symmetric=True, granularity=gran),
        compute_precision=qtyping.ComputePrecision.INTEGER if dynamic else qtyping.ComputePrecision.FLOAT,
        explicit_dequantize=not dynamic,
    )


def _quant_key(qp) -> tuple | None:
    """The content of a QuantizationParametersT, or None when it holds details we do not compare."""
    arrays = tuple(
        None if a is None else np.asarray(a, dt).tobytes()
        for a, dt in ((qp.min, np.float32), (qp.max, np.float32), (qp.scale, np.float32), (qp.zeroPoint, np.int64))
    )
    d = qp.details
    if d is not None and not all(hasattr(d, f) for f in ("scales", "zeroPoints", "blockSize")):
        return None
    shape = None if getattr(d, "blockShape", None) is None else tuple(d.blockShape)
    details = None if d is None else (type(d).__name__, d.scales, d.zeroPoints, d.blockSize, shape)
    return (*arrays, qp.detailsType, details, qp.quantizedDimension)


@contextlib.contextmanager
def shared_tables():
    """Serialize every identical quantization-parameters table once.

    Each signature is a subgraph with its own tensor list, so a weight's per-channel scales and int64
    zero points (12 bytes per output channel: 3.1 MB for the 270M's 262k-row table) were written once
    per signature, although its buffer is shared: the 270M's four-signature int4 .tflite went from
    275.1 to 262.2 MB. (Its tensor names are unique per signature: sharing strings would save nothing.)
    A flatbuffer may point to one table from many places (a DAG; the verifier checks bounds, not
    uniqueness), so packing equal content once changes no value the interpreter reads.
    ai-edge-quantizer packs the model through the generated object API
    (flatbuffer_utils.convert_object_to_bytearray): while this is active, QuantizationParametersT.Pack
    returns the offset of an equal earlier table in the same builder (builders are held, so their ids
    are not reused while this runs).
    """
    from ai_edge_litert import schema_py_generated as fb

    pack = fb.QuantizationParametersT.Pack
    memo: dict[int, tuple] = {}  # id(builder) -> (builder, {content: offset})

    def pack_once(self, builder):
        key = _quant_key(self)
        if key is None:
            return pack(self, builder)
        _, cache = memo.setdefault(id(builder), (builder, {}))
        if key not in cache:
            cache[key] = pack(self, builder)
        return cache[key]

    fb.QuantizationParametersT.Pack = pack_once
    try:
        yield
    finally:
        fb.QuantizationParametersT.Pack = pack
        memo.clear()


def quantize(fp32_tflite: bytes, weights: list[IntWeight]) -> bytes:
    """The float .tflite with every FULLY_CONNECTED / EMBEDDING_LOOKUP weight replaced by our integers,
    each with its own bits, grouping and activations (_per_weight): one model may mix them."""
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    for w in weights:
        _op_config(w)  # every weight's form is checked before the quantizer's work
    _register()
    _TABLE.clear()
    for w in weights:
        _TABLE.setdefault(_key(w.q.astype(np.float32) * np.repeat(w.scale, w.group, axis=1)), {})[w.kind] = w
    # One ".*" entry per op kind selects the algorithm; its config (int8 per channel, dynamic: valid for
    # both kinds) is replaced by each weight's own in _per_weight, and an op on no weight of ours stays float.
    rm = recipe_manager.RecipeManager()
    base = qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(
            num_bits=8, symmetric=True, granularity=qtyping.QuantGranularity.CHANNELWISE
        ),
        compute_precision=qtyping.ComputePrecision.INTEGER,
        explicit_dequantize=False,
    )
    for op in (qtyping.TFLOperationName.FULLY_CONNECTED, qtyping.TFLOperationName.EMBEDDING_LOOKUP):
        rm.add_quantization_config(".*", op, base, AlgorithmName.DEQUANTIZED_WEIGHT_RECOVERY)
    try:
        with shared_tables():
            return bytes(quantizer.Quantizer(fp32_tflite, rm.get_quantization_recipe()).quantize().quantized_model)
    finally:
        _TABLE.clear()


def float16(fp32_tflite: bytes) -> bytes:
    """Every FULLY_CONNECTED and EMBEDDING_LOOKUP weight stored as fp16 behind a DEQUANTIZE (ai-edge-quantizer's
    FLOAT_CASTING): exact when the weights already hold fp16 values (scheme `fp16`, quantize_model)."""
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    cfg = qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
        compute_precision=qtyping.ComputePrecision.FLOAT,
        explicit_dequantize=True,
    )
    rm = recipe_manager.RecipeManager()
    for op in (qtyping.TFLOperationName.FULLY_CONNECTED, qtyping.TFLOperationName.EMBEDDING_LOOKUP):
        rm.add_quantization_config(".*", op, cfg, AlgorithmName.FLOAT_CASTING)
    with shared_tables():
        return bytes(quantizer.Quantizer(fp32_tflite, rm.get_quantization_recipe()).quantize().quantized_model)
