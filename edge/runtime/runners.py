"""The runner for a bundle's artifact, by its backend's family: the one table of runners."""

from __future__ import annotations

from pathlib import Path

from edge.errors import EdgeError
from edge.targets import BACKENDS  # the table only: no backend module (nor torch) is imported


def open_runner(manifest: dict, threads: int | None = None):
    """The runner for a verified bundle's artifact on this host."""
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
