"""The real 270M through the whole ExecuTorch chain: each bundle exported once per session."""

import numpy as np
import pytest
import torch

from conftest import check_lowering_adds_only_noise
from edge import api
from edge import bundle as bundle_mod
from edge.models.tokenizer import Tokenizer
from edge.quant.schemes import SCHEMES
from edge.targets import TARGETS
from edge.validate import golden
from edge.validate.stages import evaluate, runner_logits

pytestmark = pytest.mark.slow

DEFAULT = TARGETS["android"].default_quant  # int4-2pass: what `edge export --target android` gives users
# CI (`make test`) exports the android default; `make test-full` adds int8 and the one-pass int4 (int4's
# quantization is the default's, shared through the session's quantization cache: only the lowering repeats).
INT4S = [pytest.param("int4", marks=pytest.mark.full), DEFAULT]
ALL = [pytest.param("int8", marks=pytest.mark.full), *INT4S]


class _Bundles(dict):
    """Each real bundle exported on first use, once per session (int8 only in the full suite)."""

    def __init__(self, root):
        super().__init__()
        self.root = root
        self.models = {}

    def __missing__(self, q):
        self[q] = api.export("270m", "android", quant=q, out=self.root / q, on_quantized=self.keep(q))
        return self[q]

    def keep(self, q):
        def hold(model):
            self.models[q] = model  # the very module that was lowered: quantizing is minutes (GPTQ)

        return hold


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    return _Bundles(tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="session")
def quantized_eager(bundles):
    """The eager model of each scheme, the very module `edge export` lowered: what the .pte must equal."""

    class Models(dict):
        def __missing__(self, q):
            bundles[q]  # exports it, if not yet
            self[q] = bundles.models[q]
            return self[q]

    return Models()


@pytest.fixture(scope="session")
def lowered_vs_golden(bundles):
    """Each bundle's .pte on the golden prompts vs the fp32 reference logits stored in golden.npz."""

    class Results(dict):
        def __missing__(self, q):
            path = bundles[q]["path"]
            prompts = golden.load(bundle_mod.load(path)["path"] + "/golden.npz")
            self[q] = evaluate(prompts, runner_logits(api.open_runner(bundle_mod.load(path))), window=512)
            print(q, "lowered vs fp32:", self[q]["overall"])
            return self[q]

    return Results()


@pytest.mark.parametrize("q", INT4S)
def test_int4_meets_its_kld_band(q, lowered_vs_golden):
    """The lowered int4 schemes vs fp32: within the whole band, mean KLD 0.03 and top-1 92% (docs/quantization.md
    for its history; before the mixed scheme: all-int4 HQQ + SmoothQuant 0.244 / 70.5%, round-to-nearest 0.68 / 55%)."""
    o = lowered_vs_golden[q]["overall"]
    band = SCHEMES[q].band
    assert o["mean_kld"] <= band.mean_kld, o
    assert o["top1"] >= band.top1, o
    assert set(lowered_vs_golden[q]) >= {"within_window", "past_window"}


@pytest.mark.parametrize("q", INT4S)
def test_int4_fits_in_the_ggufs_size(q, bundles):
    """The int4 bundle's model files take no more bytes than the Q4_K_M GGUF it came from (with fp32 Q4_K
    offsets it was 0.47 MB over); the two-pass head adds its high plane's per-row scale and mean (6 bytes a row)."""
    from edge.models.loading import embedded_gguf

    files = bundles[q]["files"]
    size = files["model.pte"]["bytes"] + files["model.ptd"]["bytes"]
    extra = 8 * bundles[q]["arch"]["vocab_size"] if SCHEMES[q].head_exact_rows else 0
    assert size <= embedded_gguf().stat().st_size + extra, size


@pytest.mark.parametrize("q", INT4S)
def test_int4_crosses_about_one_delegate_call_per_layer(q, bundles):
    """Each kernel outside XNNPACK between two delegated ops costs a call (docs/speed.md): the cache
    writes need one per layer; activation slices (slice_copy of a dynamic-shape input) cost 27 more; the
    two-pass head's selection (two topk, the gathers, the scatter: portable kernels) six, and its recomputation
    takes the head input's even and odd columns (two slices of a (1, 640) row, Planes.dot)."""
    d = bundles[q]["delegation"]
    layers = bundles[q]["arch"]["n_layers"]
    two_pass = bool(SCHEMES[q].head_exact_rows)
    assert d["delegate_calls"] <= layers + 3 + (6 if two_pass else 0), d
    slices = sum(n for op, n in d["ops_outside_delegate"].items() if "slice_copy" in op)
    assert slices == (2 if two_pass else 0), d


@pytest.mark.parametrize("q", ALL)
def test_lowering_adds_no_error_on_the_real_model(q, bundles, quantized_eager):
    """The .pte (token by token) vs the eager model of the same scheme (one prefill), teacher-forced
    on prose, code and chat (229 positions; eager's floor, token by token, on the first): within
    the dynamic activations' noise (conftest.check_lowering_adds_only_noise), and each quantized
    linear lowers exactly (the next test)."""
    prompts = golden.load(bundles[q]["path"] + "/golden.npz")[:3]
    pte = api.open_runner(bundle_mod.load(bundles[q]["path"]))
    check_lowering_adds_only_noise(prompts, quantized_eager[q], pte, SCHEMES[q], q)


def float_magnitude(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The size of the float sums a linear's kernels add up: what their rounding error scales with.

    A float dot product's error is bounded by eps * sum |a_i b_i| (Higham, ch. 3), not by |sum a_i b_i|.
    XNNPACK's dynamic-activation 4-bit group kernels (qb4w) sum (q_x - zp) * w as q_x * w - zp * w (the
    zero point folded in float; its per-channel int8 kernel folds it exactly in int32: a looser bound there),
    so what they add up is |W| |x + zp * scale|: with activations far from symmetric
    (a 270M mlp.down input) that is ~300x |W x|, and the lowered output sits ~5e-6 from eager
    relative to |W x| while within 2e-8 of it relative to the sums -- float rounding, not a
    lowering error. Measured on random 4-bit weights: 1e-8 to 4e-8 for symmetric, outlier-skewed
    and all-positive inputs alike (a dropped or misrounded scale is > 1e-4).
    """
    from edge.quant.split import ActResidual, ColumnSplitLinear, OffsetLinear, PlaneSum

    if isinstance(mod, ActResidual):  # two rows: x and its rounding residual
        return float_magnitude(mod.lin, x) + float_magnitude(mod.lin, x - mod.rounded(x))
    if isinstance(mod, PlaneSum):
        return float_magnitude(mod.hi, x) + float_magnitude(mod.lo, x)
    if isinstance(mod, OffsetLinear):
        sums = x.abs().unflatten(-1, (mod.in_features // mod.group, mod.group)).sum(-1)
        return float_magnitude(mod.main, x) + sums @ mod.offsets.abs().T
    if isinstance(mod, ColumnSplitLinear):
        g = mod.group
        return sum(float_magnitude(p, x[..., i * g : (i + 1) * g]) for i, p in enumerate(mod.parts))
    w = mod.weight
    if hasattr(w, "dequantize"):  # torchao: a dynamic int8 activation shifts x by XNNPACK's zero point
        w = w.dequantize()
        if getattr(mod.weight, "activation_quantization", None) is not None:
            lo = x.amin(-1, keepdim=True).clamp(max=0)
            hi = x.amax(-1, keepdim=True).clamp(min=0)
            x = x.abs() + torch.maximum(lo.abs(), hi)  # |x + zp * scale| <= |x| + max(|lo|, hi)
    return x.abs() @ w.abs().T


@pytest.mark.parametrize("q", ALL)
def test_each_quantized_linear_lowers_exactly(q, quantized_eager, tmp_path):
    """Real weights, real activations: one linear of each kind (and the head) lowered alone = eager,
    to float rounding of the sums its kernels add (float_magnitude)."""
    from executorch.runtime import Runtime

    from edge.targets import BACKENDS
    from edge.targets.executorch import lower_module

    m = quantized_eager[q]
    seen = {}
    mods = dict(m.named_modules())
    # a two-pass head's selection moves rows near its 512th between exact and estimated (the lowering check
    # covers it); its 4-bit pass is a quantized linear
    head = "lm_head.high" if "lm_head.high" in mods else "lm_head"
    names = ["layers.0.attn.wq", "layers.0.attn.wo", "layers.9.mlp.up", "layers.9.mlp.down", head]
    hooks = [mods[n].register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, a[0].clone())) for n in names]
    m.reset_cache()
    m(torch.tensor([[2, 651, 5279, 529, 7001, 563, 236743, 100, 5000]]), torch.tensor([0]))
    for h in hooks:
        h.remove()
    for n in names:
        x = seen[n]
        want = mods[n](x)
        path = tmp_path / f"{n}.pte"
        path.write_bytes(lower_module(mods[n], (x,), BACKENDS["xnnpack"]))
        got = Runtime.get().load_program(str(path)).load_method("forward").execute([x])[0]
        err = (got - want).norm()
        rel, rel_sums = (err / want.norm()).item(), (err / float_magnitude(mods[n], x).norm()).item()
        print(
            f"{q} {n} ({type(mods[n]).__name__}): |x| max {x.abs().max():.1f}, lowered vs eager {rel:.1e} "
            f"relative to the output, {rel_sums:.1e} to the sums"
        )
        assert rel_sums < 2e-7 and rel < 1e-4, (n, rel, rel_sums)


@pytest.mark.full
def test_int8_meets_its_band(lowered_vs_golden):
    """Issue 7's int8 band (0.002 / 98%). Measured: lowered 0.00034 / 99.17%, equal to eager (ActResidual,
    exact source grids); 0.0027 / 97.6% with SmoothQuant and per-row activations before."""
    o = lowered_vs_golden["int8"]["overall"]
    band = SCHEMES["int8"].band
    assert o["mean_kld"] <= band.mean_kld and o["top1"] >= band.top1, o


@pytest.mark.full
def test_int8_is_close_to_fp32_and_int4_is_measured(lowered_vs_golden):
    i8, i4 = lowered_vs_golden["int8"]["overall"], lowered_vs_golden["int4"]["overall"]
    # The levers' gains guarded: rtn per-channel 0.020 / 91.8%; the residual alone 0.0051 / 94.4%, + exact
    # grids and the head in the Q8_0 table's slices 0.00084 / 98.2%, + mlp.down g128 0.00034 / 99.17%
    assert i8["mean_kld"] < 0.0006 and i8["top1"] > 0.985
    assert i4["mean_kld"] > i8["mean_kld"]
    assert set(lowered_vs_golden["int8"]) >= {"within_window", "past_window"}


def test_stock_executorch_runner_loads_the_bundle_unchanged(bundles, quantized_eager):
    """TextLLMRunner is the C++ runner that Android's LlmModule and iOS's TextRunner wrap."""
    import executorch.kernels.quantized  # noqa: F401  (the stock apps link these kernels too)
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    b = bundles[DEFAULT]["path"]
    prompt = "The capital of France is"
    pieces: list[str] = []
    data = bundles[DEFAULT]["io"].get("weights_file")  # model.ptd, when the weights are outside the .pte
    runner = TextLLMRunner(b + "/model.pte", b + "/tokenizer.model", b + "/" + data["file"] if data else None)
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=12, temperature=0.0, num_bos=1),
                    token_callback=pieces.append)  # fmt: skip
    tok = Tokenizer(b + "/tokenizer.model")
    ours = api.generate(prompt, bundle=b, max_new_tokens=12)
    text = "".join(pieces)
    print("stock runner:", repr(text), "| ours:", repr(ours.text))
    assert text.strip() and text.strip() == ours.text.strip()
    assert tok.encode(prompt)[0] == 2


def test_generate_bundle_follows_the_eager_quantized_model(bundles, quantized_eager):
    """`edge generate --bundle`'s greedy tokens, teacher-forced through the eager model of the default: each
    is the eager argmax, or a near-tie with it (the dynamic-activation noise floor can flip a
    near-tie; a broken artifact picks tokens the eager model does not rank near the top)."""
    from edge.runtime.eager import EagerRunner

    b = bundles[DEFAULT]["path"]
    via_pte = api.generate("def fibonacci(n):", bundle=b, max_new_tokens=16)
    seq = via_pte.prompt_ids + via_pte.output_ids
    logits = EagerRunner(quantized_eager[DEFAULT]).all_logits(seq)[len(via_pte.prompt_ids) - 1 : -1]
    chosen = logits[np.arange(len(via_pte.output_ids)), via_pte.output_ids]
    margin = logits.max(-1) - chosen  # 0 where the bundle picked the eager argmax
    print(
        "bundle text:", repr(Tokenizer(b + "/tokenizer.model").decode(via_pte.output_ids)), "margins", margin.round(2)
    )
    assert len(via_pte.output_ids) >= 8
    assert (margin == 0).mean() >= 0.75 and margin.max() < 1.0, margin
