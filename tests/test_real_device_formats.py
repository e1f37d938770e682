"""The real 270M as .tflite and .onnx, each int4 (the rpi default) and int8: lowering adds no error; accuracy vs fp32.

Marked `full` (make test-full): four more real exports would push CI past its time budget.
"""

import pytest

from conftest import check_lowering_adds_only_noise
from edge import api
from edge.models.tokenizer import Tokenizer
from edge.quant.schemes import SCHEMES
from edge.validate import golden
from edge.validate.stages import evaluate, runner_logits

pytestmark = [pytest.mark.slow, pytest.mark.full]

CASES = {
    "litert": ("litert", "int4"),
    "litert-int8": ("litert", "int8"),
    "onnx": ("onnx", "int4"),
    "onnx-int8": ("onnx", "int8"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-device")

    class Exported(dict):
        def __missing__(self, case):
            backend, scheme = CASES[case]
            held = {}
            # The eager model is the very module `edge export` quantized (its source grids, GPTQ's sampled
            # calibration): quantizing a second copy would cost minutes and need the same inputs.
            manifest = api.export(
                "270m", "rpi", backend, scheme, out=root / case, on_quantized=lambda m: held.update(m=m)
            )
            self[case] = (manifest, held["m"])
            return self[case]

    return Exported()


@pytest.mark.parametrize("case", CASES)
def test_lowering_adds_no_error_on_the_real_model(exported, case):
    """The artifact vs the eager model of its scheme, token by token on prose, code and chat.

    Dynamic int8 activations (every case's scheme) round where float order tips a value over a step, so
    the artifacts are held to the noise checks of conftest.check_lowering_adds_only_noise."""
    manifest, model = exported[case]
    prompts = golden.load(manifest["path"] + "/golden.npz")[:3]
    check_lowering_adds_only_noise(prompts, model, api.open_runner(manifest), SCHEMES[CASES[case][1]], case)


@pytest.mark.parametrize("case", CASES)
def test_accuracy_vs_fp32_is_measured(exported, case):
    manifest, _ = exported[case]
    prompts = golden.load(manifest["path"] + "/golden.npz")
    o = evaluate(prompts, runner_logits(api.open_runner(manifest)), window=512)["overall"]
    print(f"{case} {CASES[case][1]} vs fp32: mean KLD {o['mean_kld']:.4f} top-1 {o['top1']:.4f}")
    band = SCHEMES[CASES[case][1]].band
    # the scheme's band, as on XNNPACK (int4 0.0111 / 94.29%, int8 0.00034 / 99.17%; litert and onnx alike)
    assert o["mean_kld"] <= band.mean_kld and o["top1"] >= band.top1, o


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
