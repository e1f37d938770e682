"""The bundle directory: what `edge export` writes and what apps and the validator read.

    <out>/model.pte | model.tflite | model.onnx, tokenizer.model, golden.npz, manifest.json

It is built in a hidden sibling folder and renamed into place at the end, manifest last:
an interrupted export leaves no folder that looks like a bundle. `load` is the one door every
command goes through: the manifest's shape, every path it names, and every file's sha256 and size
are checked as a whole before anything is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge.errors import EdgeError
from edge.paths import expand

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REEXPORT = "export the bundle again, or copy the whole folder from where it was exported"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def is_bundle(path: Path) -> bool:
    """A real folder holding a manifest that reads as a bundle's: what --force may replace."""
    mf = path / MANIFEST
    if path.is_symlink() or not path.is_dir() or mf.is_symlink() or not mf.is_file():
        return False
    try:
        m = json.loads(mf.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and "schema_version" in m and isinstance(m.get("files"), dict)


def check_destination(out: Path, force: bool) -> None:
    """Refuse an existing --out without --force, or one that is not a bundle, before any slow work."""
    if out.is_symlink():
        raise EdgeError(f"{out} is a symbolic link", hint="give the real folder, or choose another --out")
    if out.exists() and not out.is_dir():
        raise EdgeError(f"{out} exists and is not a folder", hint="choose another --out")
    if out.exists() and not force:
        raise EdgeError(f"{out} already exists", hint="pass --force to replace it, or choose another --out")
    if out.exists() and not is_bundle(out) and any(out.iterdir()):
        # --force is a promise about bundles; a folder of the user's own files is never deleted for it.
        raise EdgeError(
            f"{out} is not a bundle (no readable {MANIFEST}); --force replaces only a bundle or an empty folder",
            hint="choose another --out, or move that folder away yourself",
        )
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise EdgeError(f"cannot write under {probe}: it is a file", hint="choose another --out folder")
    if not os.access(probe, os.W_OK):
        raise EdgeError(f"cannot write under {probe}", hint="choose a writable --out folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_stale(out: Path, say=lambda msg: None) -> list[Path]:
    """Remove the hidden work folders of killed exports to `out` (`.NAME.partial-PID-*`, `.NAME.old-PID`)
    whose process is gone; a live export's folders are left alone."""
    removed = []
    if not out.parent.is_dir():
        return removed
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:partial|old)-(\d+)(?:-.*)?")
    for d in out.parent.iterdir():
        m = pattern.fullmatch(d.name)
        if m and d.is_dir() and not d.is_symlink() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
            say(f"removed {d}: the work folder of an export that was killed")
    return removed


@contextmanager
def staging(out: Path, force: bool, say=lambda msg: None) -> Iterator[Path]:
    """A temporary folder beside `out`; finalize() moves it into place. Removed on any failure."""
    check_destination(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out, say)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as e:  # permissions that os.access cannot predict (root, read-only mounts, /proc)
        raise EdgeError(f"cannot write under {out.parent}: {e.strerror}", hint="choose a writable --out folder") from e
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def finalize(tmp: Path, out: Path, manifest: dict, force: bool = False) -> dict:
    """Hash every file, write the manifest last, and rename the folder into place.

    What sits at `out` now is checked again: the export may have run for minutes, and only a bundle
    (with --force) or nothing is replaced; anything else that appeared meanwhile is kept.
    """
    files = {}
    for f in sorted(tmp.iterdir()):
        if f.name != MANIFEST:
            files[f.name] = {"sha256": sha256(f), "bytes": f.stat().st_size}
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists() or out.is_symlink():
        if not (force and is_bundle(out)):
            raise EdgeError(
                f"{out} appeared during the export and is not a bundle this export may replace",
                hint="nothing was written there; choose another --out and export again",
            )
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return manifest


def _plain_name(path: Path, name: object, what: str) -> str:
    """A file name the manifest gives must name a file inside the bundle itself: no folders, no `..`."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..", MANIFEST)
        or any(c in name for c in "/\\\x00")
        or name != name.strip()
    ):
        raise EdgeError(
            f"{path}: the manifest's {what} is {name!r}, not the name of a file inside the bundle", hint=_REEXPORT
        )
    return name


_ABSENT = object()


def _lookup(manifest: dict, keys: str) -> object:
    """manifest["a"]["b"] for "a.b"; _ABSENT where a level is missing or not an object."""
    node: object = manifest
    for k in keys.split("."):
        if not isinstance(node, dict) or k not in node:
            return _ABSENT
        node = node[k]
    return node


def _get(manifest: dict, path: Path, keys: str, kind: type):
    node = _lookup(manifest, keys)
    if node is _ABSENT:
        raise EdgeError(f"{path}: the manifest has no {keys!r}", hint=_REEXPORT)
    if not isinstance(node, kind) or (kind is int and isinstance(node, bool)):
        raise EdgeError(f"{path}: the manifest's {keys!r} is not a {kind.__name__}", hint=_REEXPORT)
    return node


# Every manifest field that names a file of the bundle: each must be listed in `files` and verified.
NAMED_FILES = ("artifact", "tokenizer.file", "golden.file", "io.weights_file.file", "io.package.file")
# The fields the commands read, with their types: a bundle missing one is refused here, not mid-run.
REQUIRED = {
    "variant": str,
    "backend": str,
    "artifact": str,
    "max_seq_len": int,
    "arch": dict,
    "arch.vocab_size": int,
    "special_ids.bos": int,
    "tokenizer.file": str,
    "golden.file": str,
    "quant.scheme.name": str,
    "io": dict,
}


def named_files(manifest: dict) -> dict[str, str]:
    """{field: file name} for every manifest field that names a file (the optional ones when present)."""
    return {keys: node for keys in NAMED_FILES if (node := _lookup(manifest, keys)) is not _ABSENT}


def load(bundle: str | Path) -> dict:
    """Read a bundle's manifest and verify the bundle as a whole; EdgeError names what is wrong.

    Every file the manifest names is a plain name listed in `files` with its sha256 and size; the
    folder holds exactly those files and the manifest (no symlinks, nothing unlisted); every file's
    size and sha256 match.
    """
    path = expand(bundle, "bundle")
    mf = path / MANIFEST
    if not path.is_dir():
        raise EdgeError(f"{path} is not a folder", hint="give the folder that `edge export` wrote")
    if mf.is_symlink() or not mf.is_file():
        raise EdgeError(f"{path} has no {MANIFEST}: not a bundle, or an interrupted export", hint="export it again")
    try:
        manifest = json.loads(mf.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise EdgeError(f"{mf} is not valid JSON ({e})", hint="export the bundle again") from e
    if not isinstance(manifest, dict):
        raise EdgeError(f"{mf} is not a JSON object", hint=_REEXPORT)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise EdgeError(
            f"{path} has bundle schema {manifest.get('schema_version')!r}, this gemma-edge reads {SCHEMA_VERSION}",
            hint="export it again with this version",
        )
    for keys, kind in REQUIRED.items():
        _get(manifest, path, keys, kind)
    files = _get(manifest, path, "files", dict)
    for name, info in files.items():
        _plain_name(path, name, "file list entry")
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("sha256"), str)
            or not _SHA256.fullmatch(info["sha256"])
            or not isinstance(info.get("bytes"), int)
            or isinstance(info["bytes"], bool)
            or info["bytes"] < 0
        ):
            raise EdgeError(f"{path}: the manifest's entry for {name!r} has no valid sha256 and bytes", hint=_REEXPORT)
    for field, name in named_files(manifest).items():
        if _plain_name(path, name, field) not in files:
            raise EdgeError(f"{path}: {name!r} ({field}) is not listed with its sha256 in the manifest", hint=_REEXPORT)
    present = {}
    with os.scandir(path) as it:
        for entry in it:
            if entry.name != MANIFEST:
                present[entry.name] = entry.stat(follow_symlinks=False)
    for name, st in sorted(present.items()):
        if name not in files:
            raise EdgeError(
                f"{path}: {name} is not part of the bundle (not listed in its manifest)",
                hint="remove it from the bundle folder, or export again",
            )
        if not stat.S_ISREG(st.st_mode):
            raise EdgeError(f"{path}: {name} is a link or a special file, not a regular file", hint=_REEXPORT)
    for name, info in files.items():
        if name not in present:
            raise EdgeError(f"{path}: {name} is missing", hint="copy the whole bundle folder, or export again")
        if present[name].st_size != info["bytes"] or sha256(path / name) != info["sha256"]:
            raise EdgeError(
                f"{path}: {name} does not match its sha256 in the manifest (modified or truncated)",
                hint="copy the bundle again, or export it again",
            )
    manifest["path"] = str(path)
    return manifest
