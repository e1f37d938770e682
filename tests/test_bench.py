"""edge bench on tiny bundles: a real greedy run, timed; torch-free for device formats; bad input is exit 2."""

import json

import pytest

from conftest import edge_cli
from edge import api, generation
from edge import bundle as bundle_mod
from edge.bench import prompt_ids
from edge.errors import EdgeError
from edge.models.tokenizer import Tokenizer


def test_bench_times_the_same_greedy_run_as_generate(tiny_bundle):
    r = api.bench(tiny_bundle["path"], prompt_len=20, gen_len=8, threads=1, repeats=2)
    assert (r["prompt_len"], r["gen_len"], r["repeats"], r["threads"]) == (20, 8, 2, 1)
    assert r["backend"] == "xnnpack" and r["scheme"] == "int8"
    assert r["model_bytes"] == tiny_bundle["files"]["model.pte"]["bytes"] + tiny_bundle["files"]["model.ptd"]["bytes"]
    # The timed tokens are the product's greedy generation from the same prompt (generate may stop at EOS).
    m = bundle_mod.load(tiny_bundle["path"])
    tok = Tokenizer(m["path"] + "/" + m["tokenizer"]["file"])
    ids = prompt_ids(tok, 20)
    assert len(ids) == 20 and ids[0] == tok.bos_id and len(set(ids)) > 5  # real text, not one id repeated
    gen = generation.generate(api.open_runner(m, threads=1), tok, ids, 8)
    assert len(r["generated_ids"]) == 8 and r["generated_ids"][: len(gen.output_ids)] == gen.output_ids
    assert r["rounds_agree"]
    assert r["time_to_first_token_ms"] > 0 and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    assert r["decode_ms_per_token"]["p90"] >= r["decode_ms_per_token"]["p50"] > 0
    mem = r["memory_mb"]
    assert mem["peak"] >= mem["after_load"] > 0 and mem["peak"] >= mem["after_run"]
    # the ceiling: bandwidth / the bytes a token reads, and decode's share of it
    assert r["read_bandwidth_gb_s"] > 0
    assert r["ceiling_tok_s"] == pytest.approx(r["read_bandwidth_gb_s"] * 1e9 / r["model_bytes"], rel=0.01)
    assert r["ceiling_fraction"] == pytest.approx(r["decode_tok_s"] / r["ceiling_tok_s"], abs=2e-3)


def test_read_bandwidth_is_a_plausible_figure():
    from edge.bench import read_bandwidth_gb_s

    # 64 MiB read in well under a second on any machine this runs on, and no faster than ~1 TB/s
    assert 0.05 < read_bandwidth_gb_s(1, mib=64, repeats=2) < 1000


@pytest.mark.parametrize("backend", ["litert", "onnx"])
def test_bench_runs_a_device_bundle_without_torch(device_bundles, backend):
    out = edge_cli("bench", device_bundles[backend]["path"], "--prompt-len", "12", "--gen-len", "6",
                   "--repeats", "1", "--threads", "1", "--json", block_torch=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)  # stdout is the JSON object alone; progress went to stderr
    assert r["backend"] == backend and len(r["generated_ids"]) == 6 and r["decode_tok_s"] > 0
    assert "[bench] round 1/1" in out.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--prompt-len", "60", "--gen-len", "10"), "do not fit the bundle's max_seq_len 64"),
        (("--repeats", "0"), "--repeats 0 must be at least 1"),
        (("--gen-len", "0"), "--gen-len 0 must be at least 1"),
    ],
)
def test_bench_refuses_bad_input_with_a_hint(tiny_bundle, args, says):
    out = edge_cli("bench", tiny_bundle["path"], *args)
    assert out.returncode == 2 and says in out.stderr and "hint:" in out.stderr
    assert "Traceback" not in out.stderr


def test_bench_of_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(EdgeError):
        api.bench(tmp_path / "nope")


@pytest.mark.parametrize("value", ["two", "0"])
def test_edge_threads_that_is_not_a_count_is_refused(tiny_bundle, monkeypatch, value):
    monkeypatch.setenv("EDGE_THREADS", value)
    with pytest.raises(EdgeError, match="EDGE_THREADS") as e:
        api.open_runner(bundle_mod.load(tiny_bundle["path"]))
    assert "whole number" in e.value.hint


def test_edge_threads_is_the_runners_default(monkeypatch):
    from edge.runtime.runners import default_threads

    monkeypatch.setenv("EDGE_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("EDGE_THREADS")
    assert default_threads() is None
