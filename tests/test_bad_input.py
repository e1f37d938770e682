"""The bad-input table: each row a hostile input run through the CLI (in-process), which must print
`error:` and `hint:` and exit 2. docs/bad-inputs.md is generated from these rows:

    UPDATE_DOCS=1 .venv/bin/pytest tests/test_bad_input.py

and test_the_doc_matches_the_table fails when the doc is out of date.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from gguf import GGUFValueType as V
from tiny_files import write_bundle, write_dump, write_gguf, write_hf_folder

from conftest import run_cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "bad-inputs.md"


def _bundle(tmp: Path, edit=None) -> Path:
    b = write_bundle(tmp / "b")
    if edit:
        edit(b)
    return b


def _manifest(b: Path, edit) -> None:
    m = json.loads((b / "manifest.json").read_text())
    edit(m)
    (b / "manifest.json").write_text(json.dumps(m))


def _rehash(b: Path) -> None:
    from edge import bundle as bundle_mod

    _manifest(b, lambda m: m["files"].update({n: {"sha256": bundle_mod.sha256(b / n),
                                                   "bytes": (b / n).stat().st_size} for n in m["files"]}))  # fmt: skip


def _empty_golden(b: Path) -> None:
    (b / "golden.npz").write_bytes(b"")
    _rehash(b)


def _config(tmp: Path, **changes) -> Path:
    folder = write_hf_folder(tmp / "hf")
    cfg = json.loads((folder / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _gguf_cut(tmp: Path) -> Path:
    p = write_gguf(tmp / "m.gguf")
    p.write_bytes(p.read_bytes()[:300])
    return p


def _safetensors_header(tmp: Path) -> Path:
    folder = write_hf_folder(tmp / "hf")
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    return folder


G = ["generate", "--variant", "tiny-test", "--max-seq-len", "64", "--prompt", "hi"]
V_DEVICE = ["--stages", "device", "--device-logits"]

# (what the input is, the arguments it makes under a temporary folder, a phrase of the message)
ROWS = [
    ("a folder that is not a bundle", lambda t: ["validate", str(t)], "has no manifest.json"),
    ("manifest.json that is not an object",
     lambda t: ["validate", str(_bundle(t, lambda b: (b / "manifest.json").write_text("[1]")))], "not a JSON object"),
    ("a manifest naming a file outside the bundle",
     lambda t: ["validate", str(_bundle(t, lambda b: _manifest(b, lambda m: m.update(artifact="../x.pte"))))],
     "not the name of a file inside the bundle"),
    ("a file changed after the export",
     lambda t: ["validate", str(_bundle(t, lambda b: (b / "golden.npz").write_bytes(b"x")))],
     "does not match its sha256"),
    ("golden.npz empty, its hash updated to match",
     lambda t: ["validate", str(_bundle(t, _empty_golden)), *V_DEVICE, str(write_dump(t / "d.npz"))],
     "is not a golden.npz"),
    ("an empty device record",
     lambda t: ["validate", str(_bundle(t)), *V_DEVICE, str(_touch(t / "d.npz"))], "is not a logits dump"),
    ("a device record that does not exist",
     lambda t: ["validate", str(_bundle(t)), *V_DEVICE, str(t / "none.npz")], "cannot read --device-logits"),
    ("--dump-logits where nothing can be written",
     lambda t: ["validate", str(_bundle(t)), "--dump-logits", "/proc/logits.npz"], "cannot be written"),
    ("a bundle path under ~ of an unknown user", lambda t: ["validate", "~nosuchuser-edge/b"], "nosuchuser-edge"),
    ("--out . (the current folder)", lambda t: ["export", "--random-weights", "--out", "."], "names no folder"),
    ("an unknown option", lambda t: ["export", "--bogus"], "No such option"),
    ("a number option given text", lambda t: ["export", "--max-seq-len", "abc"], "Invalid value"),
    ("--temperature nan", lambda t: [*G, "--random-weights", "--temperature", "nan"], "not a finite value"),
    ("a prompt that is not UTF-8", lambda t: [*G[:5], "--prompt", "caf\udce9", "--random-weights"], "not valid UTF-8"),
    ("a GGUF cut short in its header", lambda t: [*G, "--weights", str(_gguf_cut(t))], "truncated"),
    ("a GGUF claiming a billion layers",
     lambda t: [*G, "--weights", str(write_gguf(t / "m.gguf", raw={"gemma3.block_count": (10**9, V.UINT32)}))],
     "block_count is 1000000000"),
    ("a GGUF with zero attention heads",
     lambda t: [*G, "--weights", str(write_gguf(t / "m.gguf", raw={"gemma3.attention.head_count": (0, V.UINT32)}))],
     "head_count is 0"),
    ("config.json claiming a billion layers",
     lambda t: [*G, "--weights", str(_config(t, num_hidden_layers=10**9))], "num_hidden_layers is 1000000000"),
    ("config.json with a string where a number belongs",
     lambda t: [*G, "--weights", str(_config(t, hidden_size="64"))], "hidden_size is '64'"),
    ("a safetensors header longer than its file",
     lambda t: [*G, "--weights", str(_safetensors_header(t))], "its header claims"),
]  # fmt: skip


def _touch(p: Path) -> Path:
    p.write_bytes(b"")
    return p


def run_row(make, tmp: Path) -> tuple[list[str], int, str]:
    """The arguments, exit code and stderr of one row, with the temporary folder shown as <tmp>."""
    args = make(tmp)
    code, _, err = run_cli(*args)
    return [a.replace(str(tmp), "<tmp>") for a in args], code, err.replace(str(tmp), "<tmp>")


@pytest.mark.parametrize("what, make, needle", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_error_hint_exit_2(tmp_path, what, make, needle):
    _, code, err = run_row(make, tmp_path)
    assert code == 2, err
    assert "error:" in err and "hint:" in err and "Traceback" not in err, err
    assert needle in err, err


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(tmp_root: Path) -> str:
    lines = [
        "# Bad inputs and what `edge` says",
        "",
        "Generated from tests/test_bad_input.py (`UPDATE_DOCS=1 .venv/bin/pytest tests/test_bad_input.py`);",
        "a test fails when this file and the table differ. Each input goes through the CLI: it prints",
        "`error:` and `hint:` and exits 2 (bad input), never a traceback. `<tmp>` is the test's folder.",
        "",
        "| input | command | message | exit |",
        "|---|---|---|---|",
    ]
    for i, (what, make, _) in enumerate(ROWS):
        tmp = tmp_root / str(i)
        tmp.mkdir()
        args, code, err = run_row(make, tmp)
        message = next((ln[len("error: ") :] for ln in err.splitlines() if ln.startswith("error: ")), err)
        hint = next((ln[len("hint: ") :] for ln in err.splitlines() if ln.startswith("hint: ")), "")
        command = "edge " + " ".join(args).encode("utf-8", "backslashreplace").decode()
        lines.append(f"| {_cell(what)} | `{_cell(command)}` | {_cell(message)}<br>hint: {_cell(hint)} | {code} |")
    return "\n".join(lines) + "\n"


def test_the_doc_matches_the_table(tmp_path):
    text = render(tmp_path)
    if os.environ.get("UPDATE_DOCS"):
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, "docs/bad-inputs.md is out of date: UPDATE_DOCS=1 to rewrite it"
