"""Apply a Scheme to the eager model with torchao, and report what each weight became.

The quantized eager model is the `quantized` validation stage, and the very module that
ExecuTorch lowers: the artifact must equal it (lowering adds no error of its own).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from edge.quant.schemes import Act, Rounding, Scheme, WeightQuant


def _quiet_torchao() -> None:
    # torchao logs a failure for each CUDA-only extension it cannot load on a CPU machine, and
    # torch warns about its enum registrations: neither concerns us, both would bury our progress.
    logging.getLogger("torchao").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module="torch.utils._pytree")


def _torchao_config(q: WeightQuant, embedding: bool, custom_scales: bool = False):
    _quiet_torchao()
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    dtype = {4: torch.int4, 8: torch.int8}[q.bits]
    gran = PerGroup(q.group) if q.group else PerAxis(0)
    # GPTQ and transcoding pick their own integers and hand torchao the scales: no algorithm.
    algo = None if custom_scales else {Rounding.RTN: "affine", Rounding.HQQ: "hqq_scale_only"}[q.rounding]
    if embedding or q.act == Act.FLOAT:
        return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=gran, intx_choose_qparams_algorithm=algo)
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=dtype, weight_granularity=gran, intx_choose_qparams_algorithm=algo
    )


def plan(model: nn.Module, scheme: Scheme) -> list[dict]:
    """What each linear and embedding will become: the coverage report written into the manifest."""
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            q, width = scheme.embedding, mod.embedding_dim
        elif isinstance(mod, nn.Linear):
            q, width = scheme.quant_for(name), mod.in_features
        else:
            continue
        row = {"name": name, "shape": list(mod.weight.shape), "scheme": "fp32"}
        if scheme.float16:
            row |= {"scheme": "fp16", "bits_per_weight": 16.0}
        elif q is not None:
            if q.group and width % q.group:
                row["skipped"] = f"width {width} is not a multiple of group {q.group}: kept fp32"
            else:
                row["scheme"] = q.label() if not isinstance(mod, nn.Embedding) else f"int{q.bits}-g{q.group or 'row'}"
                row["bits_per_weight"] = q.bits_per_weight()
        rows.append(row)
    return rows


def calibration(tokenizer, vocab_size: int) -> list[list[int]]:
    """The calibration sequences (edge/quant/smooth.py's texts, disjoint from the golden prompts) as ids.

    Ids the model cannot embed (a random-weight variant whose vocabulary is smaller than the
    tokenizer's) are dropped: calibration only needs realistic activations, not exact text.
    """
    from edge.quant.smooth import calibration_ids

    return [[i for i in ids if i < vocab_size] for ids in calibration_ids(tokenizer)]


# Smoothing site -> the linears that read its input (edge/quant/smooth.py's _sites).
_SITE_CONSUMERS = {"qkv": ("attn.wq", "attn.wk", "attn.wv"), "wo": ("attn.wo",), "gate_up": ("mlp.gate", "mlp.up"),
                   "down": ("mlp.down",), "lm_head": ("",)}  # fmt: skip


def _site_consumers(site: str) -> list[str]:
    prefix, _, kind = site.rpartition(".")
    return [f"{prefix}.{suffix}" if suffix else site for suffix in _SITE_CONSUMERS[kind]]


def transcodable(scheme: Scheme, coverage: list[dict], grids: dict | None) -> set[str]:
    """The linears held exactly on their source's 4-bit grid: a Q4_K source (edge/quant/transcode.py),
    a scheme that gives it >= 4 bits with dynamic activations (8da4w is the kernel that holds it)."""
    from edge.quant.transcode import PLANE_KINDS

    if not grids:
        return set()
    out = set()
    for r in coverage:
        q, g = scheme.quant_for(r["name"]), grids.get(r["name"])
        # The lookup is no linear; a shared table's head is the lookup's int8 rows (_share_table).
        if r["name"] == "embed" or (r["name"] == "lm_head" and scheme.shared_table):
            continue
        if g is None or q is None or q.act != Act.DYNAMIC_INT8:
            continue
        if (scheme.source_grids and g.kind == "Q4_K" and q.bits >= 4) or (
            scheme.source_planes and g.kind in PLANE_KINDS and q.bits == 8
        ):
            out.add(r["name"])
    return out


def quantize_model(
    model: nn.Module,
    scheme: Scheme,
    calib: list[list[int]] | None = None,
    progress: Callable[[str], Callable[[int, int], None]] | None = None,
    grids: dict | None = None,
    smoothed: dict | None = None,
    sampled: list[list[int]] | None = None,
    skeleton: bool = False,
) -> list[dict]:
    """Quantize in place; returns the coverage report. The fp32 weights are freed as they are replaced.

    A scheme with `smooth` first folds SmoothQuant scales into the fp32 model, searched on `calib`
    (token id sequences, see calibration()); each smoothed linear's row says with which alpha.
    progress: label -> a callback(done, total) (edge.progress.counter), for the slow loops.
    grids: our linear name -> its source Grid (edge/quant/transcode.py, source_grids) for schemes
    with `source_grids`: those linears keep the source's integers instead of being re-rounded.
    smoothed: fold_smoothing()'s report when `model` already holds the scheme's SmoothQuant scales
    (`--quant auto` folds them once for all its candidates: they depend on none of its choices).
    sampled: the scheme's gptq_samples sequences, already sampled from the fp32 model (auto samples once).
    skeleton: only the structure, in seconds: the same modules and tensor formats with placeholder values
    (no calibration, no SmoothQuant, round-to-nearest where GPTQ would round), for edge/quant/cache.py
    to fill with a cached quantization's tensors. Its coverage report lacks the calibrated details.
    """
    coverage = plan(model, scheme)
    if not scheme.quantized:
        return coverage
    if scheme.float16:  # the fp32 weights take fp16's values; a tied table stays one tensor
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.weight.data = mod.weight.data.to(torch.float16).to(mod.weight.dtype)
        return coverage
    head_s = None
    rows = {r["name"]: r for r in coverage}
    from torchao.quantization import quantize_

    exact = transcodable(scheme, coverage, grids)
    todo = {r["name"] for r in coverage if r["scheme"] != "fp32"} - exact
    gptq_calib = calib
    sample = scheme.gptq_samples and calib and not skeleton
    if sample and _gptq_names(scheme, todo, coverage):  # sampled from the fp32 model
        from edge.quant.sample import sample_sequences

        if sampled is None:
            label = f"calibration text sampled from the fp32 model, {scheme.gptq_samples} sequences"
            sampled = sample_sequences(model, calib[0][0], scheme.gptq_samples, progress=progress and progress(label))
        gptq_calib = list(calib) + sampled

    if scheme.smooth and not skeleton:
        report = smoothed if smoothed is not None else fold_smoothing(model, scheme, calib, grids, progress)
        group_sites = _group_sites(exact, grids)
        head_s = report.get("lm_head", {}).get("s")
        for site, r in report.items():
            for name in _site_consumers(site):
                rows[name]["smoothquant"] = {
                    "alpha": r["alpha"],
                    "err_8da_before": round(r["err_before"], 6),
                    "err_8da_after": round(r["err_after"], 6),
                }
                if site in group_sites:
                    rows[name]["smoothquant"]["group_constant"] = group_sites[site]

    if scheme.head is not None and model.lm_head.weight is model.embed.weight:
        # Untie: the head and the lookup table get their own quantized copies (a matmul and a gather
        # want different formats). Same storage until quantize_ replaces each.
        model.lm_head.weight = nn.Parameter(model.embed.weight.detach(), requires_grad=False)
    # The offsets take the residual row only when every linear does (act_residual_only names none of them).
    offsets_residual = scheme.act_residual and not scheme.act_residual_only
    _transcode(model, exact, grids, rows, scheme.source_act_slice, scheme.int8_offsets, offsets_residual)
    _split_grouped_int8(model, scheme, todo, coverage)
    if scheme.shared_table:
        _share_table(model, head_s)
        rows["embed"]["shared_with"] = rows["lm_head"]["shared_with"] = "embed + lm_head: one int8 table"
    if scheme.embedding is not None:
        is_table = lambda m, n: isinstance(m, nn.Embedding) and _owner(n) in todo  # noqa: E731
        quantize_(model, _torchao_config(scheme.embedding, True), filter_fn=is_table)
    linears = {scheme.quant_for(r["name"]) for r in coverage if r["name"] in todo and r["name"] != "embed"}
    for q in [q for q in linears if q.rounding != Rounding.GPTQ]:  # one pass per distinct WeightQuant
        uses = lambda m, n, q=q: isinstance(m, nn.Linear) and _owner(n) in todo and scheme.quant_for(_owner(n)) == q  # noqa: E731
        quantize_(model, _torchao_config(_as_realized(q), False), filter_fn=uses)
    gptq = _gptq_names(scheme, todo, coverage)  # todo as _split_grouped_int8 left it
    if gptq and skeleton:
        _install_rtn(model, scheme, gptq)
    elif gptq:  # last: each layer is rounded on what the quantized layers before it produce
        if not calib:
            raise ValueError(f"scheme {scheme.name!r} rounds with GPTQ: pass calibration token ids")
        _gptq(model, scheme, gptq, gptq_calib, rows, progress and progress("GPTQ layers"))
    _bf16_group_scales(model)
    if scheme.act_residual:
        from edge.quant.split import wrap_act_residual

        wrapped = wrap_act_residual(model, only=scheme.act_residual_only)
        for r in coverage:
            if any(w == r["name"] or w.startswith(r["name"] + ".") for w in wrapped):
                r["activations"] = "dynamic int8, twice: x and its rounding residual, two rows of one call"
    if scheme.head_exact_rows:  # last: it splits the shared table as quantized above
        from edge.quant import two_pass

        two_pass.apply(model, scheme, coverage)
    return coverage


def _gptq_names(scheme: Scheme, todo: set[str], coverage: list[dict]) -> list[str]:
    """The linears of `todo` that GPTQ rounds, in model order (layer by layer)."""
    names = [n for n in todo - {"embed"} if scheme.quant_for(n).rounding == Rounding.GPTQ]
    return sorted(names, key=[r["name"] for r in coverage].index)


def _group_sites(exact: set[str], grids: dict | None) -> dict[str, int]:
    """Smoothing site -> the group its scales stay constant over (a kept grid's linears read it)."""
    return {site: grids[name].group for name in exact for site in _sites_of(name)}


def fold_smoothing(model: nn.Module, scheme: Scheme, calib, grids: dict | None, progress=None) -> dict:
    """Search SmoothQuant scales on `calib` and fold them into the fp32 model, in place; returns the report."""
    if not calib:
        raise ValueError(f"scheme {scheme.name!r} folds SmoothQuant scales: pass calibration token ids")
    from edge.quant.smooth import smooth

    q = scheme.linear
    group_sites = _group_sites(transcodable(scheme, plan(model, scheme), grids), grids)
    return smooth(model, calib, weight_bits=q.bits, group_size=q.group, group_sites=group_sites,
                  progress=progress and progress("SmoothQuant sites"))  # fmt: skip


def _sites_of(name: str) -> list[str]:
    """The smoothing sites whose scales fold into linear `name`'s columns."""
    prefix, _, rest = name.rpartition(".")  # "layers.3.mlp" "down"
    layer, _, kind = prefix.rpartition(".")  # "layers.3" "mlp"
    for site, suffixes in _SITE_CONSUMERS.items():
        if f"{kind}.{rest}" in suffixes:
            return [f"{layer}.{site}"]
    return ["lm_head"] if name == "lm_head" else []


def _transcode(
    model: nn.Module,
    names: set[str],
    grids: dict,
    rows: dict[str, dict],
    act_slice: int | None = None,
    int8_offsets: bool = False,
    offsets_residual: bool = True,
) -> None:
    """Replace each named linear by an OffsetLinear on its source grid (edge/quant/transcode.py)."""
    from edge.quant.transcode import to_offset_linear, to_plane_linear

    for name in sorted(names):
        grid, current = grids[name], model.get_submodule(name).weight
        sliced = f"; activations scaled per {act_slice} inputs" if act_slice and act_slice < grid.q.shape[1] else ""
        offsets = "an fp32 linear"
        if grid.minimum is not None:  # Q4_K: one 4-bit plane
            lin = to_offset_linear(grid, current, act_slice)
            if int8_offsets:
                lin.int8_offsets(offsets_residual)
                offsets = "an int8 linear (8da8w per row)"
            bits = 4 + 16 / grid.group + (8 if int8_offsets else 32) / grid.group
            rows[name]["scheme"] = f"8da4w-g{grid.group}-source-{grid.kind}"
            held = "q - 8 on XNNPACK's symmetric 4-bit kernel, bf16 group scales"
        else:  # Q8_0 / Q5_0: two 4-bit planes
            lin = to_plane_linear(grid, current, act_slice)
            bits = 8 + 32 / grid.group + 32 / grid.group
            rows[name]["scheme"] = f"8da8w-g{grid.group}-source-{grid.kind}"
            held = "q - 8 = 16 h + l as two planes on XNNPACK's symmetric 4-bit kernel, bf16 group scales"
        model.set_submodule(name, lin)
        rows[name]["bits_per_weight"] = bits
        rows[name]["realized"] = (
            f"{grid.kind} integers kept ({held}) plus per-group offsets in {offsets} over the inputs'"
            " group means" + sliced
        )


def _gptq(model: nn.Module, scheme: Scheme, names: list[str], calib, rows: dict[str, dict], progress) -> None:
    from edge.quant.gptq import gptq_layers

    mods = dict(model.named_modules())

    def install(name: str, q: torch.Tensor, s: torch.Tensor) -> None:
        wq = scheme.quant_for(name)
        mod = mods[name]
        out_f, in_f = q.shape
        g = wq.group or in_f
        # The exact grid values q * s: torchao re-derives q from them and our scale, bit for bit.
        mod.weight = nn.Parameter(
            (q.float().reshape(out_f, -1, g) * s[..., None]).reshape(out_f, in_f), requires_grad=False
        )
        install_intx(mod, wq.bits, wq.group, s, wq.act)
        rows[name]["rounding"] = "gptq"

    def bits_group(name: str) -> tuple[int, int | None]:
        wq = scheme.quant_for(name)
        return wq.bits, wq.group

    from edge.quant import gptq

    clip = gptq.CLIP if scheme.gptq_scale_search else (1.0,)
    gptq_layers(model, names, calib, install, bits_group, progress=progress, clip=clip)


def _install_rtn(model: nn.Module, scheme: Scheme, names: list[str]) -> None:
    """GPTQ's linears in the format GPTQ installs (custom scales, zero points 0), rounded to nearest."""
    for name in names:
        wq, mod = scheme.quant_for(name), model.get_submodule(name)
        out_f, in_f = mod.weight.shape
        g, qmax = wq.group or in_f, 2 ** (wq.bits - 1) - 1
        w = mod.weight.detach().reshape(out_f, -1, g)
        s = (w.abs().amax(-1) / qmax).clamp(min=1e-12)
        q = torch.clamp(torch.round(w / s[..., None]), -qmax - 1, qmax)
        mod.weight = nn.Parameter((q * s[..., None]).reshape(out_f, in_f), requires_grad=False)
        install_intx(mod, wq.bits, wq.group, s, wq.act)


def install_intx(
    mod: nn.Linear, bits: int, group: int | None, scale: torch.Tensor, act: Act = Act.DYNAMIC_INT8
) -> None:
    """Quantize `mod` with torchao using our own scales (zero points 0): its weight must already be
    the exact grid values q * scale, from which torchao re-derives q bit for bit."""
    from torchao.quantization.quant_api import (
        _int8_dynamic_activation_intx_weight_transform,
        _intx_weight_only_transform,
    )

    transform = _intx_weight_only_transform if act == Act.FLOAT else _int8_dynamic_activation_intx_weight_transform
    config = _torchao_config(WeightQuant(bits, group, act), False, custom_scales=True)
    transform(mod, config, custom_scale=scale, custom_zero_point=torch.zeros_like(scale, dtype=torch.int8))


def _share_table(model: nn.Module, s: torch.Tensor | None) -> None:
    """Make the lookup read the head's table (whole, or its column slices when the head is split).

    After SmoothQuant the head is W * s (per column): the lookup then reads that same matrix and
    multiplies the row back by 1 / s. Quantized per row, lookup and head become byte-identical
    int8 rows and scales, which the export stores once (Scheme.shared_table).
    """
    from edge.quant.split import ColumnSplitEmbedding, ColumnSplitLinear

    head = model.lm_head
    if isinstance(head, ColumnSplitLinear):
        model.embed = ColumnSplitEmbedding(head)
    else:
        model.embed.weight = nn.Parameter(head.weight.detach(), requires_grad=False)
    if s is not None:
        model.embed_rescale = (1.0 / s).to(model.embed.weight.dtype)


def _splits(q: WeightQuant | None) -> bool:
    """8-bit groups with dynamic activations: realized as column slices (edge/quant/split.py)."""
    return q is not None and q.bits == 8 and q.group is not None and q.act == Act.DYNAMIC_INT8


def _as_realized(q: WeightQuant) -> WeightQuant:
    """What torchao applies to each nn.Linear: a split linear's slices are per-channel."""
    return replace(q, group=None) if _splits(q) else q


def _owner(name: str) -> str:
    """The linear a (possibly split) module belongs to: "layers.0.mlp.down.parts.3" -> "layers.0.mlp.down"."""
    head, sep, _ = name.partition(".parts.")
    return head if sep else name


def _split_grouped_int8(model: nn.Module, scheme: Scheme, todo: set[str], coverage: list[dict]) -> None:
    """8-bit grouped linears with dynamic activations: XNNPACK has no grouped int8 kernel. With
    source_planes, a round-to-nearest grid in the scheme's groups held as two 4-bit planes (one
    delegate: slices of a dynamic-shape input stay outside XNNPACK's partitioner and cut it);
    else, and always for a shared table's head (its rows are the lookup's), column slices."""
    from edge.quant.split import MAX_SLICES, slice_width, split_linears
    from edge.quant.transcode import rtn_grid, to_plane_linear

    for r in coverage:
        q = scheme.quant_for(r["name"])
        if r["name"] in todo and r["name"] != "embed" and _splits(q):
            shared = r["name"] == "lm_head" and scheme.shared_table
            if scheme.source_planes and not shared and q.group % 32 == 0:
                weight = model.get_submodule(r["name"]).weight
                model.set_submodule(r["name"], to_plane_linear(rtn_grid(weight, q.group)))
                r["scheme"] = f"8da8w-g{q.group}-planes-rtn"
                r["bits_per_weight"] = 8 + 32 / q.group + 32 / q.group
                r["realized"] = (
                    f"round-to-nearest int8 in groups of {q.group}, held as two 4-bit planes (q - 8 = 16 h + l)"
                    " on XNNPACK's symmetric 4-bit kernel plus per-group offsets"
                )
                todo.discard(r["name"])  # quantized: torchao's passes below must not touch it again
                continue
            width = slice_width(r["shape"][1], q.group)
            split_linears(model, {r["name"]}, width)
            r["scheme"] = replace(q, group=width).label()
            r["realized"] = (
                f"{r['shape'][1] // width} slices of {width} input columns, each 8da8w per channel, summed"
                " (XNNPACK has no grouped int8 kernel)"
                + (f"; group {q.group} widened to keep <= {MAX_SLICES} slices" if width != q.group else "")
            )


def _bf16_group_scales(model: nn.Module) -> None:
    """Round the group scales of grouped linears to bfloat16, as the artifact stores them.

    ExecuTorch's XNNPACK serializer casts per-group weight scales to bf16 (executorch
    backends/xnnpack/operators/node_visitor.py, get_quant_params: `scale.to(torch.bfloat16)`;
    XNNPACK's qb4w kernels take bf16 scales). Left in fp32 here, the eager model and the .pte
    differ: measured on the 270M's layers.0.attn.wq, relative output error 1.2e-3 (vs 2e-7 for
    the per-channel int8 linears, whose scales stay fp32). Rounded here, the eager model IS the
    artifact; bf16 values are exact in fp32 and fp16, so other backends lose nothing more.
    Grouped embedding tables too: ai-edge-quantizer stores every blockwise scale as fp16(bf16(s))
    (ai_edge_quantizer/transformations/quantize_tensor.py), so the .tflite's table is the eager one.
    """
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, (nn.Linear, nn.Embedding)) and hasattr(w, "scale") and w.block_size[-1] < w.shape[-1]:
            w.scale.copy_(w.scale.to(torch.bfloat16).float())
