"""--backend litert-gpu: the GPU delegates' operator check (edge/targets/gpu_ops.py) and the bundle."""

import numpy as np
import pytest

from edge import api
from edge.runtime.eager import EagerRunner
from edge.targets import gpu_ops

MAX_SEQ = 64


def fake_ops(monkeypatch, ops):
    monkeypatch.setattr(gpu_ops, "_ops", lambda _buf: iter(ops))


def refused(report, delegate):
    return {(r["op"], r["count"]) for r in report[delegate]["refused"]}


def test_check_applies_each_delegates_parser_version_and_rank(monkeypatch):
    fake_ops(
        monkeypatch,
        [
            ("decode", "ADD", 1, 3, None),
            ("decode", "ADD", 3, 3, None),  # classic parses ADD up to v2, ML Drift up to v6
            ("decode", "DYNAMIC_UPDATE_SLICE", 1, 4, None),  # no classic parser
            ("decode", "MUL", 1, 5, None),  # a rank-5 tensor: neither
            ("decode", "FULLY_CONNECTED", 5, 2, "INT4"),  # the classic parser has no int4 case
            ("decode", "FULLY_CONNECTED", 5, 2, "FLOAT32"),
            ("decode", "CUSTOM:foo", 1, 2, None),  # unknown: neither
        ],
    )
    r = gpu_ops.check(b"")
    assert r["ops"]["ADD"] == 2 and r["ml_drift"]["operators"] == r["classic"]["operators"] == 7
    assert refused(r, "ml_drift") == {("MUL", 1), ("CUSTOM:foo", 1)}
    classic = {("ADD", 1), ("DYNAMIC_UPDATE_SLICE", 1), ("MUL", 1), ("FULLY_CONNECTED", 1), ("CUSTOM:foo", 1)}
    assert refused(r, "classic") == classic
    assert r["ml_drift"]["supported"] == 5 and r["classic"]["supported"] == 2


@pytest.fixture(scope="module")
def gpu_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")

    class Bundles(dict):
        def __missing__(self, q):
            kw = dict(random_weights=True, max_seq_len=MAX_SEQ, out=root / q)
            self[q] = api.export("tiny-test", "android", "litert-gpu", None if q == "default" else q, **kw)
            return self[q]

    return Bundles()


def eager(scheme):
    from edge.models.loading import load_weights
    from edge.models.variants import get_variant
    from edge.quant.apply import quantize_model
    from edge.quant.schemes import SCHEMES

    model = load_weights(get_variant("tiny-test"), None, True, 0).build(MAX_SEQ)
    quantize_model(model, SCHEMES[scheme])
    return EagerRunner(model)


def test_litert_gpu_bundle_reports_what_each_gpu_delegate_takes(gpu_bundles):
    """The real operators of our .tflite: ML Drift (LiteRT's GPU accelerator) takes the KV cache write
    (DYNAMIC_UPDATE_SLICE) and the lookup (EMBEDDING_LOOKUP); the classic delegate has no parser for
    either, so the check must name them."""
    b = gpu_bundles["default"]
    assert b["quant"]["scheme"]["name"] == "fp16" and b["backend"] == "litert-gpu"
    gpu = b["delegation"]["gpu"]
    for d in ("ml_drift", "classic"):
        assert gpu[d]["supported"] + sum(r["count"] for r in gpu[d]["refused"]) == gpu[d]["operators"] > 100
    assert sum(gpu["ops"].values()) == gpu["ml_drift"]["operators"]
    assert gpu["ops"]["DEQUANTIZE"] >= 2  # the fp16 weights, read by the delegates directly
    classic = {r["op"] for r in gpu["classic"]["refused"]}
    assert {"DYNAMIC_UPDATE_SLICE", "EMBEDDING_LOOKUP"} <= classic
    drift = {r["op"] for r in gpu["ml_drift"]["refused"]}
    assert not drift & {"DYNAMIC_UPDATE_SLICE", "EMBEDDING_LOOKUP", "FULLY_CONNECTED", "BATCH_MATMUL", "DEQUANTIZE"}
    assert "fp32" in gpu["precision"]


@pytest.mark.parametrize("scheme", ["fp32", "fp16"])
def test_litert_gpu_bundle_runs_here_like_eager(gpu_bundles, scheme):
    """No GPU here: the same program on LiteRT's CPU equals the eager model of its scheme (fp16: the
    weights rounded to fp16 in torch, so the .tflite's fp16 constants are those values exactly)."""
    b = gpu_bundles[scheme]
    tfl, ref = api.open_runner(b), eager(scheme)
    want = ref.prefill(list(range(5, 15)))
    np.testing.assert_allclose(tfl.prefill(list(range(5, 15))), want, atol=1e-3)
    for _ in range(12):  # past the sliding window (8)
        tok = int(want.argmax())
        want = ref.decode(tok)
        np.testing.assert_allclose(tfl.decode(tok), want, atol=1e-3)


def test_fp16_weights_halve_the_litert_program(gpu_bundles):
    fp32, fp16 = (gpu_bundles[q]["files"]["model.tflite"]["bytes"] for q in ("fp32", "fp16"))
    assert 0.45 < fp16 / fp32 < 0.55, (fp16, fp32)
    assert {r["scheme"] for r in gpu_bundles["fp16"]["quant"]["coverage"]} == {"fp16"}
