"""The command line as a user meets it: JSON on stdout, exit 2 with a hint on bad input, no traceback."""

import json
import subprocess
import sys

import pytest


def edge(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True, text=True, timeout=timeout)


def test_variants_json_lists_the_table():
    r = edge("variants", "--json")
    assert r.returncode == 0, r.stderr
    rows = {v["name"]: v for v in json.loads(r.stdout)["variants"]}
    assert set(rows) == {"gemma3-270m", "gemma3-1b", "gemma2-2b", "gemma-2b"}
    assert rows["gemma3-270m"]["aliases"] == ["270m"] and rows["gemma3-270m"]["embedded"]
    assert rows["gemma3-270m"]["parameters"] == 268_098_176  # embedding 167.8M + 18 layers of 5.57M + norm
    assert rows["gemma2-2b"]["parameters"] == 2_614_341_888
    for r_ in rows.values():
        s = r_["size_bytes"]
        assert s["fp32"] == 4 * r_["parameters"] and s["int4"] < s["int8"] < s["fp32"]


def test_variants_table_is_readable():
    r = edge("variants")
    assert r.returncode == 0 and "gemma3-270m" in r.stdout and "270m" in r.stdout


def test_generate_json_random_weights():
    r = edge(
        "generate",
        "--variant",
        "270m",
        "--random-weights",
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # the whole of stdout is one JSON object
    assert set(out) >= {"prompt_ids", "output_ids", "text", "prefill_tok_s", "decode_tok_s"}
    assert out["prompt_ids"][0] == 2  # BOS
    assert 1 <= len(out["output_ids"]) <= 4 and out["prefill_tok_s"] > 0
    assert out["weights"]["kind"] == "random"


def test_generate_random_weights_is_seeded():
    args = ("generate", "--variant", "270m", "--random-weights", "--prompt", "a b c", "-n", "3", "--json")
    a, b = edge(*args, "--seed", "1"), edge(*args, "--seed", "1")
    assert json.loads(a.stdout)["output_ids"] == json.loads(b.stdout)["output_ids"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (("generate", "--variant", "7b", "--prompt", "x"), "unknown variant"),
        (("generate", "--variant", "1b", "--prompt", "x"), "--random-weights"),
        (("generate", "--weights", "/nonexistent/model.gguf", "--prompt", "x"), "does not exist"),
        (("generate", "--random-weights", "--weights", "/tmp", "--prompt", "x"), "exclude each other"),
        (("generate", "--random-weights", "--prompt", "one two three four five", "--max-seq-len", "4"), "holds 4"),
        (("generate", "--random-weights", "--prompt", "x", "--max-new-tokens", "0"), "at least 1"),
        (("generate", "--random-weights", "--prompt", "x", "--temperature", "-1"), "not a finite value >= 0"),
    ],
)
def test_bad_input_exits_2_with_hint(args, needle):
    r = edge(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and "hint:" in r.stderr
    assert "Traceback" not in r.stderr


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    r = edge("generate", "--weights", str(bad), "--prompt", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "GGUF" in r.stderr


def test_hf_folder_without_config(tmp_path):
    r = edge("generate", "--weights", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and "config.json" in r.stderr


def test_doctor_json():
    r = edge("doctor", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["packages"]["torch"].startswith("2.13.0") and info["memory_gb"]["total"] > 0
    assert all("available" in b for b in info["backends"].values())
