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

import functools

import numpy as np

from edge.targets.onnx_quant import IntWeight, _key

_TABLE: dict[str, IntWeight] = {}  # the weights of the current quantize() call, by _key(float weight)
_registered = False


def _exact_params(op_info, cfg, content=None, qsv=None):
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import dequantized_weight_recovery as dwr
    from ai_edge_quantizer.algorithms.utils import common_utils

    if content is None:  # activations: computed at run time (dynamic) or left float
        return dwr.get_tensor_quant_params(op_info, cfg, content, qsv)
    iw = _TABLE.get(_key(content))
    if iw is None:
        raise NotImplementedError(
            f"a {op_info.op_name} weight {tuple(content.shape)} is not one of the scheme's integer weights (the scheme"
            " left it in fp32, e.g. its width is not a multiple of the group): mixed float / integer layers are not"
            " in the LiteRT recipe yet"
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
            materialize_func=functools.partial(materialize, _exact_params),
        )
    _registered = True


def _grouping(w: IntWeight) -> int | None:
    """The recipe's block for a weight, None for per-channel: one group spanning the row is per-channel
    for int8, and for int4 a single block when the width is a block size the recipe knows."""
    width = w.q.shape[1]
    if w.group == width and (w.bits == 8 or width not in (32, 64, 128, 256)):
        return None
    return w.group


def _op_config(weights: list[IntWeight], dynamic: bool):
    """One recipe entry for all weights of an op kind: they must share bits and grouping."""
    from ai_edge_quantizer import qtyping

    kinds = {(w.bits, _grouping(w)) for w in weights}
    if len(kinds) != 1:
        raise NotImplementedError(f"mixed precisions in one op kind ({sorted(kinds, key=str)}): not in one recipe yet")
    bits, group = kinds.pop()
    if group and bits != 4:
        raise NotImplementedError(f"int{bits} in groups of {group}: TFLite holds blockwise int4 only")
    if group and not dynamic:
        raise NotImplementedError("blockwise weights need dynamic int8 activations in TFLite (no weight-only form)")
    gran = qtyping.QuantGranularity(f"BLOCKWISE_{group}" if group else "CHANNELWISE")
    return qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=bits, symmetric=True, granularity=gran),
        compute_precision=qtyping.ComputePrecision.INTEGER if dynamic else qtyping.ComputePrecision.FLOAT,
        explicit_dequantize=not dynamic,
    )


def quantize(fp32_tflite: bytes, linears: list[IntWeight], tables: list[IntWeight], dynamic: bool) -> bytes:
    """The float .tflite with every FULLY_CONNECTED / EMBEDDING_LOOKUP weight replaced by our integers."""
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    _register()
    _TABLE.clear()
    _TABLE.update({_key(w.q.astype(np.float32) * np.repeat(w.scale, w.group, axis=1)): w for w in linears + tables})
    rm = recipe_manager.RecipeManager()
    algo = AlgorithmName.DEQUANTIZED_WEIGHT_RECOVERY
    if linears:
        rm.add_quantization_config(".*", qtyping.TFLOperationName.FULLY_CONNECTED, _op_config(linears, dynamic), algo)
    if tables:
        # a lookup reads the table as integers ("INTEGER"); no activation is quantized
        rm.add_quantization_config(".*", qtyping.TFLOperationName.EMBEDDING_LOOKUP, _op_config(tables, True), algo)
    try:
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
    return bytes(quantizer.Quantizer(fp32_tflite, rm.get_quantization_recipe()).quantize().quantized_model)
