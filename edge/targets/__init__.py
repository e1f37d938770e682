"""Targets and backends are tables. A new backend is one registration here plus its module.

A target (android, ios, rpi, linux) is a preset: a default backend and scheme, and the
backends that make sense there. A backend names its module, the package it needs (imported
lazily, with an install hint), whether its artifact runs on this host, and what it supports.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field, replace

from edge.errors import EdgeError


@dataclass
class Lowered:
    """What every backend's export returns: the artifact's bytes, its io contract, the delegation report."""

    program: bytes
    io: dict
    delegation: dict = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # further files of the artifact (model.ptd)


@dataclass(frozen=True)
class Backend:
    name: str
    family: str  # executorch | litert | onnx
    module: str  # edge.targets.<module> implements lower(...)
    artifact: str  # file name in the bundle
    package: str  # import name that must be present
    install: str  # what to run when it is missing
    runs_here: bool  # can this host execute the artifact (validation, generate --bundle)?
    schemes: tuple[str, ...]  # schemes it lowers correctly
    static_shapes: bool = False  # exported with a fixed [1, 1] token input (prefill token by token)
    note: str = ""
    runtime: str | None = None  # import name that runs the artifact, when not `package` (a device has no converter)
    default_quant: str | None = None  # when the target's default is not among `schemes` (else schemes[0])

    def available(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def runnable(self) -> bool:
        """Can this host execute the artifact: the backend runs here and its runtime is installed."""
        return self.runs_here and importlib.util.find_spec(self.runtime or self.package) is not None

    def require(self) -> None:
        if not self.available():
            raise EdgeError(f"backend {self.name} needs the Python package {self.package!r}", hint=self.install)

    def impl(self):
        return importlib.import_module(f"edge.targets.{self.module}")


_ET = "pip install 'gemma-edge[executorch]'"
_LITERT = "pip install 'gemma-edge[litert]'"
_XNNPACK = ("fp32", "int8", "int4", "int4-2pass", "int4-hqq", "int4-g128", "rtn-int8", "rtn-int4")

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("xnnpack", "executorch", "executorch", "model.pte", "executorch", _ET, True, _XNNPACK),
        Backend(
            "coreml",
            "executorch",
            "executorch",
            "model.pte",
            "coremltools",
            _ET,
            False,
            ("fp32",),
            static_shapes=True,
            note="iOS 18 specs, static shapes; runs only on Apple devices",
        ),
        Backend(
            "vulkan",
            "executorch",
            "executorch",
            "model.pte",
            "executorch",
            _ET,
            False,
            ("fp32",),
            static_shapes=True,
            note="Android GPUs; the Python runtime here has no Vulkan backend",
        ),
        Backend(
            "litert",
            "litert",
            "litert",
            "model.tflite",
            "litert_torch",
            _LITERT,
            True,
            ("fp32", "fp16", "int8", "int4-hqq", "int4-g128", "int4"),
            note="prefill_<N> / decode signatures, KV cache in and out; runs with numpy + ai-edge-litert",
            runtime="ai_edge_litert",
            # Each FULLY_CONNECTED / EMBEDDING_LOOKUP gets its own weight's format (litert_quant._per_weight),
            # so the mixed int4 lowers too. The 270M's LiteRT int4 passes int4's band (0.0111 / 94.29%, the
            # .tflite equal to eager); the all-4-bit int4-hqq it replaces as default reads 0.237 / 71.9%.
            default_quant="int4",
        ),
        Backend(
            "onnx",
            "onnx",
            "onnx",
            "model.onnx",
            "onnxscript",
            "pip install 'gemma-edge[onnx]'",
            True,
            ("fp32", "int8", "int4", "int4-hqq", "int4-g128", "int8-wo", "int4-wo"),
            note="one graph for prefill and decode, KV cache in and out; runs with numpy + onnxruntime",
            runtime="onnxruntime",
            # The scheme's integers in 4-bit MatMulNBits (int8 as two planes, fp32 compute; the int8 head on the
            # int8 kernel) and its dynamic int8 activations as eager rounds them, in float ops in front of it
            # (onnx_quant.dequantized(fake_quant=True)).
        ),
    )
}
# The same litert program, for LiteRT's GPU accelerator: the manifest's delegation.gpu lists the operators
# each GPU delegate refuses (edge/targets/gpu_ops.py). Default fp16 weights (half of fp32's bytes): both GPU
# delegates read fp16 constants behind a DEQUANTIZE directly (tflite/delegates/utils.cc,
# FP16GraphPartitionHelper). ML Drift also takes 4-bit blockwise weights, the classic delegate does not.
BACKENDS["litert-gpu"] = replace(
    BACKENDS["litert"],
    name="litert-gpu",
    note="the litert program for LiteRT's GPU accelerator: the manifest's delegation.gpu lists the operators "
    "each GPU delegate refuses (edge/targets/gpu_ops.py); run it in fp32 precision. Here it runs on LiteRT's "
    "CPU (no GPU on this host): the same program, validated the same way",
    default_quant="fp16",
    # Not the mixed int4 (LiteRT CPU): its program is not checked against the GPU delegates' rules yet, and
    # android's default int4 would displace fp16 as this backend's default.
    schemes=("fp32", "fp16", "int4-hqq", "int4-g128"),
)


@dataclass(frozen=True)
class Target:
    name: str
    default_backend: str
    default_quant: str
    backends: tuple[str, ...]  # valid here (every one is in BACKENDS: tests/test_bundle.py checks)
    description: str


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        # int4-2pass, not int4: the same integers, the head reads half its bytes a token (docs/speed.md)
        Target("android", "xnnpack", "int4-2pass", ("xnnpack", "vulkan", "litert", "litert-gpu"), "Android phones"),
        Target("ios", "xnnpack", "int4-2pass", ("xnnpack", "coreml"), "iPhones and iPads"),
        Target("rpi", "litert", "int4", ("litert", "onnx", "xnnpack"), "Raspberry Pi 4/5 (aarch64)"),
        Target("linux", "xnnpack", "int8", ("xnnpack", "litert", "onnx", "coreml", "vulkan"), "x86/arm Linux hosts"),
    )
}


@dataclass(frozen=True)
class Plan:
    """A checked export request: every name is now a typed object."""

    target: Target
    backend: Backend
    scheme_name: str


def resolve(target: str, backend: str | None, quant: str | None) -> Plan:
    """Check target x backend x quant before any slow step; name the valid choices when refusing."""
    from edge.quant.schemes import SCHEMES

    if target not in TARGETS:
        raise EdgeError(f"unknown target {target!r}", hint=f"choose one of: {', '.join(TARGETS)}")
    t = TARGETS[target]
    name = backend or t.default_backend
    if name not in t.backends:
        raise EdgeError(
            f"backend {name!r} does not fit target {t.name}",
            hint=f"for {t.name} choose one of: {', '.join(t.backends)}",
        )
    b = BACKENDS[name]
    from edge.quant.auto import BASE as AUTO_BASE

    scheme = quant or (t.default_quant if t.default_quant in b.schemes else b.default_quant or b.schemes[0])
    if scheme == "auto":  # searches which linears of its base scheme go to 4 bits (edge/quant/auto.py)
        if AUTO_BASE not in b.schemes:
            raise EdgeError(
                f"backend {b.name} cannot lower --quant auto (it mixes {AUTO_BASE}'s formats)",
                hint=f"{b.name} supports: {', '.join(b.schemes)}",
            )
        b.require()
        return Plan(t, b, scheme)
    if scheme not in SCHEMES:
        raise EdgeError(f"unknown quantization scheme {scheme!r}", hint=f"choose one of: {', '.join(SCHEMES)}, or auto")
    if scheme not in b.schemes:
        raise EdgeError(
            f"backend {b.name} cannot lower scheme {scheme!r}", hint=f"{b.name} supports: {', '.join(b.schemes)}"
        )
    b.require()
    return Plan(t, b, scheme)
