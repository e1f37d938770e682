"""Where a bundle's .onnx spends its time: per-node time of one prefill and of decode steps, from
onnxruntime's own profiler (SessionOptions.enable_profiling: one event per node run, in microseconds).

    .venv/bin/python benchmarks/profile_onnx.py exports/gemma3-270m-rpi-onnx-int4 --prompt-len 128 \\
        --threads 2 --steps 16 [--set KEY=VALUE ...] [--out /tmp/profile-onnx]

The bundle's runner (edge.runtime.onnx.OnnxRunner) runs one prefill of `--prompt-len` tokens (real prose in
the bundle's tokenizer, BOS first) and `--steps` greedy decode steps; the first session.run of each shape
is a warm-up and is left out. `--set` passes session config entries (e.g.
`session.intra_op.allow_spinning=0`) to see what a setting changes. Tables: time by op type and the
slowest nodes, per decode step (medians over the steps) and for the prefill; the runner's wall time
per step beside the profiler's total of the nodes (the difference is outside the graph: feeds, copies).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def runs(events: list[dict]) -> list[list[dict]]:
    """The node events grouped by session.run call, in order (a `model_run` event spans each call)."""
    calls = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                   key=lambda e: e["ts"])  # fmt: skip
    out, i = [], 0
    for c in calls:
        end, group = c["ts"] + c["dur"], []
        while i < len(nodes) and nodes[i]["ts"] < end:
            if nodes[i]["ts"] >= c["ts"]:
                group.append(nodes[i])
            i += 1
        out.append(group)
    return out, [c["dur"] for c in calls]


def table(groups: list[list[dict]], totals: list[float], title: str, top: int) -> list[str]:
    by_op = [defaultdict(float) for _ in groups]
    by_node = [defaultdict(float) for _ in groups]
    counts = defaultdict(int)
    for k, g in enumerate(groups):
        for e in g:
            op = e["args"].get("op_name", "?")
            by_op[k][op] += e["dur"]
            by_node[k][f"{e['name'].removesuffix('_kernel_time')} ({op})"] += e["dur"]
            if k == 0:
                counts[op] += 1
    med = lambda rows, key: statistics.median(r.get(key, 0.0) for r in rows)  # noqa: E731
    total = statistics.median(totals) / 1e3
    nodes = statistics.median(sum(r.values()) for r in by_op) / 1e3
    lines = [f"\n## {title}: session.run {total:.2f} ms, nodes {nodes:.2f} ms (medians of {len(groups)})\n",
             "| op type | count | ms | share |", "|---|---|---|---|"]  # fmt: skip
    ops = sorted(by_op[0], key=lambda o: -med(by_op, o))
    for op in ops[:top]:
        ms = med(by_op, op) / 1e3
        lines.append(f"| {op} | {counts[op]} | {ms:.2f} | {ms / total:.0%} |")
    lines += ["", "| node | ms |", "|---|---|"]
    for n in sorted(by_node[0], key=lambda n: -med(by_node, n))[:top]:
        lines.append(f"| {n} | {med(by_node, n) / 1e3:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="session config entry")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    import onnxruntime as ort

    from edge.bench import prompt_ids
    from edge.bundle import load
    from edge.models.tokenizer import Tokenizer
    from edge.runtime.onnx import OnnxRunner

    manifest = load(a.bundle)
    artifact = a.bundle / manifest["artifact"]
    ids = prompt_ids(Tokenizer(a.bundle / manifest["tokenizer"]["file"]), a.prompt_len)
    runner = OnnxRunner(artifact, threads=a.threads)  # the plain session: wall time per step
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.enable_profiling = True
    for kv in a.set:
        k, _, v = kv.partition("=")
        opts.add_session_config_entry(k, v)
    prof = OnnxRunner(artifact, threads=a.threads)
    prof.session = ort.InferenceSession(str(artifact), opts, providers=["CPUExecutionProvider"])  # the same graph

    walls = {}
    for name, r in (("plain", runner), ("profiled", prof)):
        r.reset()
        r.decode(ids[0])  # warm-up of both shapes
        r.reset()
        r.prefill(ids[:8])
        r.reset()
        t = time.perf_counter()
        logits = r.prefill(ids)
        pre = time.perf_counter() - t
        steps = []
        for _ in range(a.steps):
            t = time.perf_counter()
            logits = r.decode(int(np.argmax(logits)))
            steps.append(time.perf_counter() - t)
        walls[name] = {"prefill_ms": pre * 1e3, "decode_ms": statistics.median(steps) * 1e3}
    path = prof.session.end_profiling()
    events = json.loads(Path(path).read_text())
    groups, totals = runs(events)
    # calls: decode warm-up, prefill(8) warm-up, the prompt's prefill, then the decode steps
    pre_g, dec_g = groups[2:3], groups[3 : 3 + a.steps]
    lines = [f"# {a.bundle} ({manifest['backend']} {manifest['quant']['scheme']['name']}), {a.threads} threads, "
             f"onnxruntime {ort.__version__}",
             f"runner wall, plain session: prefill {walls['plain']['prefill_ms']:.1f} ms, decode "
             f"{walls['plain']['decode_ms']:.2f} ms a step; profiled session: {walls['profiled']['prefill_ms']:.1f}"
             f" / {walls['profiled']['decode_ms']:.2f}"]  # fmt: skip
    lines += table(dec_g, totals[3 : 3 + a.steps], f"decode step (median of {a.steps})", a.top)
    lines += table(pre_g, totals[2:3], f"prefill, {a.prompt_len} tokens", a.top)
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "profile.md").write_text(text + "\n")
        Path(path).rename(a.out / "onnxruntime-profile.json")
    else:
        Path(path).unlink()


if __name__ == "__main__":
    main()
