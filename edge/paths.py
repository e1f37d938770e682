"""What the user typed, checked before any slow work: paths to read and write, and prompt text.

The CLI calls these first, so that an unwritable `--dump-logits`, an `--out` that names the current
folder, or a `~nosuchuser/` path is exit 2 in a second, not a traceback or a failure after minutes.
"""

from __future__ import annotations

from pathlib import Path

from edge.errors import EdgeError


def expand(path: str | Path, what: str) -> Path:
    """`~` and `~user` expanded; an unknown user is an EdgeError (pathlib raises RuntimeError)."""
    try:
        return Path(path).expanduser()
    except RuntimeError as e:
        raise EdgeError(
            f"{what} {path}: {e}", hint="write the path out in full, or check the user name after ~"
        ) from None


def readable_file(path: str | Path, what: str) -> Path:
    """An existing regular file that can be opened."""
    p = expand(path, what)
    hint = f"give {what} the path of an existing file"
    if not p.is_file():
        raise EdgeError(f"cannot read {what} {p}: " + ("it is a folder" if p.is_dir() else "no such file"), hint=hint)
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise EdgeError(f"cannot read {what} {p}: {e.strerror or e}", hint=hint) from None
    return p


def writable_file(path: str | Path, what: str) -> Path:
    """A file the command will write at the end: proven writable now by opening it (an existing
    file is not truncated; a new one is created and removed). os.access says yes to root everywhere."""
    p = expand(path, what)
    hint = f"give {what} a file path in a folder that exists and can be written"
    if p.is_dir() or p.name in ("", ".", ".."):
        raise EdgeError(f"{what} {p} is a folder, not a file", hint=hint)
    if not p.parent.is_dir():
        raise EdgeError(f"{what} {p}: the folder {p.parent} does not exist", hint=hint)
    try:
        if p.exists():
            with open(p, "r+b"):
                pass
        else:
            with open(p, "xb"):
                pass
            p.unlink()
    except OSError as e:
        raise EdgeError(f"{what} {p}: cannot be written ({e.strerror or e})", hint=hint) from None
    return p


def outside_bundle(path: Path, bundle: str | Path, what: str) -> Path:
    """A file or folder the command writes, not inside the bundle it reads: a bundle holds only the files
    its manifest lists, so anything written into it makes every later command refuse the bundle."""
    try:
        inside = path.resolve().is_relative_to(expand(bundle, "the bundle").resolve())
    except (OSError, RuntimeError):  # unresolvable: the bundle's own checks say what is wrong with it
        return path
    if inside:
        raise EdgeError(
            f"{what} {path} is inside the bundle {bundle}: an added file makes the bundle fail its verification",
            hint=f"write {what} outside the bundle folder, e.g. {what} ./{path.name}",
        )
    return path


def out_folder(path: str | Path) -> Path:
    """An --out that names a folder of its own: not `.`, `..`, `/`, nor the current folder or one of
    its parents (the export renames its work folder into place there, and --force replaces it)."""
    p = expand(path, "--out")
    hint = "give --out the path of a new folder, e.g. --out exports/my-bundle"
    if p.name in ("", ".", ".."):
        raise EdgeError(f"--out {path} names no folder of its own", hint=hint)
    try:
        resolved, cwd = p.resolve(), Path.cwd().resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, a deleted current folder
        raise EdgeError(f"--out {path}: cannot resolve it ({e})", hint=hint) from None
    if resolved == cwd or resolved in cwd.parents:
        raise EdgeError(f"--out {path} is the current folder or one of its parents", hint=hint)
    return p


def utf8_text(text: str, what: str) -> str:
    """Text that is valid Unicode: bytes that are not UTF-8 reach Python's argv as lone surrogates,
    which the tokenizer cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EdgeError(
            f"{what} is not valid UTF-8 text (byte {e.object[e.start].encode('utf-8', 'surrogateescape')!r} at"
            f" character {e.start})",
            hint="pass the text as UTF-8 (is the terminal's locale UTF-8? try LANG=C.UTF-8)",
        ) from None
    return text
