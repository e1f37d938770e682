"""What onnxruntime's int8 compute (MatMulNBits accuracy_level 4) would cost an exported .onnx bundle.

    .venv/bin/python benchmarks/onnx_accuracy_level.py BUNDLE [--prompts 3] [--steps 20] [--only lm_head]

Writes a copy of BUNDLE/model.onnx with every MatMulNBits at accuracy_level 4 (activations quantized to
int8 again by onnxruntime, symmetric per block of K) and compares it with the bundle's own graph
(accuracy_level 0: fp32 compute on activations rounded in the graph as the eager model rounds them;
`--only S`: only the MatMulNBits whose node name contains S):
KLD and moved argmax over the first golden prompts, and decode tok/s of each (2 threads).
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from edge.runtime import replay
from edge.runtime.onnx import OnnxRunner
from edge.validate import golden
from edge.validate.metrics import full_kld


def main() -> None:
    import onnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", default="", help="switch only the MatMulNBits whose name contains this")
    args = ap.parse_args()
    m = onnx.load(str(args.bundle / "model.onnx"))
    for node in m.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level" and args.only in node.name:
                a.i = 4
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(m, f"{tmp}/acc4.onnx")
        exact, int8 = OnnxRunner(args.bundle / "model.onnx", threads=2), OnnxRunner(f"{tmp}/acc4.onnx", threads=2)
        kld, moved, n = [], 0, 0
        for p in golden.load(args.bundle / "golden.npz")[: args.prompts]:
            ids = [int(i) for i in p.ids]
            x, y = replay(exact, ids), replay(int8, ids)
            kld.append(full_kld(x, y))
            moved, n = moved + int((x.argmax(-1) != y.argmax(-1)).sum()), n + len(ids)
        mean = np.concatenate(kld).mean()
        print(f"accuracy_level 4 vs the bundle's graph: mean KLD {mean:.5f}, argmax moved {moved} of {n}")
        rates = {"bundle (accuracy_level 0)": [], "accuracy_level 4": []}
        for _ in range(3):  # alternated: this host is noisy
            for rate, r in zip(rates.values(), (exact, int8), strict=True):
                r.reset()
                r.prefill(list(range(2, 34)))
                t = time.perf_counter()
                for i in range(args.steps):
                    r.decode(100 + i)
                rate.append(args.steps / (time.perf_counter() - t))
        for label, rate in rates.items():
            print(f"{label}: decode " + ", ".join(f"{v:.1f}" for v in rate) + " tok/s")


if __name__ == "__main__":
    main()
