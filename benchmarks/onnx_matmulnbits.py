"""onnxruntime's MatMulNBits alone, at the 270M head's shape (262144 x 640): which block size, accuracy level
and row count MLAS runs fast. Random weights; forms alternated over rounds, medians.

    .venv/bin/python benchmarks/onnx_matmulnbits.py [--bits 4] [--blocks 32,64,128] [--levels 0,4] [--rows 1,2]

accuracy_level 0 multiplies in fp32 (what the .onnx uses where it rounds activations itself); 4 quantizes
the activations to int8 per block of K and runs MLAS's int8 kernel.
"""

import argparse
import statistics
import time

import numpy as np


def session(n: int, k: int, bits: int, block: int, level: int, rows: int, threads: int, rng):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    blocks = -(-k // block)
    b = rng.integers(0, 256, size=(n, blocks, block * bits // 8), dtype=np.uint8)
    s = (rng.random(n * blocks, dtype=np.float32) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=level)  # fmt: skip
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
        [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S")],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda v: [int(x) for x in v.split(",")]  # noqa: E731
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--k", type=int, default=640)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--blocks", type=ints, default=[32, 64, 128])
    ap.add_argument("--levels", type=ints, default=[0, 4])
    ap.add_argument("--rows", type=ints, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    forms = [(b, lv, m) for b in a.blocks for lv in a.levels for m in a.rows]
    sessions = {f: session(a.n, a.k, a.bits, *f, a.threads, rng) for f in forms}
    times = {f: [] for f in forms}
    for _ in range(a.rounds):
        for f, s in sessions.items():
            x = rng.standard_normal((f[2], a.k), dtype=np.float32)
            s.run(None, {"x": x})
            t = time.perf_counter()
            for _ in range(a.calls):
                s.run(None, {"x": x})
            times[f].append((time.perf_counter() - t) / a.calls * 1e3)
    print(f"MatMulNBits {a.n} x {a.k}, {a.bits}-bit, {a.threads} threads; ms a call, median of {a.rounds} rounds")
    for (b, lv, m), ts in times.items():
        print(f"block {b:3d}  accuracy_level {lv}  M {m}: {statistics.median(ts):7.2f}")


if __name__ == "__main__":
    main()
