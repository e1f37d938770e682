"""`model.litertlm` runs in the stock LiteRT-LM runtime (litert-lm-api) and generates what our eager model does.

A tiny random Gemma 3 with the real 262k vocabulary, so that LiteRT-LM's own tokenizer (the real
SentencePiece model, packed into the file) feeds it. LiteRT-LM drives the .tflite through its own
prefill / decode loop (its padding, its positions, its KV buffers); its greedy tokens must be the
eager model's on the same ids. (Its `run_text_scoring` per-token scores are not log-softmax of the
logits: -13.16 where the eager model and our .tflite runner both give -13.97 for the first token
of a continuation whose greedy tokens agree, and independent of the sampler; undocumented, so
not used as a reference here.)
"""

import numpy as np
import pytest
import torch

from conftest import tiny_config
from edge.models.config import Family
from edge.models.gemma import Gemma
from edge.models.loading import _random_tokenizer
from edge.models.weights import assign, random_tensors
from edge.progress import Stages
from edge.runtime.eager import EagerRunner
from edge.targets import BACKENDS, litert

litert_lm = pytest.importorskip("litert_lm", reason="pip install litert-lm-api==0.18.1 (the litert extra has it)")
MAX_SEQ = 96
PROMPT = "The capital of France is"
LONG_PROMPT = (
    "In the old harbour town the fishermen mended their nets each morning while the gulls circled"
    " over the grey water and the bakers opened their shutters to the smell of bread, salt and tar,"
    " and the children ran down to the quay to count the boats"
)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """(eager model, tokenizer, folder with model.tflite + tokenizer.model + model.litertlm, its manifest entry)."""
    cfg = tiny_config(Family.GEMMA3, vocab_size=262_144, dim=32, n_heads=2, n_layers=2, layer_types=(True, False))
    model = Gemma(cfg, max_seq_len=MAX_SEQ).eval()
    tensors = random_tensors(cfg, 3)
    tensors["embed.weight"] *= 4  # peaked enough that greedy has no near-ties (top-2 gap >= 0.007), not a repeat
    assign(model, tensors, "random")
    tok = _random_tokenizer()
    folder = tmp_path_factory.mktemp("litertlm")
    meta = litert.metadata(cfg, MAX_SEQ, tok.bos_id, list(tok.stop_ids), cfg.vocab_size, True)
    with torch.no_grad():
        low = litert.export(model, MAX_SEQ, BACKENDS["litert"], meta, Stages())
    (folder / "model.tflite").write_bytes(low.program)
    tok.save(folder / litert.TOKENIZER)
    special = {"bos": tok.bos_id, "stop": list(tok.stop_ids)}
    chat = {"jinja": "{{ bos_token }}", "user_turn": tok.chat_prompt("{prompt}")}
    entry = litert.package(folder, "model.tflite", MAX_SEQ, special, chat)
    return model, tok, folder, entry


@pytest.fixture(scope="module")
def engine(packaged):
    _, _, folder, entry = packaged
    eng = litert_lm.Engine(str(folder / entry["file"]), max_num_tokens=MAX_SEQ)
    yield eng
    eng.close()


def test_the_package_records_the_runtime_metadata(packaged, engine):
    _, tok, folder, entry = packaged
    assert entry["file"] == litert.LITERTLM
    assert (folder / entry["file"]).stat().st_size > (folder / "model.tflite").stat().st_size  # the program inside
    assert engine.bos_token_id == tok.bos_id
    assert sorted(ids[0] for ids in engine.eos_token_ids) == sorted(tok.stop_ids)
    assert engine.tokenize(PROMPT) == tok.encode(PROMPT, bos=False)  # the packed tokenizer is ours


@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT], ids=["prefill_8", "prefill_32-past-the-window"])
def test_litert_lm_greedy_tokens_are_the_eager_model_s(packaged, engine, prompt):
    """LiteRT-LM's own loop (its prefill padding and positions, its KV buffers) gives our eager model's tokens."""
    model, tok, _, _ = packaged
    n = 16
    session = engine.create_session(
        apply_prompt_template=False,
        sampler_config=litert_lm.SamplerConfig(top_k=1),
        max_output_tokens=n,
    )
    session.run_prefill([prompt])
    text = session.run_decode().texts[0]
    session.close()
    ids = tok.encode(prompt, bos=False)
    assert prompt == PROMPT or len(ids) > 32 > model.cfg.sliding_window  # prefill_32, then past the window
    out = greedy(model, [tok.bos_id, *ids], n)
    assert text == tok.decode(out), (text, out)
    assert text != tok.decode(greedy(model, ids, n))  # the check can fail: without BOS the tokens differ


def greedy(model, ids: list[int], n: int) -> list[int]:
    runner, out = EagerRunner(model), []
    logits = runner.prefill(ids)
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = runner.decode(out[-1])
    return out


def test_litert_lm_s_own_benchmark_gives_what_compare_reads(packaged):
    """benchmarks/peers/litert_lm_bench.py (benchmarks/compare.py's LiteRT-LM contender): one JSON line with
    the fields compare.py reads, the requested token counts, positive rates. Speed itself is not asserted."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    _, _, folder, entry = packaged
    before = sorted(p.name for p in folder.iterdir())
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "peers" / "litert_lm_bench.py"
    cmd = [sys.executable, str(script), "--litertlm", str(folder / entry["file"]), "--prompt-len", "16",
           "--gen-len", "8", "--threads", "1", "--max-num-tokens", str(MAX_SEQ), "--model-bytes", "123"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out["prefill_tokens"], out["decode_tokens"], out["model_bytes"]) == (16, 8, 123), out
    for key in ("load_s", "time_to_first_token_ms", "prefill_tok_s", "decode_tok_s"):
        assert out[key] > 0, (key, out)
    assert out["memory_mb"]["peak"] > 0 and out["decode_ms_per_token"]["p90"] is None
    assert sorted(p.name for p in folder.iterdir()) == before  # its weight cache went elsewhere, not into the bundle
