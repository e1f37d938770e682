"""What a two-pass head would cost the int4 270M in accuracy, eager, vs fp32 on the golden prompts.

    .venv/bin/python benchmarks/two_pass_head.py --candidates 1x64,1x512,1x2048,16x32

The int4 scheme's head is the int8 table q (one scale s per row) it shares with the lookup. Split into
its two 4-bit planes, q = 16 * hi + lo (hi the signed high nibble, lo the low one in 0..15), a first pass
scores every row from hi alone, lo replaced by its row's mean: 16 s (x . hi) + s mean(lo) sum(x), half
the bytes (benchmarks/head_kernels.py times it). The best rows of that pass are then recomputed exactly,
s (x . q), and written back; every other row keeps the first pass's estimate. BxK: the K blocks of B
consecutive rows with the highest first-pass maximum (B = 1: the K best rows). The quantized model comes
from the quantization cache (one int4 export fills it). Prints the mean KLD / top-1 that `edge validate`'s
quantized stage computes (edge.validate.stages.evaluate), for the scheme as it is and for each form, and
how many positions had the exact argmax among the candidates.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from edge.models.loading import load_weights
from edge.models.variants import get_variant
from edge.quant import cache as quant_cache
from edge.quant.apply import calibration
from edge.quant.schemes import get_scheme
from edge.quant.transcode import grids_for
from edge.validate import golden
from edge.validate.stages import eager_logits, evaluate


class TwoPassHead(nn.Module):
    def __init__(self, q: torch.Tensor, s: torch.Tensor, block: int, blocks: int) -> None:
        super().__init__()
        u = q.to(torch.int16) + 128  # 16 * (hi + 8) + lo
        self.hi, self.lo = ((u >> 4) - 8).float(), (u & 15).float()
        self.s = s.reshape(-1).float()
        self.exact = (q.float() * self.s[:, None]).T
        self.mean_lo = self.lo.mean(1) * self.s
        self.block, self.blocks = block, blocks
        self.covered = [0, 0]  # positions whose exact argmax was a candidate, positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        approx = (x @ self.hi.T) * (16 * self.s) + self.mean_lo * x.sum(-1, keepdim=True)
        V = approx.shape[-1]
        _, top = approx.view(-1, V // self.block, self.block).amax(-1).topk(self.blocks, dim=-1)
        rows = (top.unsqueeze(-1) * self.block + torch.arange(self.block)).reshape(x.shape[0], -1)
        # a few positions at a time: (positions, candidates, dim) floats would not fit for a whole prompt
        chunks = zip(x.split(8), rows.split(8), strict=True)
        exact = torch.cat([torch.einsum("nd,ncd->nc", xc, self.exact.T[rc]) for xc, rc in chunks])
        argmax = (x @ self.exact).argmax(-1)
        self.covered[0] += int((rows == argmax[:, None]).any(-1).sum())
        self.covered[1] += x.shape[0]
        return approx.scatter(-1, rows, exact).reshape(*lead, V)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default="1x64,1x512,1x2048,16x32", help="BxK forms, comma-separated")
    ap.add_argument("--json", help="append one JSON line per form here")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    v = get_variant("270m")
    loaded = load_weights(v)
    model = loaded.build(1024)
    prompts = golden.capture(model, loaded.tokenizer, 1024)
    scheme = get_scheme("int4")
    calib = calibration(loaded.tokenizer, v.config.vocab_size)
    identity = quant_cache.source_identity(loaded.source, loaded.config.to_dict())
    quant_cache.quantize(model, scheme, calib, grids_for(loaded, scheme), identity, say=print)
    weight = getattr(model.lm_head, "lin", model.lm_head).weight  # ActResidual wraps it
    q, s = weight.qdata, weight.scale
    rows = []
    r = evaluate(prompts, eager_logits(model), window=512)["overall"]
    rows.append({"form": "int4 as it is (8da8w head, ActResidual)", "mean_kld": r["mean_kld"], "top1": r["top1"]})
    print(json.dumps(rows[-1]), flush=True)
    for form in a.candidates.split(","):
        block, blocks = (int(n) for n in form.split("x"))
        model.lm_head = TwoPassHead(q, s, block, blocks)
        r = evaluate(prompts, eager_logits(model), window=512)["overall"]
        rows.append({"form": f"two-pass {form}", "rows_exact": block * blocks, "mean_kld": r["mean_kld"],
                     "top1": r["top1"], "argmax_among_candidates": model.lm_head.covered})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        with open(a.json, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
