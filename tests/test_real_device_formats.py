"""The real 270M as .tflite (int4-hqq) and .onnx (int4-wo): lowering adds no error; accuracy vs fp32 measured.

Marked `full` (make test-full): two more real exports would push CI past its time budget.
"""

import pytest

from conftest import check_lowering_adds_only_noise
from edge import api
from edge.models.loading import load_weights
from edge.models.tokenizer import Tokenizer
from edge.models.variants import get_variant
from edge.quant.apply import calibration, quantize_model
from edge.quant.schemes import SCHEMES
from edge.validate import golden
from edge.validate.stages import evaluate, runner_logits

pytestmark = [pytest.mark.slow, pytest.mark.full]

CASES = {"litert": "int4-hqq", "onnx": "int4-wo"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-device")
    loaded = load_weights(get_variant("270m"))

    class Exported(dict):
        def __missing__(self, backend):
            q = CASES[backend]
            manifest = api.export("270m", "rpi", backend, q, out=root / backend)
            model = loaded.build(1024)
            calib = calibration(loaded.tokenizer, model.cfg.vocab_size) if SCHEMES[q].calibrated else None
            quantize_model(model, SCHEMES[q], calib)  # as `edge export` does
            self[backend] = (manifest, model)
            return self[backend]

    return Exported()


@pytest.mark.parametrize("backend", CASES)
def test_lowering_adds_no_error_on_the_real_model(exported, backend):
    """The artifact vs the eager model of its scheme, token by token on prose, code and chat.

    Weight-only int4 (onnx) is deterministic, so its bound is the scheme's; dynamic int8 activations
    (litert int4) are held to the noise checks of conftest.check_lowering_adds_only_noise."""
    manifest, model = exported[backend]
    prompts = golden.load(manifest["path"] + "/golden.npz")[:3]
    check_lowering_adds_only_noise(prompts, model, api.open_runner(manifest), SCHEMES[CASES[backend]], backend)


@pytest.mark.parametrize("backend", CASES)
def test_accuracy_vs_fp32_is_measured(exported, backend):
    manifest, _ = exported[backend]
    prompts = golden.load(manifest["path"] + "/golden.npz")
    o = evaluate(prompts, runner_logits(api.open_runner(manifest)), window=512)["overall"]
    print(f"{backend} {CASES[backend]} vs fp32: mean KLD {o['mean_kld']:.4f} top-1 {o['top1']:.4f}")
    # Neither scheme has a band (the mixed int4 is not carried into LiteRT or ONNX yet): this guards
    # against gross errors only. Measured: onnx int4-wo 0.406 / 65.9% (its eager model: 0.404, the
    # artifact equals it to 7e-12), as round-to-nearest int4 g32 with float activations costs on this
    # model (edge/quant/gptq.py: 0.400 / 66.6% on the linears alone); litert int4-hqq passed < 0.35.
    assert o["mean_kld"] < 0.5 and o["top1"] > 0.6


def test_the_real_litertlm_generates_in_litert_lm_what_our_runner_generates(exported):
    """The bundle's model.litertlm in the stock LiteRT-LM runtime: its greedy tokens are those of our .tflite runner."""
    litert_lm = pytest.importorskip("litert_lm", reason="pip install litert-lm-api==0.18.1 (the litert extra)")
    manifest, _ = exported["litert"]
    entry = manifest["io"]["package"]
    assert entry["file"] in manifest["files"]
    prompt, n = "The three primary colors are", 24
    engine = litert_lm.Engine(f"{manifest['path']}/{entry['file']}", max_num_tokens=manifest["max_seq_len"])
    session = engine.create_session(
        apply_prompt_template=False, sampler_config=litert_lm.SamplerConfig(top_k=1), max_output_tokens=n
    )
    session.run_prefill([prompt])
    text = session.run_decode().texts[0]
    session.close()
    engine.close()
    runner, tok = api.open_runner(manifest), Tokenizer(f"{manifest['path']}/{manifest['tokenizer']['file']}")
    logits, out = runner.prefill(tok.encode(prompt)), []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = runner.decode(out[-1])
    print(f"LiteRT-LM: {text!r}")
    assert text == tok.decode(out)
