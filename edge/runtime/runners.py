"""The runner for a bundle's artifact, by its backend's family: the one table of runners."""

from __future__ import annotations

import os
from pathlib import Path

from edge.errors import EdgeError
from edge.targets import BACKENDS  # the table only: no backend module (nor torch) is imported


def default_threads() -> int | None:
    """`EDGE_THREADS`, where set: the runners' threads when the caller names none (else each runtime's
    default, a thread per core). For processes that share the cores, e.g. the tests' parallel workers."""
    value = os.environ.get("EDGE_THREADS")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise EdgeError(f"EDGE_THREADS={value!r} is not a thread count", hint="a whole number >= 1, or unset it")
    return int(value)


def open_runner(manifest: dict, threads: int | None = None):
    """The runner for a verified bundle's artifact on this host."""
    threads = threads or default_threads()
    backend = BACKENDS.get(manifest["backend"])
    if backend is None or not backend.runs_here:
        raise EdgeError(
            f"a {manifest['backend']} artifact cannot run on this host",
            hint="run it on its device; here, export --backend xnnpack to run and validate on the CPU",
        )
    if not backend.runnable():
        raise EdgeError(
            f"running a {backend.name} artifact needs the Python package {backend.runtime or backend.package!r}",
            hint="pip install 'gemma-edge[device]'" if backend.runtime else backend.install,
        )
    if backend.family == "executorch":
        from edge.runtime.pte import PteRunner

        data = manifest["io"].get("weights_file", {}).get("file")
        root = Path(manifest["path"])
        return PteRunner(root / manifest["artifact"], threads=threads, data_path=root / data if data else None)
    if backend.family == "litert":
        from edge.runtime.tflite import TfliteRunner

        return TfliteRunner(Path(manifest["path"]) / manifest["artifact"], threads=threads)
    if backend.family == "onnx":
        from edge.runtime.onnx import OnnxRunner

        return OnnxRunner(Path(manifest["path"]) / manifest["artifact"], threads=threads)
    raise EdgeError(f"no runner for backend family {backend.family}", hint="update gemma-edge")
