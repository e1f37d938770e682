"""Per-tensor int4 sensitivity of the 270M's linears on calibration text (edge/quant/sensitivity.py).

    .venv/bin/python benchmarks/sensitivity.py [--kinds mlp.gate,attn.wq] [--json out.json]

Prints each linear's KLD vs fp32 when only it is rounded to int4 g32 (round to nearest), least
sensitive first, and its source grid in the GGUF: the ranking behind the int4 scheme's INT4_GATES.
"""

from __future__ import annotations

import argparse
import json

import torch

from edge.models.loading import load_weights
from edge.models.variants import get_variant
from edge.models.weights.gguf import GGUFFile, gguf_to_ours
from edge.progress import counter
from edge.quant.apply import calibration
from edge.quant.sensitivity import sensitivity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="attn.wq,attn.wk,attn.wv,attn.wo,mlp.gate,mlp.up,mlp.down")
    ap.add_argument("--json", help="also write {name: kld} here")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_weights(get_variant("270m"))
    model = loaded.build(1024)
    kinds = tuple(args.kinds.split(","))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(kinds)]
    f = GGUFFile(loaded.gguf_path)
    ours = {g: gguf_to_ours(g) for g in f.tensors}
    grid = {ours[g][0].removesuffix(".weight"): t.ggml_type.name for g, t in f.tensors.items() if ours[g]}
    kld = sensitivity(model, calibration(loaded.tokenizer, model.cfg.vocab_size), names, progress=counter("linears"))
    print(f"{'linear':24s} {'source':6s} {'KLD int4 alone':>14s}")
    for name in sorted(kld, key=kld.get):
        print(f"{name:24s} {grid.get(name, '?'):6s} {kld[name]:14.5f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(kld, fh, indent=1)


if __name__ == "__main__":
    main()
