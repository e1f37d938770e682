"""One scheme on the 270M, eager (no lowering), vs fp32 on the golden prompts: a lever's effect in minutes.

    .venv/bin/python benchmarks/eager_scheme.py [--quant int4] [--clip 1.0] [--gptq-samples N]
        [--set FIELD=VALUE ...] [--json out.json]

--clip 1.0 turns GPTQ's scale search off (edge/quant/gptq.py CLIP: the absmax scale only) for a
scheme with gptq_scale_search;
--gptq-samples overrides the scheme's count of sequences sampled from the model for GPTQ;
--set overrides any Scheme field with a Python literal (e.g. source_act_slice=None,
act_residual_only="('mlp.down',)").
Prints the mean KLD and top-1 that `edge validate` reports for the quantized stage (same code:
edge.validate.stages.evaluate), and the seconds taken.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import time

import torch

from edge.models.loading import load_weights
from edge.models.variants import get_variant
from edge.progress import counter
from edge.quant import gptq
from edge.quant.apply import calibration, quantize_model
from edge.quant.schemes import get_scheme
from edge.quant.transcode import grids_for
from edge.validate import golden
from edge.validate.stages import eager_logits, evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--clip", help="comma-separated scale shrinks GPTQ may pick from (default: gptq.CLIP)")
    ap.add_argument("--gptq-samples", type=int, help="sequences sampled from the model for GPTQ's Hessians")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a Scheme field with a Python literal (repeatable)",
    )
    ap.add_argument("--json", help="append the result as one JSON line here")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.clip:
        gptq.CLIP = tuple(float(c) for c in args.clip.split(","))
    t0 = time.time()
    v = get_variant("270m")
    loaded = load_weights(v)
    model = loaded.build(1024)
    prompts = golden.capture(model, loaded.tokenizer, 1024)
    scheme = get_scheme(args.quant)
    if args.gptq_samples is not None:
        scheme = dataclasses.replace(scheme, gptq_samples=args.gptq_samples)
    overrides = {k: ast.literal_eval(v) for k, _, v in (s.partition("=") for s in args.set)}
    scheme = dataclasses.replace(scheme, **overrides)
    calib = calibration(loaded.tokenizer, v.config.vocab_size) if scheme.calibrated else None
    quantize_model(model, scheme, calib, progress=counter, grids=grids_for(loaded, scheme))
    r = evaluate(prompts, eager_logits(model), window=512)["overall"]
    out = {
        "quant": scheme.name,
        "clip": list(gptq.CLIP) if scheme.gptq_scale_search else [1.0],
        "gptq_samples": scheme.gptq_samples,
        "set": {k: repr(v) for k, v in overrides.items()},
        "mean_kld": r["mean_kld"],
        "top1": r["top1"],
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(out))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
