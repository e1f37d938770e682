"""SmoothQuant-style equalization, folded exactly into an fp32 Gemma before 8da8w quantization.

XNNPACK runs int8 linears as "8da8w": int8 weights and dynamic per-token int8 activations. A
per-token activation scale is set by the token's largest channel, so a few outlier channels
flatten every other channel onto a handful of int8 levels. SmoothQuant divides each input
channel j of a linear by s_j and multiplies the weight's column j by s_j: the product is the
same, the activation gets flatter and the weight absorbs the outlier, where per-group int8
quantization loses little. Here every division is folded into an op that already exists, so
the fp32 model computes the same function (up to rounding) and the exported graph is unchanged:

- q/k/v input = attn_norm(x) = rms(x) * (1 + g): g <- (1 + g) / s - 1; wq, wk, wv columns * s
  (one s shared by the three). With Gemma 3's QK-norm only the input side is foldable: q and k
  are normalized per head after wq/wk, so scaling their output rows would not be exact.
- gate/up input = mlp_norm(x): the same with mlp_norm, gate and up.
- down input = gelu(gate x) * (up x): up's rows / s, down's columns * s.
- wo input = softmax(qk) @ v per head: wv's rows / s, wo's columns * s for every query head of
  that kv head (query heads j*G .. j*G+G-1 share kv head j, so s is shared across them).
- lm_head input = norm(x): the final norm and the head's columns, which unties the head from
  the embedding (the head gets its own weight; the embedding keeps the original).

s is chosen per channel from calibration activations: s_j = rms(X_j)^alpha / rms(W_:,j)^(1-alpha)
(the SmoothQuant rule with RMS statistics), alpha per site from a small grid: the one that
minimizes the site's measured 8da8w (or 8da4w) output error on the calibration tokens.

Why: measured on the 270M (mean KLD vs fp32 on the golden prompts, eager): int8 (8da8w
per-channel) 0.0191 -> 0.0058, int4 (8da4w g32 HQQ) 0.414 -> 0.243. It also damps the chaos of
dynamic activation quantization (see edge/quant/apply.py): eager vs eager with 1e-6 relative
noise on the embedding, int8 0.021 -> 0.0043 mean KLD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Calibration text: composed for this purpose, varied (prose, dialogue, code, lists, numbers, a
# letter, instructions) and unrelated to any evaluation text. Each entry is one sequence with BOS.
CALIBRATION_TEXTS: tuple[str, ...] = (
    "Bread dough needs time more than it needs effort. Mix five hundred grams of strong flour with "
    "ten grams of salt, seven grams of dried yeast and about three hundred and fifty millilitres of "
    "warm water. Knead it for ten minutes, until it feels smooth and springs back when you press it, "
    "then cover the bowl and leave it somewhere warm for an hour. When it has doubled, knock it back, "
    "shape it into a loaf and let it rise again before baking at 220 degrees for thirty minutes.",
    "Photosynthesis converts light energy into chemical energy. In the chloroplasts of a leaf, "
    "chlorophyll absorbs mostly red and blue light, which drives the splitting of water molecules "
    "and releases oxygen as a by-product. The energy captured in this way is stored in ATP and NADPH, "
    "which the Calvin cycle then uses to fix carbon dioxide into sugars. Without this process there "
    "would be almost no free oxygen in the atmosphere, and most food chains on Earth would collapse.",
    'import json\nfrom pathlib import Path\n\n\ndef load_config(path: str) -> dict:\n    """Read a JSON '
    'config file and fill in defaults."""\n    data = json.loads(Path(path).read_text())\n    data.setdefault'
    '("timeout", 30)\n    data.setdefault("retries", 3)\n    if data["retries"] < 0:\n        raise ValueError'
    "(f\"retries must be >= 0, got {data['retries']}\")\n    return data\n\n\nfor key, value in sorted(load_config"
    '("settings.json").items()):\n    print(f"{key:>12} = {value!r}")\n',
    '"Are you sure this is the right platform?" asked Maya, looking at the departures board.\n'
    '"It says Edinburgh, doesn\'t it?" her brother replied, without looking up from his phone.\n'
    '"It says Edinburgh Waverley, via Newcastle, and it left twelve minutes ago."\n'
    "He finally looked up. For a moment neither of them spoke. Then he laughed, picked up both bags, "
    "and said that at least the next one would be less crowded.",
    "Dear Dr. Okafor,\n\nThank you for your letter of 14 March. I am pleased to confirm that the committee "
    "has approved your request for an extension until the end of September. Please note that the final "
    "report must still include the budget summary (Appendix B) and the signed ethics form. If you have "
    "any questions, contact the office on 0161 555 0199 or reply to this email.\n\nKind regards,\nJ. Lindqvist",
    "Key facts about the planets:\n1. Mercury: closest to the Sun, a year of 88 days.\n2. Venus: surface "
    "hotter than 460 °C because of its thick CO2 atmosphere.\n3. Mars: two small moons, Phobos and Deimos.\n"
    "4. Jupiter: more than twice as massive as all the other planets combined.\n5. Saturn: its rings are "
    "mostly ice, some pieces as small as dust, others as large as houses.",
    "Le marché ouvre à sept heures. Ich habe keine Zeit, aber ich komme morgen. 我们明天见。"
    " ¿Dónde está la estación? SELECT name, COUNT(*) AS n FROM orders WHERE total > 100 GROUP BY name "
    "ORDER BY n DESC LIMIT 10; The equation e^(i*pi) + 1 = 0 links five fundamental constants.",
    "To replace a bicycle inner tube, first release the brake and remove the wheel. Let out any remaining "
    "air, then use two tyre levers to lift one side of the tyre over the rim. Pull out the old tube and run "
    "your fingers carefully around the inside of the tyre to find whatever caused the puncture, such as a "
    "thorn or a sliver of glass. Inflate the new tube slightly, tuck it in, and work the tyre back on by hand.",
)


def calibration_ids(tokenizer, texts: Iterable[str] = CALIBRATION_TEXTS) -> list[list[int]]:
    """The calibration sequences as token ids, each starting with BOS."""
    return [tokenizer.encode(t) for t in texts]


# --- 8da8w numerics (as torchao's Int8DynamicActivationIntxWeightConfig computes them) --------------


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """Per-token asymmetric int8 (scale = range / 255, zero point), quantized and dequantized."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).smallest_normal)
    zp = (-128 - torch.round(lo / scale)).clamp(-128, 127)  # torchao's rounding, bit for bit
    q = (torch.round(x * (1.0 / scale)) + zp).clamp(-128, 127)
    return (q - zp) * scale


def fake_quant_weight(w: torch.Tensor, bits: int = 8, group: int | None = 32) -> torch.Tensor:
    """Symmetric per-group quantization along the input dimension (group None: per row), quantized and dequantized."""
    out_f, in_f = w.shape
    group = group or in_f
    if in_f % group:
        return w  # quantize_model keeps such a linear in fp32 (see the coverage report)
    g = w.reshape(out_f, in_f // group, group)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = (g.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)).clamp(min=torch.finfo(torch.float32).smallest_normal)
    return (torch.round(g * (1.0 / scale)).clamp(qmin, qmax) * scale).reshape(out_f, in_f)


def row_sample(w: torch.Tensor, max_rows: int = 16384) -> torch.Tensor:
    """An evenly strided subset of at most max_rows rows (a view): the head's error estimate."""
    return w[:: -(-w.shape[0] // max_rows)] if w.shape[0] > max_rows else w


def quant_error(
    x: torch.Tensor, weights: Sequence[torch.Tensor], bits: int = 8, group: int = 32, max_rows: int = 16384
) -> float:
    """Relative squared error of the 8da(bits)w outputs of linears sharing input x (N, in).

    A weight with more than max_rows output rows (the head) is measured on an evenly strided subset.
    """
    xq = fake_quant_act(x)
    num = den = 0.0
    for w in weights:
        w = row_sample(w, max_rows)
        ref = x @ w.T
        num += (xq @ fake_quant_weight(w, bits, group).T - ref).pow(2).sum().item()
        den += ref.pow(2).sum().item()
    return num / max(den, 1e-30)


# --- calibration ----------------------------------------------------------------------------------------


@torch.no_grad()
def _capture_inputs(model: nn.Module, calib_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Inputs (N, in) of the first linear of every site over all calibration tokens."""
    wanted = ("attn.wq", "attn.wo", "mlp.gate", "mlp.down")
    names = {mod: name for name, mod in model.named_modules() if name.endswith(wanted)}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in [*names.values(), "lm_head"]}

    def keep(name: str, x: torch.Tensor) -> None:
        seen[name].append(x.reshape(-1, x.shape[-1]).detach().float().clone())

    handles = [mod.register_forward_pre_hook(lambda mod, args: keep(names[mod], args[0])) for mod in names]
    # The head's input is the final norm's output: taken there, so that the forward can skip the
    # (T, vocab) head matmul of every position but the last.
    handles.append(model.norm.register_forward_hook(lambda mod, args, out: keep("lm_head", out)))
    try:
        calibration_pass(model, calib_ids)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items() if v}


class _Stopped(Exception):
    pass


def _stop(mod, args, out):
    raise _Stopped


@torch.no_grad()
def calibration_pass(model: nn.Module, calib_ids: Sequence[Sequence[int]], stop_after: nn.Module | None = None) -> None:
    """Run every calibration sequence from an empty cache (for the hooks that watch it); cache left empty.

    stop_after: a submodule after which nothing matters to the hooks: each forward ends there.
    """
    handle = stop_after.register_forward_hook(_stop) if stop_after is not None else None
    try:
        for ids in calib_ids:  # cut to the cache: statistics need realistic activations, not whole texts
            model.reset_cache()
            try:
                model(torch.tensor([list(ids)[: model.max_seq_len]]), torch.tensor([0]))
            except _Stopped:
                pass
    finally:
        if handle is not None:
            handle.remove()
        model.reset_cache()


# --- the folds ------------------------------------------------------------------------------------------


@dataclass
class _Site:
    """One smoothing site: the linears reading one input, and how to fold 1/s into what produces it."""

    name: str
    x: torch.Tensor  # calibration input (N, in) of the consumers
    consumers: list[nn.Linear]
    fold: Callable[[torch.Tensor], None]  # divides the producer's output by s (in, )
    # Channels that must share one scale (wo's query heads of one kv head): tie maps a per-channel
    # statistic to one per free scale (max over the tied channels), untie maps free scales back.
    tie: Callable[[torch.Tensor], torch.Tensor] = lambda v: v
    untie: Callable[[torch.Tensor], torch.Tensor] = lambda v: v

    def share(self, v: torch.Tensor) -> torch.Tensor:
        return self.untie(self.tie(v))


def _set_weight(mod: nn.Module, w: torch.Tensor) -> None:
    # A new Parameter, never an in-place op: loaded models share storage with their tensor dict.
    mod.weight = nn.Parameter(w.contiguous(), requires_grad=False)


def _fold_into_norm(norm: nn.Module) -> Callable[[torch.Tensor], None]:
    def fold(s: torch.Tensor) -> None:
        w = norm.weight.detach().double()
        _set_weight(norm, ((1.0 + w) / s.double() - 1.0).to(norm.weight.dtype))

    return fold


def _fold_into_rows(lin: nn.Linear, expand: Callable[[torch.Tensor], torch.Tensor] = lambda s: s):
    def fold(s: torch.Tensor) -> None:
        _set_weight(lin, lin.weight.detach() / expand(s).to(lin.weight.dtype)[:, None])

    return fold


def _scale_columns(lin: nn.Linear, s: torch.Tensor) -> None:
    _set_weight(lin, lin.weight.detach() * s.to(lin.weight.dtype)[None, :])


def untie_head(model: nn.Module) -> None:
    """Give lm_head its own copy of the (tied) embedding matrix."""
    # No copy: folds replace weights (_set_weight), never write in place, so sharing storage until
    # the head is scaled is safe, and a 2B model's 2.4 GB table is not held twice meanwhile.
    if model.lm_head.weight is model.embed.weight:
        model.lm_head.weight = nn.Parameter(model.embed.weight.detach(), requires_grad=False)


def _sites(model: nn.Module, xs: dict[str, torch.Tensor], groups: set[str]) -> list[_Site]:
    cfg = model.cfg
    G, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    out = []
    for i, layer in enumerate(model.layers):
        p, a, m = f"layers.{i}.", layer.attn, layer.mlp
        if "qkv" in groups:
            out.append(_Site(p + "qkv", xs[p + "attn.wq"], [a.wq, a.wk, a.wv], _fold_into_norm(layer.attn_norm)))
        if "wo" in groups:
            # wo's input channel (h, c) of query head h = j*G + g reads v channel (j, c): share s over g.
            def tie(v: torch.Tensor, n_kv=cfg.n_kv_heads) -> torch.Tensor:
                return v.reshape(n_kv, G, hd).amax(1).reshape(-1)

            def untie(v: torch.Tensor, n_kv=cfg.n_kv_heads) -> torch.Tensor:
                return v.reshape(n_kv, 1, hd).expand(n_kv, G, hd).reshape(-1)

            def per_kv(s: torch.Tensor, n_kv=cfg.n_kv_heads) -> torch.Tensor:
                return s.reshape(n_kv, G, hd)[:, 0].reshape(-1)

            out.append(_Site(p + "wo", xs[p + "attn.wo"], [a.wo], _fold_into_rows(a.wv, per_kv), tie, untie))
        if "mlp" in groups:
            out.append(_Site(p + "gate_up", xs[p + "mlp.gate"], [m.gate, m.up], _fold_into_norm(layer.mlp_norm)))
        if "down" in groups:
            out.append(_Site(p + "down", xs[p + "mlp.down"], [m.down], _fold_into_rows(m.up)))
    if "head" in groups:
        out.append(_Site("lm_head", xs["lm_head"], [model.lm_head], _fold_into_norm(model.norm)))
    return out


GROUPS = ("qkv", "wo", "mlp", "down", "head")
ALPHA_GRID = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _tie_groups(site: _Site, g: int) -> None:
    """One free scale per g consecutive (tied) channels: the max statistic over each group."""
    tie, untie = site.tie, site.untie
    site.tie = lambda v: tie(v).reshape(-1, g).amax(1)
    site.untie = lambda v: untie(v.repeat_interleave(g))


def _scales(site: _Site, alpha: float) -> torch.Tensor:
    """s_j = a_j^alpha / w_j^(1 - alpha), a_j and w_j the channel's activation and weight-column RMS.

    SmoothQuant uses max |.|; the root mean square is less noisy on a small calibration set, and
    measured better here (270M int8, alpha searched: mean KLD 0.0058 with rms, 0.0084 with max).
    """
    x = site.x
    ax, aw = x.pow(2).mean(0).sqrt(), _column_rms([c.weight.detach() for c in site.consumers])
    ax, aw = site.share(ax).clamp(min=1e-5), site.share(aw).clamp(min=1e-5)
    return (ax.pow(alpha) / aw.pow(1 - alpha)).clamp(min=1e-5)


def _column_rms(weights: Sequence[torch.Tensor], chunk: int = 8192) -> torch.Tensor:
    """RMS of each input column over the rows of all weights, without a full-size temporary
    (the head of a 2B model is 2.4 GB: a concatenated, squared copy cost 4.7 GB more peak)."""
    total = torch.zeros(weights[0].shape[1], dtype=torch.float64)
    rows = 0
    for w in weights:
        for a in range(0, w.shape[0], chunk):
            total += w[a : a + chunk].double().pow(2).sum(0)
        rows += w.shape[0]
    return (total / rows).sqrt().float()


@torch.no_grad()
def smooth(
    model: nn.Module,
    calib_ids: Sequence[Sequence[int]],
    *,
    weight_bits: int,
    group_size: int | None,
    groups: Iterable[str] = GROUPS,
    alpha_grid: Sequence[float] = ALPHA_GRID,
    progress: Callable[[int, int], None] | None = None,
    group_sites: dict[str, int] | None = None,
) -> dict[str, dict]:
    """Fold SmoothQuant scales into an fp32 edge.models.gemma.Gemma, in place; returns a per-site report.

    Per site, the alpha of alpha_grid whose scales give the smallest measured 8da{weight_bits}w
    output error on the calibration activations wins; if none beats the unsmoothed error, the site
    is left alone (alpha None). groups: the sites to smooth, among GROUPS ("qkv", "wo", "mlp",
    "down", "head"); "head" unties lm_head from the embedding. All sites are measured on one
    capture: a fold changes the inputs of the sites downstream of it only by rounding.
    group_sites: site name -> g: that site's scales are constant over each g consecutive input
    channels, so that a consumer held on its source's grid (edge/quant/transcode.py) stays on it.
    """
    groups = set(groups)
    unknown = groups - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown smoothing groups {sorted(unknown)}; choose from {GROUPS}")
    if "head" in groups:
        untie_head(model)
    report: dict[str, dict] = {}
    xs = _capture_inputs(model, calib_ids)
    sites = _sites(model, xs, groups)
    for site in sites:
        if group_sites and site.name in group_sites:
            _tie_groups(site, group_sites[site.name])
    for i, site in enumerate(sites):
        # The error is estimated on a row sample of the head (quant_error): sample before scaling,
        # or every alpha would scale a full copy of it.
        weights = [row_sample(c.weight.detach().float()) for c in site.consumers]
        before = quant_error(site.x, weights, weight_bits, group_size)
        best = (before, None, None)
        for a in alpha_grid:
            s = _scales(site, a)
            err = quant_error(site.x / s, [w * s for w in weights], weight_bits, group_size)
            if err < best[0]:
                best = (err, a, s)
        after, chosen, s = best
        row = {"alpha": chosen, "err_before": before, "err_after": after}
        if s is not None:
            site.fold(s)
            for c in site.consumers:
                _scale_columns(c, s)
            row["s_ratio"] = (s.max() / s.min()).item()
            row["s"] = s  # the folded scales (a shared table needs the head's: edge/quant/apply.py)
        report[site.name] = row
        del site.x
        if progress:
            progress(i + 1, len(sites))
    return report
