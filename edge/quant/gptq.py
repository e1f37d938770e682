"""GPTQ rounding for grouped symmetric int4 (and int8) weights, layer by layer on calibration text.

Round-to-nearest rounds each weight alone. GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers") rounds the input columns of a linear one at a
time and spreads each column's rounding error over the columns not yet rounded, weighted by the
inverse Hessian H = X^T X of the linear's calibration inputs: the output error on real activations
is what is minimized, not the weight error.

Why our own ~60 lines and not torchao's: torchao 0.18's GPTQ lives in `prototype` and produces its
own tensor subclass for its int4 CUDA/tinygemm layouts; the backends here need the scheme's own
(q, scale) in IntxUnpackedToInt8Tensor (ExecuTorch XNNPACK 8da4w, and LiteRT's lookup by bytes in
edge/targets/litert_quant.py). The result is handed to torchao with `custom_scale`, so the
quantized module is exactly the one RTN would produce, only with other integers.

Layers are done in order, each from the inputs that the already-quantized layers before it
produce (what the artifact will see), one calibration pass per layer; a layer's Hessians are
freed once its linears are quantized (a 2B model's mlp.down Hessian alone is 9216^2 doubles).
Scales are per group of the CURRENT (error-updated) weights, rounded to bf16 as XNNPACK stores them,
each row's chosen among shrinks of the group's absmax (CLIP) by the activation-weighted rounding error:
the 270M int4 (eager vs fp32, golden prompts) went from mean KLD 0.0178 / top-1 90.84% with the
absmax scale alone to 0.0152 / 93.94% (benchmarks/eager_scheme.py --clip 1.0 vs the default). No bytes.
A scheme asks for it (Scheme.gptq_scale_search).
Deterministic: no randomness; columns in their natural order.

Measured on the 270M (int4 g32 on all transformer linears alone, head/embedding fp32, float
activations, one calibration pass from the fp32 model, golden prompts): RTN mean KLD 0.400 /
top-1 66.6%, GPTQ 0.231 / 72.3%; per site (RTN -> GPTQ): wq 0.016 -> 0.0054, wk 0.014 -> 0.010,
wv 0.098 -> 0.031, wo 0.026 -> 0.017, gate 0.040 -> 0.031, up 0.073 -> 0.053, down 0.079 -> 0.064.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

DAMP = 0.01  # fraction of the mean diagonal added to H (keeps it invertible on little calibration text)
BLOCK = 128  # columns per lazy-update block
# Candidate shrinks of a group's absmax scale (1.0 = torchao's rule); each row of each group takes the
# one with the least activation-weighted rounding error (the `--mse` grid of GPTQ's reference code).
CLIP = tuple(1.0 - 0.025 * i for i in range(13))
# Hessians from replayed block inputs (_BlockInputs) rather than a prefix pass per layer: same numbers.
REPLAY = True


def _group_scale(w: torch.Tensor, hd: torch.Tensor, qmin: int, qmax: int, clip: Sequence[float]) -> torch.Tensor:
    """Per row of w (out, group): the bf16 scale among absmax * clip that minimizes sum hd * (w - q s)^2."""
    base = w.abs().amax(1) / ((qmax - qmin) / 2)
    best, best_err = None, None
    for c in clip:
        s = (base * c).float().clamp(min=1e-12).to(torch.bfloat16).double()
        err = ((w - torch.clamp(torch.round(w / s[:, None]), qmin, qmax) * s[:, None]) ** 2 * hd).sum(1)
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def quantize_weight(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group: int | None,
    damp: float = DAMP,
    block: int = BLOCK,
    clip: Sequence[float] = (1.0,),
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one weight (out, in) with Hessian h (in, in): (q int8 (out, in), scale (out, in // group)).

    Symmetric: q in [-2^(b-1), 2^(b-1) - 1], scale = group absmax / ((qmax - qmin) / 2), torchao's rule,
    times the factor in `clip` with the least activation-weighted rounding error (CLIP to search).
    """
    out_f, in_f = w.shape
    group = group or in_f
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    W = w.detach().double().clone()
    H = h.double().clone()
    dead = torch.diag(H) == 0  # inputs never active in calibration: no information, weight kept as is
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_f, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(out_f, in_f, dtype=torch.int8)
    S = torch.zeros(out_f, in_f // group, dtype=torch.float32)
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        err = torch.zeros(out_f, b1 - b0, dtype=W.dtype)
        for j in range(b0, b1):
            if j % group == 0:  # the group's scale, from the weights as updated so far
                hd = torch.diag(H)[j : j + group][None, :]
                S[:, j // group] = _group_scale(W[:, j : j + group], hd, qmin, qmax, clip).float()
            s = S[:, j // group].double()
            q = torch.clamp(torch.round(W[:, j] / s), qmin, qmax)
            Q[:, j] = q.to(torch.int8)
            e = (W[:, j] - q * s) / Hinv[j, j]
            W[:, j:b1] -= e[:, None] * Hinv[j, j:b1][None, :]
            err[:, j - b0] = e
        W[:, b1:] -= err @ Hinv[b0:b1, b1:]
    return Q, S


def _hessian_hooks(mods: dict[str, nn.Module], names: Sequence[str], hs: dict[str, torch.Tensor]) -> list:
    def hook(name: str):
        def f(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            hs[name] = hs.get(name, 0) + x.T @ x

        return f

    return [mods[n].register_forward_pre_hook(hook(n)) for n in names]


def _replay_hessians(mods, replay: _BlockInputs, layer: int, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """H per named linear of block `layer`, from the replay's inputs to it (outputs discarded)."""
    hs: dict[str, torch.Tensor] = {}
    handles = _hessian_hooks(mods, names, hs)
    try:
        replay.run(layer, advance=False)
    finally:
        for h in handles:
            h.remove()
    return hs


def _input_hessians(
    mods: dict[str, nn.Module], model: nn.Module, names: Sequence[str], calib
) -> dict[str, torch.Tensor]:
    """H = sum over calibration tokens of x x^T for each named linear's input (float64)."""
    from edge.quant.smooth import calibration_pass

    hs: dict[str, torch.Tensor] = {}
    handles = _hessian_hooks(mods, names, hs)
    # Nothing after the block holding these linears matters to their Hessians: each pass stops there
    # (a pass for layer i costs i + 1 blocks, not the whole model).
    blocks = {".".join(n.split(".")[:2]) for n in names}
    last = mods[blocks.pop()] if len(blocks) == 1 and next(iter(blocks)).startswith("layers.") else None
    try:
        calibration_pass(model, calib, stop_after=last)
    finally:
        for h in handles:
            h.remove()
    return hs


class _BlockInputs:
    """Every calibration sequence's input to the next block, and the rest of its call (positions, RoPE
    tables, mask: one set per block kind, local or global), kept between layers: layer i's Hessians
    come from running block i alone on what blocks 0 .. i-1 (quantized) produced, one block per layer
    instead of a prefix pass of i + 1 blocks (18 layers: 36 block calls per sequence, not 171)."""

    def __init__(self, model: nn.Module, calib) -> None:
        from edge.quant.smooth import calibration_pass

        self.model = model
        self.x: list[torch.Tensor] = []
        self.rest: list[dict[bool, tuple]] = []
        kinds: dict[bool, tuple] = {}

        def grab(block: nn.Module):
            def f(mod, args):
                if block is model.layers[0]:
                    self.x.append(args[0])
                kinds.setdefault(block.local, args[1:5])

            return f

        handles = [b.register_forward_pre_hook(grab(b)) for b in model.layers]
        first_of_kind: dict[bool, int] = {}
        for i, b in enumerate(model.layers):
            first_of_kind.setdefault(b.local, i)
        stop = max(first_of_kind.values())  # each pass goes as far as the first block of each kind
        try:
            for ids in calib:
                kinds.clear()
                calibration_pass(model, [ids], stop_after=model.layers[stop])
                self.rest.append(dict(kinds))
        finally:
            for h in handles:
                h.remove()

    def run(self, i: int, advance: bool = True) -> None:
        """Block i on every sequence; with `advance` its outputs become the inputs to block i + 1
        (without: a pass for the hooks that watch it, outputs discarded)."""
        block = self.model.layers[i]
        try:
            for j, x in enumerate(self.x):
                self.model.reset_cache()
                y = block(x, *self.rest[j][block.local])
                if advance:
                    self.x[j] = y
        finally:
            self.model.reset_cache()


def gptq_layers(
    model: nn.Module,
    names: Sequence[str],
    calib: Sequence[Sequence[int]],
    apply: Callable[[str, torch.Tensor, torch.Tensor], None],
    bits_group: Callable[[str], tuple[int, int | None]],
    progress: Callable[[int, int], None] | None = None,
    clip: Sequence[float] = (1.0,),
) -> None:
    """Quantize the named linears layer by layer; apply(name, q, scale) installs each result.

    clip: the scale shrinks each group row may take (CLIP to search; (1.0,): the absmax scale)."""
    by_layer: dict[str, list[str]] = {}
    for n in names:
        key = ".".join(n.split(".")[:2]) if n.startswith("layers.") else n
        by_layer.setdefault(key, []).append(n)
    mods = dict(model.named_modules())  # installing a result replaces a weight, never a module
    layers_only = all(k.startswith("layers.") for k in by_layer)
    replay = _BlockInputs(model, calib) if REPLAY and layers_only else None
    done = 0  # blocks whose quantized outputs the replay holds
    for i, (key, group_names) in enumerate(by_layer.items()):
        if replay is None:
            hs = _input_hessians(mods, model, group_names, calib)
        else:
            layer = int(key.split(".")[1])
            while done < layer:
                replay.run(done)
                done += 1
            hs = _replay_hessians(mods, replay, layer, group_names)
        for n in group_names:
            bits, group = bits_group(n)
            q, s = quantize_weight(mods[n].weight.detach().float(), hs.pop(n), bits, group, clip=clip)
            apply(n, q, s)
        if progress:
            progress(i + 1, len(by_layer))
