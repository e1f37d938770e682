"""Which of a .tflite's operators LiteRT's GPU delegates take: a static check, no TensorFlow.

No tool checks this without TensorFlow (tflite's `gpu_compatibility` is C++ inside the converter),
so the delegates' own acceptance rules are encoded here as data, read from the source:
google-ai-edge/LiteRT at f67457790c9c2ab67347d6fe53270e8d3df20868:

- `tflite/tools/versioning/gpu_compatibility.cc` (CheckGpuDelegateCompatibility, the switch at
  lines 534-1275): which builtin ops either delegate may take, and their input rules;
- ML Drift, the delegate behind LiteRT's GPU accelerator (CompiledModel, what LiteRT-LM uses):
  `ml_drift_delegate/tflite/model_builder.cc` (NewOperationParser, 6766-7115);
- the classic GPU delegate (`TfLiteGpuDelegateV2Create`, Java `GpuDelegate`):
  `tflite/delegates/gpu/common/model_builder.cc` (NewOperationParser, 3080-3286).

An op is delegated when the compatibility switch and that delegate's parser both accept it. Checked
here: the op is parsed by the delegate, its version is within the parser's maximum, and no tensor it
reads or writes has rank > 4 (both delegates refuse rank > 4: classic model_builder.cc:3062, drift
6743). Not checked (the report says so): per-op input rules (constant vs runtime inputs, broadcast
shapes), the classic delegate's runtime dtypes, and rules that only fail while parsing (the classic
delegate converts constant weights to fp32 at build time and has no int4 case: a 4-bit
FULLY_CONNECTED passes its support check and then fails; reported as a finding below).

Precision, which matters more than coverage for Gemma: Gemma 3's residual stream exceeds fp16's
range (|x| ~1e5 in the 270M), and both delegates compute in fp16 by default where they can (ML
Drift: F16 when the device supports it, ml_drift_delegate_create.cc 32-44; the Java GpuDelegate:
precisionLossAllowed = true, gpu_delegate_jni.cc 126-131). The app must ask for fp32 (ML Drift:
precision FP32; classic: inference priority MAX_PRECISION, is_precision_loss_allowed = 0).
"""

from __future__ import annotations

from collections import Counter

ANY = 1 << 30  # no version check in that parser
DRIFT = "ml_drift"  # LiteRT's GPU accelerator (CompiledModel API, LiteRT-LM)
CLASSIC = "classic"  # TfLiteGpuDelegateV2 / org.tensorflow.lite.gpu.GpuDelegate
DELEGATES = {
    DRIFT: "LiteRT GPU accelerator (ML Drift; CompiledModel, LiteRT-LM)",
    CLASSIC: "classic TFLite GPU delegate (TfLiteGpuDelegateV2, Java GpuDelegate)",
}

# builtin op -> (classic parser's max version or None if it has no parser, drift's likewise).
# From the files above; ops whose compatibility rule and parsers disagree take the stricter.
GPU_OPS: dict[str, tuple[int | None, int | None]] = {
    "ABS": (2, 5), "ADD": (2, 6), "ADD_N": (2, 6), "ATAN2": (None, 2), "AVERAGE_POOL_2D": (2, 2),
    "BATCH_MATMUL": (ANY, ANY), "BITCAST": (None, ANY), "CAST": (ANY, ANY), "CEIL": (None, 2),
    "CONCATENATION": (2, 6), "CONV_2D": (6, 6), "COS": (2, 2), "CUMSUM": (1, 1), "DENSIFY": (1, None),
    "DEPTHWISE_CONV_2D": (6, 6), "DEPTH_TO_SPACE": (ANY, ANY), "DEQUANTIZE": (3, 3), "DIV": (2, 2),
    "DYNAMIC_UPDATE_SLICE": (None, ANY), "ELU": (2, 2), "EMBEDDING_LOOKUP": (None, ANY), "EQUAL": (2, 2),
    "EXP": (2, 2), "FLOOR": (2, 2), "FLOOR_DIV": (2, 3), "FLOOR_MOD": (2, 2), "FULLY_CONNECTED": (9, 14),
    "GATHER": (1, ANY), "GELU": (2, 3), "GREATER": (2, 2), "GREATER_EQUAL": (2, 2), "HARD_SWISH": (ANY, ANY),
    "LEAKY_RELU": (2, 2), "LESS": (2, 2), "LESS_EQUAL": (2, 2), "LOG": (2, 2), "LOGICAL_AND": (2, 2),
    "LOGICAL_NOT": (None, 2), "LOGICAL_OR": (None, 2), "LOGISTIC": (2, 2), "LSTM": (4, 4),
    "MAXIMUM": (2, 4), "MAX_POOL_2D": (2, 2), "MEAN": (ANY, ANY), "MINIMUM": (2, 4), "MIRROR_PAD": (2, 5),
    "MUL": (3, 8), "NEG": (2, 2), "NOT_EQUAL": (2, 2), "ONE_HOT": (1, 1), "PACK": (ANY, ANY), "PAD": (2, 5),
    "PADV2": (2, 5), "POW": (2, 2), "PRELU": (1, 1), "QUANTIZE": (2, 2), "REDUCE_ALL": (None, ANY),
    "REDUCE_ANY": (None, ANY), "REDUCE_MAX": (ANY, ANY), "REDUCE_MIN": (ANY, ANY), "REDUCE_PROD": (ANY, ANY),
    "RELU": (2, 2), "RELU6": (2, 2), "RELU_0_TO_1": (2, 2), "RELU_N1_TO_1": (2, 2), "RESHAPE": (1, 1),
    "RESIZE_BILINEAR": (3, 3), "RESIZE_NEAREST_NEIGHBOR": (3, 3), "REVERSE_V2": (None, ANY),
    "RIGHT_SHIFT": (None, 2), "ROUND": (None, 2), "RSQRT": (2, 2), "SELECT": (1, 1), "SELECT_V2": (1, 1),
    "SIGN": (2, 2), "SIN": (2, 2), "SLICE": (2, 8), "SOFTMAX": (2, 4), "SPACE_TO_DEPTH": (2, 2),
    "SPLIT": (ANY, ANY), "SPLIT_V": (ANY, ANY), "SQRT": (2, 2), "SQUARE": (2, 2), "SQUARED_DIFFERENCE": (2, 2),
    "STRIDED_SLICE": (4, 2), "SUB": (2, 2), "SUM": (ANY, ANY), "TANH": (2, 2), "TILE": (ANY, ANY),
    "TOPK_V2": (None, 1), "TRANSPOSE": (4, 9), "TRANSPOSE_CONV": (3, 3), "UNPACK": (ANY, ANY),
    "ARG_MAX": (None, ANY), "STABLEHLO_BROADCAST_IN_DIM": (None, ANY), "STABLEHLO_CLAMP": (None, ANY),
    "STABLEHLO_CBRT": (None, ANY), "STABLEHLO_COMPOSITE": (None, ANY),
}  # fmt: skip
MAX_RANK = 4


def _ops(tflite: bytes):
    """(signature, op name, version, max tensor rank, weight dtype of a FULLY_CONNECTED) per operator."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    dtypes = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    m = schema.Model.GetRootAs(tflite, 0)
    sig_of = {m.SignatureDefs(i).SubgraphIndex(): m.SignatureDefs(i).SignatureKey().decode()
              for i in range(m.SignatureDefsLength())}  # fmt: skip
    for g in range(m.SubgraphsLength()):
        sg = m.Subgraphs(g)
        for i in range(sg.OperatorsLength()):
            op = sg.Operators(i)
            code = m.OperatorCodes(op.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            name = names.get(builtin, str(builtin))
            if name == "CUSTOM":
                name = f"CUSTOM:{code.CustomCode().decode()}"
            tensors = [op.Inputs(j) for j in range(op.InputsLength())]
            tensors += [op.Outputs(j) for j in range(op.OutputsLength())]
            rank = max((sg.Tensors(t).ShapeLength() for t in tensors if t >= 0), default=0)
            weight = None
            if name == "FULLY_CONNECTED" and op.InputsLength() > 1 and op.Inputs(1) >= 0:
                weight = dtypes.get(sg.Tensors(op.Inputs(1)).Type())
            yield sig_of.get(g, f"subgraph_{g}"), name, code.Version(), rank, weight


def check(tflite: bytes) -> dict:
    """Per delegate: how many operators it takes, and each refused op with its count and reason."""
    ops = list(_ops(tflite))
    report = {
        "source": "google-ai-edge/LiteRT f67457790c9c: tflite/tools/versioning/gpu_compatibility.cc, "
        "ml_drift_delegate/tflite/model_builder.cc, tflite/delegates/gpu/common/model_builder.cc "
        "(edge/targets/gpu_ops.py)",
        "checked": "op parsed by the delegate, version within its parser's maximum, tensor ranks <= 4",
        "not_checked": "per-op input rules (constant / runtime inputs, broadcast shapes, the classic delegate's "
        "consumer rule for comparisons), runtime dtypes",
        "ops": dict(Counter(name for _, name, *_ in ops).most_common()),
        "precision": "run in fp32 (ML Drift: precision FP32; classic: MAX_PRECISION, no precision loss): "
        "Gemma's activations exceed fp16's range, and both delegates default to fp16",
    }
    for d, idx in ((DRIFT, 1), (CLASSIC, 0)):
        refused: Counter = Counter()
        for _sig, name, version, rank, weight in ops:
            limit = GPU_OPS.get(name, (None, None))[idx]
            if limit is None:
                refused[(name, "no parser for this op")] += 1
            elif version > limit:
                refused[(name, f"version {version} > {limit}")] += 1
            elif rank > MAX_RANK:
                refused[(name, f"a tensor of rank {rank} > {MAX_RANK}")] += 1
            elif d == CLASSIC and weight == "INT4":
                refused[(name, "int4 weights: its parser converts constant weights to fp32 and has no int4 case")] += 1
        n_refused = sum(refused.values())
        report[d] = {
            "delegate": DELEGATES[d],
            "operators": len(ops),
            "supported": len(ops) - n_refused,
            "refused": [{"op": op, "count": n, "why": why} for (op, why), n in refused.most_common()],
        }
    return report
