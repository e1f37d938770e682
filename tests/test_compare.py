"""benchmarks/compare.py on tiny bundles: its JSON and table are well formed, and two runtimes of one fp32
model generate the same greedy tokens. Speed itself is never asserted."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from edge import api

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compared(tmp_path_factory, device_bundles):
    root = tmp_path_factory.mktemp("compare")
    pte = api.export("tiny-test", "linux", "xnnpack", "fp32", random_weights=True, max_seq_len=64, out=root / "pte")
    onnx = device_bundles["onnx"]  # the same seeded tiny model, as an fp32 .onnx
    out = root / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--bundle", pte["path"], "--bundle",
           onnx["path"], "--no-llama-cpp", "--no-stock-executorch", "--no-accuracy", "--rounds", "2",
           "--prompt-len", "16", "--gen-len", "8", "--threads", "1", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "compare.json").read_text()), out


def test_the_json_holds_every_round_and_a_row_per_contender(compared):
    result, out = compared
    names = ["gemma-edge xnnpack fp32 .pte", "gemma-edge onnx fp32 .onnx"]
    assert [r["name"] for r in result["rows"]] == names
    assert result["args"]["rounds"] == 2 and len(result["bandwidths_gb_s"]) == 2 and result["bandwidth_gb_s"] > 0
    for name, row in zip(names, result["rows"], strict=True):
        rounds = result["raw"][name]
        assert len(rounds) == 2 and row["rounds"] == 2
        assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rounds)
        assert row["decode_tok_s"] == pytest.approx(statistics.median(r["decode_tok_s"] for r in rounds))
        assert 0 < row["ceiling_fraction"] and row["model_mb"] > 0 and row["peak_rss_mb"] > 0
        assert row["mean_kld"] is None  # --no-accuracy
    table = (out / "compare.md").read_text()
    assert all(f"| {n} |" in table for n in names)
    assert len(json.loads((out / "prompt-ids.json").read_text())) == 16 and len(result["generated_ids"]) == 2


def test_two_runtimes_of_one_model_generate_the_same_greedy_tokens(compared):
    result, _ = compared
    pte, onnx = (result["generated_ids"][n] for n in ("gemma-edge xnnpack fp32 .pte", "gemma-edge onnx fp32 .onnx"))
    assert len(pte) == 8 and pte == onnx
    for name, rounds in result["raw"].items():  # and each the same tokens in every round
        assert all(r["generated_ids"] == rounds[0]["generated_ids"] for r in rounds), name
