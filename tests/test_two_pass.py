"""The two-pass head (edge/quant/two_pass.py, scheme int4-2pass): the table kept exactly as two planes,
the recomputed rows exact, and the high plane stored once in the bundle for the head and the lookup."""

import numpy as np
import pytest
import torch

from edge.quant.two_pass import BLOCK, PlaneLookup, Planes, TwoPassHead, top_rows


def _table(v=4096, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (v, d), generator=g).to(torch.int8)
    q[0, 0], q[1, 1] = -128, 127  # both ends of the range
    return q, torch.rand(v, 1, generator=g) * 1e-2 + 1e-3


@pytest.mark.parametrize("v, k", [(4096, 64), (4096, 256), (4096 + 8, 64), (64, 8)])
def test_top_rows_are_the_exact_top_k(v, k):
    scores = torch.randn(3, v, generator=torch.Generator().manual_seed(v + k))
    want = scores.topk(k, dim=-1).indices
    got = top_rows(scores, k)
    assert got.shape == (3, k)
    for w, g in zip(want, got, strict=True):
        assert set(w.tolist()) == set(g.tolist())


def test_the_planes_hold_the_table_exactly_in_xnnpacks_4_bit_bytes():
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor

    q, s = _table()
    planes = Planes(q, s)
    ids = torch.tensor([[0, 1, 5], [4095, 7, 7]])
    assert torch.equal(planes.rows(ids), q[ids].float())
    look = PlaneLookup(planes)(ids)
    assert torch.equal(look, q[ids].float() * s.reshape(-1)[ids].unsqueeze(-1))
    # the high plane's bytes are what XNNPACK serializes for the head's 4-bit weights: one copy in model.ptd
    high = ((q.to(torch.int16) + 128) >> 4) - 8
    assert torch.equal(planes.high, NodeVisitor.convert_to_qc4w(high.to(torch.int8)))


def test_the_head_recomputes_its_best_rows_exactly_and_estimates_the_rest():
    q, s = _table()
    head = TwoPassHead(q, s, rows=64).eval()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = head(x)
    exact = x @ (q.float() * s).T
    high = ((q.to(torch.int16) + 128) >> 4).float()
    low = ((q.to(torch.int16) + 128) & 15).float()
    with torch.no_grad():
        first = head.high(x) + head.low_mean * x.sum(-1, keepdim=True)
    for n in range(5):
        best = exact[n].topk(8).indices
        assert torch.allclose(got[n, best], exact[n, best], rtol=1e-5, atol=1e-5)  # among the recomputed
        assert got[n].argmax() == exact[n].argmax()
        # elsewhere the first pass as is: the high plane (dynamic int8 activations), the low plane's row mean
        others = torch.ones(exact.shape[1], dtype=torch.bool)
        others[top_rows(first[n : n + 1], 64)[0]] = False
        assert torch.equal(got[n, others], first[n, others])
        estimate = (x[n] @ (16 * (high - 8) + low.mean(1, keepdim=True)).T) * s.reshape(-1)
        assert (first[n] - estimate).abs().max() < 0.2 * estimate.abs().max()  # up to the activations' rounding
        assert (got[n, others] - exact[n, others]).abs().max() > 0.05 * exact[n].abs().max()  # estimated
    assert BLOCK * 64 <= q.shape[0]  # the two-stage top-k was the path taken


def test_the_high_plane_lowers_exactly(tmp_path):
    """The first pass alone, lowered = eager to float rounding: XNNPACK stores a 4-bit per-channel linear's
    scales in bf16 (as one group of the whole row), so the eager head rounds them the same way (with fp32
    scales the two differed by 1.8e-3 of the output)."""
    from executorch.runtime import Runtime

    from edge.targets import BACKENDS
    from edge.targets.executorch import lower_module

    q, s = _table(v=2048, d=640)
    high = TwoPassHead(q, s, 64).high
    x = torch.randn(3, 640, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "high.pte"
    path.write_bytes(lower_module(high, (x,), BACKENDS["xnnpack"]))
    got = Runtime.get().load_program(str(path)).load_method("forward").execute([x])[0]
    want = high(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-6


def _kld(p_logits, q_logits) -> float:
    p, q = (np.exp(z - z.max()) / np.exp(z - z.max()).sum() for z in (p_logits.astype(np.float64), q_logits))
    return float((p * (np.log(p) - np.log(q))).sum())


def test_a_two_pass_bundle_stores_the_high_plane_once_and_lowers_like_eager(tmp_path, monkeypatch, capsys):
    """Lowered vs eager, against the int4 bundle's own lowered vs eager (dynamic int8 activations make the
    random tiny model chaotic: conftest.check_lowering_adds_only_noise says why no fixed bound holds).

    Rows near the K-th of the first pass may be recomputed in one and estimated in the other: so the best
    rows are compared value by value, the whole distribution by its KLD. Both schemes share one quantization
    cache entry (int4's tensors, split afterwards)."""
    from edge import api
    from edge.quant import cache

    monkeypatch.setenv("EDGE_QUANT_CACHE", str(tmp_path / "quant"))
    from edge.runtime.eager import EagerRunner

    ids = [2, 40, 41, 42, 1000, 7, 99, 3]
    made, top_err, kld = {}, {}, {}
    for scheme in ("int4-2pass", "int4"):
        held = {}
        made[scheme] = m = api.export(
            "tiny-test", "linux", "xnnpack", scheme, out=tmp_path / scheme, random_weights=True, max_seq_len=64,
            on_quantized=lambda model, held=held: held.setdefault("model", model),
        )  # fmt: skip
        err = capsys.readouterr().err
        assert ("quantized tensors from the cache" in err) == (scheme == "int4"), err[-2000:]
        want = EagerRunner(held["model"]).all_logits(ids)
        runner = api.open_runner(m)
        got = [runner.prefill(ids[:1])] + [runner.decode(t) for t in ids[1:]]
        top_err[scheme] = kld[scheme] = 0.0
        for w, g in zip(want, got, strict=True):
            best = np.argsort(w)[-16:]
            assert g.argmax() == w.argmax(), scheme
            top_err[scheme] = max(top_err[scheme], float(abs(g[best] - w[best]).max() / abs(w[best]).max()))
            kld[scheme] = max(kld[scheme], _kld(w, g))
    assert top_err["int4-2pass"] <= 3 * top_err["int4"] + 1e-3, top_err
    assert kld["int4-2pass"] <= 3 * kld["int4"] + 1e-4, kld
    assert any("two_pass" in r for r in made["int4-2pass"]["quant"]["coverage"])
    assert [e["scheme"] for e in cache.entries()] == ["int4"]
    # int4: the int8 table once (v * d bytes). Two-pass: its two planes (v * d / 2 each) and three (v,) float
    # vectors (scales, 16x scales, the low plane's row means); the high plane twice would add v * d / 2.
    v, d = 262_144, 64
    ptd = {k: (tmp_path / k / "model.ptd").stat().st_size for k in made}
    assert ptd["int4-2pass"] - ptd["int4"] < v * 4 * 4 < v * d // 2, ptd
