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
def gpu_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "b"
    return api.export("tiny-test", "android", "litert-gpu", random_weights=True, max_seq_len=MAX_SEQ, out=out)


def test_litert_gpu_bundle_reports_what_each_gpu_delegate_takes(gpu_bundle):
    """The real operators of our .tflite: ML Drift (LiteRT's GPU accelerator) takes the KV cache write
    (DYNAMIC_UPDATE_SLICE) and the lookup (EMBEDDING_LOOKUP); the classic delegate has no parser for
    either, so the check must name them."""
    assert gpu_bundle["quant"]["scheme"]["name"] == "fp32" and gpu_bundle["backend"] == "litert-gpu"
    gpu = gpu_bundle["delegation"]["gpu"]
    for d in ("ml_drift", "classic"):
        assert gpu[d]["supported"] + sum(r["count"] for r in gpu[d]["refused"]) == gpu[d]["operators"] > 100
    assert sum(gpu["ops"].values()) == gpu["ml_drift"]["operators"]
    classic = {r["op"] for r in gpu["classic"]["refused"]}
    assert {"DYNAMIC_UPDATE_SLICE", "EMBEDDING_LOOKUP"} <= classic
    drift = {r["op"] for r in gpu["ml_drift"]["refused"]}
    assert not drift & {"DYNAMIC_UPDATE_SLICE", "EMBEDDING_LOOKUP", "FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX"}
    assert "fp32" in gpu["precision"]


def test_litert_gpu_bundle_runs_here_like_eager(gpu_bundle):
    """No GPU here: the same program on LiteRT's CPU equals the eager model."""
    from edge.models.loading import load_weights
    from edge.models.variants import get_variant

    eager = EagerRunner(load_weights(get_variant("tiny-test"), None, True, 0).build(MAX_SEQ))
    tfl = api.open_runner(gpu_bundle)
    prompt = list(range(5, 15))
    np.testing.assert_allclose(tfl.prefill(prompt), eager.prefill(prompt), atol=1e-3)
