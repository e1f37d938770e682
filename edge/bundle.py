"""The bundle directory: what `edge export` writes and what apps and the validator read.

    <out>/model.pte | model.tflite | model.onnx, tokenizer.model, golden.npz, manifest.json

It is built in a hidden sibling folder and renamed into place at the end, manifest last:
an interrupted export leaves no folder that looks like a bundle. Loading verifies every file's
sha256 against the manifest before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge.errors import EdgeError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def check_destination(out: Path, force: bool) -> None:
    """Refuse an existing --out without --force, and an unwritable parent, before any slow work."""
    if out.exists() and not force:
        raise EdgeError(f"{out} already exists", hint="pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise EdgeError(f"{out} exists and is not a folder", hint="choose another --out")
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise EdgeError(f"cannot write under {probe}: it is a file", hint="choose another --out folder")
    if not os.access(probe, os.W_OK):
        raise EdgeError(f"cannot write under {probe}", hint="choose a writable --out folder")


@contextmanager
def staging(out: Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside `out`; finalize() moves it into place. Removed on any failure."""
    check_destination(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:  # permissions that os.access cannot predict (root, read-only mounts, /proc)
        raise EdgeError(f"cannot write under {out.parent}: {e.strerror}", hint="choose a writable --out folder") from e
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def finalize(tmp: Path, out: Path, manifest: dict) -> dict:
    """Hash every file, write the manifest last, and rename the folder into place."""
    files = {}
    for f in sorted(tmp.iterdir()):
        if f.name != MANIFEST:
            files[f.name] = {"sha256": sha256(f), "bytes": f.stat().st_size}
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return manifest


def load(bundle: str | Path, verify: bool = True) -> dict:
    """Read a bundle's manifest and check every file against it; EdgeError names what is wrong."""
    path = Path(bundle)
    mf = path / MANIFEST
    if not path.is_dir():
        raise EdgeError(f"{path} is not a folder", hint="give the folder that `edge export` wrote")
    if not mf.is_file():
        raise EdgeError(f"{path} has no {MANIFEST}: not a bundle, or an interrupted export", hint="export it again")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise EdgeError(f"{mf} is not valid JSON ({e})", hint="export the bundle again") from e
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise EdgeError(
            f"{path} has bundle schema {manifest.get('schema_version')}, this gemma-edge reads {SCHEMA_VERSION}",
            hint="export it again with this version",
        )
    if verify:
        for name, info in manifest["files"].items():
            f = path / name
            if not f.is_file():
                raise EdgeError(f"{path}: {name} is missing", hint="copy the whole bundle folder, or export again")
            if f.stat().st_size != info["bytes"] or sha256(f) != info["sha256"]:
                raise EdgeError(
                    f"{path}: {name} does not match its sha256 in the manifest (modified or truncated)",
                    hint="copy the bundle again, or export it again",
                )
    manifest["path"] = str(path)
    return manifest
