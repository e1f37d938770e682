"""Where a bundle's .pte spends its time: per-operator time of one prefill and of decode steps, from ETDump.

    .venv/bin/python benchmarks/profile_pte.py exports/gemma3-270m-android-xnnpack-int4-2pass \\
        --prompt-len 128 --threads 2 --steps 16 --out /tmp/profile-int4

Two passes over the same work, one after the other in this process:

1. Plain timing, no ETDump: a warm-up, then `--repeats` rounds of one prefill of `--prompt-len` tokens
   (real prose in the bundle's tokenizer, BOS first) and `--steps` greedy decode steps; medians. Twice:
   through the bundle's own runner (edge.runtime.pte.PteRunner, what `edge bench` measures; its
   executorch.runtime Method.execute clones the logits with torch), and through the bare pybinding call
   without that clone (what the profiled pass does). This is the scale to read the profile against.
2. Profiled: the same .pte loaded again with ETDump on (Runtime.load_program(pte, enable_etdump=True,
   data_path=model.ptd)); a warm-up, then ONE prefill at input_pos 0 and `--steps` decode steps. The
   etdump is written after each phase (writing it also empties the runtime's tracer), so OUT holds
   warmup.etdp, prefill.etdp and decode.etdp, each parsed on its own by executorch.devtools.Inspector.

What the ExecuTorch 1.5.1 pip wheel records (it is built with the event tracer on):
- Method::execute: the whole forward call (the "total" below);
- per non-delegated instruction: OPERATOR_CALL (the instruction, as the runtime dispatches it) and,
  inside it, native_call_<op> (the codegen'd kernel wrapper, which names the op);
- per delegate call: DELEGATE_CALL (the whole call into XNNPACK: input/output setup, reshaping the
  XNNPACK runtime when the token count changes, and the ops) and, inside it, one event per XNNPACK
  operator ("Fully Connected (NC, QDU8, F32, QB4W) GEMM #3": XNNPACK's own operator names, numbered per
  call) from XNNPACK's basic profiling (XNN_FLAG_BASIC_PROFILING, which the wheel's XNNPACK backend
  sets whenever the event tracer is compiled in). XNNPACK reports those in whole microseconds and
  ExecuTorch lays them end to end from the call's start, so ops shorter than 1 us read 0, and
  "call overhead" below (DELEGATE_CALL minus its ops) also soaks up that truncation (< 1 us per op:
  the int4 270M runs ~7100 XNNPACK ops a decode step, so per-op decode figures are lower bounds).
- no ETRecord is needed, nor used: the bundles do not carry one. Rows are named by what the etdump
  holds: kernel names (native_call_*), XNNPACK operator types, delegate calls by their order in the
  method and instruction id. An ETRecord (written at export) would add the source ops / module
  hierarchy of each non-delegated op and the list of edge ops inside each delegate call, but not a
  mapping of XNNPACK's per-operator events (their delegate_debug_id is -1) to source nodes.

Tables: time by operator type (summed over a run's instances; prefill: the one prefill, summed over its
forward calls if the prompt is longer than the program's max T; decode: the median over the steps of
each row's per-step time), and time by delegate call. Percentages are of Method::execute.
OUT/profile.json holds every row, the per-instance top events and the plain timing.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KERNEL_PREFIX = "native_call_"
INSTRUCTION_EVENTS = {"OPERATOR_CALL", "DELEGATE_CALL", "JF_CALL", "MOVE_CALL", "FREE_CALL"}
XNN_INSTANCE = re.compile(r" #\d+$")


# ---------------------------------------------------------------------------------------------- running


def chunks(ids: list[int], max_T: int) -> list[list[int]]:
    """The forward calls of one prefill, as PteRunner.prefill makes them."""
    if max_T == 1:
        return [[t] for t in ids]
    return [ids[i : i + max_T] for i in range(0, len(ids), max_T)]


def forward_call(method, ids: list[int], pos: int) -> int:
    """One forward call through the pybinding without cloning the logits; the greedy next token.

    executorch.runtime.Method.execute always clones the outputs (1 MB of logits for a 262144 vocab) with
    torch's intra-op threads: on a busy 2-core machine that copy alone can take milliseconds and its
    spinning threads compete with XNNPACK's. The logits returned here alias the program's planned
    output buffer, read (numpy, single-threaded) before the next call overwrites them.
    """
    import torch

    logits = method.call([torch.tensor([ids], dtype=torch.int64), torch.tensor([pos], dtype=torch.int64)], False)[0]
    return int(np.argmax(logits[0].numpy()))


def plain_timing(runner, ids: list[int], steps: int, repeats: int) -> dict:
    """Prefill and decode wall times without ETDump: through the bundle's own runner (what `edge bench`
    measures: it clones the logits) and through the bare method call (logits not cloned)."""
    method = runner.forward._method  # the pybinding's ExecuTorchMethod under executorch.runtime.Method

    def runner_round() -> tuple[float, list[float], list[int]]:
        runner.reset()
        t0 = time.perf_counter()
        token = int(np.argmax(runner.prefill(ids)))
        prefill = (time.perf_counter() - t0) * 1e3
        out, times = [token], []
        for _ in range(steps):
            t1 = time.perf_counter()
            token = int(np.argmax(runner.decode(token)))
            times.append((time.perf_counter() - t1) * 1e3)
            out.append(token)
        return prefill, times, out

    def bare_round() -> tuple[float, list[float], list[int]]:
        pos, token = 0, None
        t0 = time.perf_counter()
        for c in chunks(ids, runner.max_T):
            token = forward_call(method, c, pos)
            pos += len(c)
        prefill = (time.perf_counter() - t0) * 1e3
        out, times = [token], []
        for _ in range(steps):
            t1 = time.perf_counter()
            token = forward_call(method, [token], pos)
            times.append((time.perf_counter() - t1) * 1e3)
            pos += 1
            out.append(token)
        return prefill, times, out

    result = {"repeats": repeats}
    for name, one_round in (("runner", runner_round), ("bare_call", bare_round)):
        one_round()  # warm-up at the profiled shapes
        rounds = [one_round() for _ in range(repeats)]
        steps_ms = [t for r in rounds for t in r[1]]
        result[name] = {
            "prefill_ms": statistics.median(r[0] for r in rounds),
            "prefill_ms_all": [r[0] for r in rounds],
            "decode_ms_per_step_median": statistics.median(steps_ms),
            "decode_ms_per_step_p90": float(np.percentile(steps_ms, 90)),
            "tokens": rounds[0][2],
        }
    return result


def profiled_run(pte: Path, ptd: Path | None, ids: list[int], steps: int, max_T: int, out: Path) -> dict:
    """Prefill + decode on a program loaded with ETDump; one etdump file per phase."""
    from executorch.runtime import Runtime

    t = time.perf_counter()
    program = Runtime.get().load_program(
        str(pte), enable_etdump=True, debug_buffer_size=0, data_path=str(ptd) if ptd else None
    )
    forward = program.load_method("forward")
    load_s = time.perf_counter() - t

    def call(tok: list[int], pos: int) -> int:
        return forward_call(forward._method, tok, pos)

    def prefill() -> tuple[int, float]:
        pos, token = 0, None
        t0 = time.perf_counter()
        for c in chunks(ids, max_T):
            token = call(c, pos)
            pos += len(c)
        return token, (time.perf_counter() - t0) * 1e3

    # Warm-up: first-call allocations and XNNPACK's first reshape/setup at these shapes stay out of the profile.
    token, _ = prefill()
    for i in range(min(2, steps)):
        token = call([token], len(ids) + i)
    files = {"warmup": out / "warmup.etdp", "prefill": out / "prefill.etdp", "decode": out / "decode.etdp"}

    def write(phase: str) -> None:
        # executorch.runtime's wrapper requires a debug buffer path; with debug_buffer_size=0 nothing is
        # written there (no intermediate outputs are recorded).
        files[phase].unlink(missing_ok=True)
        program.write_etdump_result_to_file(str(files[phase]), str(out / f"{phase}.debug.bin"))
        if not files[phase].is_file():
            raise SystemExit(
                "error: this ExecuTorch runtime recorded no ETDump: it was built without the event tracer "
                "(CMake EXECUTORCH_ENABLE_EVENT_TRACER=ON)"
            )

    write("warmup")

    token, prefill_ms = prefill()  # input_pos back at 0: the cache is overwritten from there
    write("prefill")

    tokens, step_ms = [token], []
    for i in range(steps):
        t1 = time.perf_counter()
        token = call([token], len(ids) + i)
        step_ms.append((time.perf_counter() - t1) * 1e3)
        tokens.append(token)
    write("decode")
    return {
        "load_s": load_s,
        "files": files,
        "wall_prefill_ms": prefill_ms,
        "wall_decode_ms_per_step_median": statistics.median(step_ms),
        "tokens": tokens,
        "prefill_calls": len(chunks(ids, max_T)),
    }


# --------------------------------------------------------------------------------------------- analysis


def runs_from_etdump(path: Path) -> list[list[dict]]:
    """Each forward call ("Execute" block run) in the etdump: its events, times in ms, in order.

    Inspector groups identical runs into one EventBlock whose events hold one time per run
    (perf_data.raw); this unrolls them back into runs.
    """
    from executorch.devtools import Inspector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Output Buffer not found": no debug buffer, by design
        inspector = Inspector(etdump_path=str(path))
    runs = []
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        timed = [e for e in block.events if e.perf_data is not None]
        if not timed:
            continue
        n = len(timed[0].perf_data.raw)
        for i in range(n):
            runs.append(
                [
                    {
                        "name": e.name,
                        "ms": float(e.perf_data.raw[i]),
                        "instr": e._instruction_id,  # the method's instruction (Inspector's symbolication key)
                        "delegated": bool(e.is_delegated_op),
                    }
                    for e in timed
                ]
            )
    return runs


def analyse_run(events: list[dict], backend: str) -> dict:
    """One forward call: rows by operator type, per delegate call, per instance, and the total."""
    total = sum(e["ms"] for e in events if e["name"] == "Method::execute")
    by_instr: dict[int, dict] = defaultdict(lambda: {"kind": None, "ms": 0.0, "kernel": None, "ops": []})
    for e in events:
        name, i = e["name"], e["instr"]
        if e["delegated"]:
            by_instr[i]["ops"].append((name, e["ms"]))
        elif name in INSTRUCTION_EVENTS:
            by_instr[i]["kind"] = name
            by_instr[i]["ms"] += e["ms"]
        elif name.startswith(KERNEL_PREFIX):
            by_instr[i]["kernel"] = name[len(KERNEL_PREFIX) :]
    types: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])  # (kind, name) -> [count, ms]
    calls, instances = [], []
    n_delegate = 0
    for i in sorted(by_instr):
        ins = by_instr[i]
        if ins["kind"] == "DELEGATE_CALL":
            ops_ms = sum(ms for _, ms in ins["ops"])
            for name, ms in ins["ops"]:
                row = types[(f"{backend} op", XNN_INSTANCE.sub("", name))]
                row[0] += 1
                row[1] += ms
                instances.append({"name": f"{name} [call {n_delegate}]", "instr": i, "ms": ms})
            over = types[(f"{backend} call", "call overhead (call minus its ops; incl. <1 us/op rounding)")]
            over[0] += 1
            over[1] += ins["ms"] - ops_ms
            calls.append({"call": n_delegate, "instr": i, "ops": len(ins["ops"]), "ms": ins["ms"], "ops_ms": ops_ms})
            n_delegate += 1
        elif ins["kind"] == "OPERATOR_CALL":
            name = ins["kernel"] or f"kernel at instruction {i}"
            row = types[("kernel", name)]
            row[0] += 1
            row[1] += ins["ms"]
            instances.append({"name": name, "instr": i, "ms": ins["ms"]})
        elif ins["kind"] is not None:  # JF / MOVE / FREE
            row = types[("runtime", ins["kind"])]
            row[0] += 1
            row[1] += ins["ms"]
    traced = sum(ins["ms"] for ins in by_instr.values() if ins["kind"] is not None)
    types[("runtime", "between instructions (execute minus instructions)")] = [1, total - traced]
    rows = {f"{k}\t{n}": {"kind": k, "name": n, "count": c, "ms": ms} for (k, n), (c, ms) in types.items()}
    return {"total_ms": total, "rows": rows, "calls": calls, "instances": instances}


def combine(runs: list[dict], how: str) -> dict:
    """Prefill: sum over its forward calls. Decode: median over the steps, row by row."""
    agg = statistics.median if how == "median" else sum
    keys = {k for r in runs for k in r["rows"]}
    rows = []
    for k in keys:
        per_run = [r["rows"][k]["ms"] if k in r["rows"] else 0.0 for r in runs]
        ref = next(r["rows"][k] for r in runs if k in r["rows"])
        count = statistics.median(r["rows"][k]["count"] if k in r["rows"] else 0 for r in runs)
        rows.append(
            {
                "kind": ref["kind"],
                "name": ref["name"],
                "count": count,
                "ms": agg(per_run),
                "mean_ms": statistics.mean(per_run),
                "ms_per_run": per_run,
            }
        )
    total = agg([r["total_ms"] for r in runs])
    total_mean = statistics.mean(r["total_ms"] for r in runs)
    for row in rows:
        row["pct"] = 100 * row["ms"] / total if total else 0.0
    rows.sort(key=lambda r: -r["ms"])
    calls = []
    if how == "median":
        for j, c in enumerate(runs[0]["calls"]):
            same = [r["calls"][j] for r in runs if len(r["calls"]) > j]
            calls.append(
                {
                    **c,
                    "ms": statistics.median(x["ms"] for x in same),
                    "ops_ms": statistics.median(x["ops_ms"] for x in same),
                }
            )
        inst = defaultdict(list)
        for r in runs:
            for x in r["instances"]:
                inst[(x["name"], x["instr"])].append(x["ms"])
        instances = [{"name": n, "instr": i, "ms": statistics.median(v)} for (n, i), v in inst.items()]
    else:
        calls = [{**c, "forward_call": n} for n, r in enumerate(runs) for c in r["calls"]]
        instances = [{**x, "forward_call": n} for n, r in enumerate(runs) for x in r["instances"]]
    calls.sort(key=lambda c: -c["ms"])
    instances.sort(key=lambda x: -x["ms"])
    return {
        "runs": len(runs),
        "how": how,
        "total_ms": total,
        "total_mean_ms": total_mean,
        "total_ms_per_run": [r["total_ms"] for r in runs],
        "rows": rows,
        "delegate_calls": calls,
        "top_instances": instances[:50],
    }


# -------------------------------------------------------------------------------------------- reporting


def print_table(title: str, phase: dict, top: int) -> None:
    med = phase["how"] == "median"
    print(f"\n{title}: Method::execute {phase['total_ms']:.3f} ms ({phase['runs']} forward call(s) profiled)")
    if med:
        per = ", ".join(f"{t:.2f}" for t in phase["total_ms_per_run"])
        print(f"  per step: {per} ms; mean {phase['total_mean_ms']:.3f} ms")
    w = max(20, *(len(r["name"]) for r in phase["rows"][:top]))
    extra = f" {'mean ms':>9}" if med else ""
    print(f"  {'#':>2}  {'kind':<13} {'operator':<{w}} {'count':>6} {'ms':>10} {'%':>6}{extra}")
    for n, r in enumerate(phase["rows"][:top], 1):
        count = f"{r['count']:g}"
        extra = f" {r['mean_ms']:>9.3f}" if med else ""
        print(f"  {n:>2}  {r['kind']:<13} {r['name']:<{w}} {count:>6} {r['ms']:>10.3f} {r['pct']:>6.1f}{extra}")
    rest = phase["rows"][top:]
    if rest:
        print(f"      ({len(rest)} more rows: {sum(r['ms'] for r in rest):.3f} ms)")
    if med:
        print(
            f"      (the rows' medians add up to {sum(r['ms'] for r in phase['rows']):.3f} ms, their means to "
            f"{sum(r['mean_ms'] for r in phase['rows']):.3f} ms: medians do not add up)"
        )
    calls = phase["delegate_calls"]
    if calls:
        print(f"  delegate calls ({len(calls)}), longest first: call#, instruction, ops: call ms = ops ms + overhead")
        for c in calls[: min(top, 8)]:
            fc = f" (forward call {c['forward_call']})" if "forward_call" in c else ""
            print(
                f"    #{c['call']:<3} instr {c['instr']:<4} {c['ops']:>4} ops: {c['ms']:9.3f} = "
                f"{c['ops_ms']:9.3f} + {c['ms'] - c['ops_ms']:7.3f}{fc}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="a bundle folder (manifest.json, model.pte, model.ptd, tokenizer)")
    ap.add_argument("--prompt-len", type=int, default=128, help="tokens in the one profiled prefill")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="decode steps after the prefill")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the plain (no ETDump) timing")
    ap.add_argument("--top", type=int, default=15, help="rows printed per table")
    ap.add_argument("--out", type=Path, default=None, help="where the etdumps and profile.json go")
    args = ap.parse_args()

    from edge import bundle as bundle_mod
    from edge.bench import prompt_ids
    from edge.errors import EdgeError
    from edge.models.tokenizer import Tokenizer

    try:
        manifest = bundle_mod.load(args.bundle)
    except EdgeError as e:
        raise SystemExit(f"error: {e}") from None
    root = Path(manifest["path"])
    if not manifest["artifact"].endswith(".pte"):
        raise SystemExit(f"error: {root} holds {manifest['artifact']}, not an ExecuTorch .pte")
    for name, v in (("--prompt-len", args.prompt_len), ("--steps", args.steps), ("--threads", args.threads)):
        if v < 1:
            raise SystemExit(f"error: {name} must be at least 1")
    max_seq_len = int(manifest["max_seq_len"])
    if args.prompt_len + args.steps > max_seq_len:
        raise SystemExit(
            f"error: --prompt-len {args.prompt_len} + --steps {args.steps} do not fit the bundle's "
            f"max_seq_len {max_seq_len}"
        )
    pte = root / manifest["artifact"]
    weights = manifest["io"].get("weights_file")
    ptd = root / weights["file"] if weights else None
    out = args.out or Path(f"/tmp/profile-{root.name}")
    out.mkdir(parents=True, exist_ok=True)
    backend = "XNNPACK" if manifest["backend"] == "xnnpack" else manifest["backend"]

    tokenizer = Tokenizer(root / manifest["tokenizer"]["file"])
    ids = prompt_ids(tokenizer, args.prompt_len)

    # 1. Plain timing (the project's runner: imports executorch.kernels.quantized, sets the threads).
    from edge.runtime.pte import PteRunner

    runner = PteRunner(pte, threads=args.threads, data_path=ptd)
    max_T = runner.max_T
    print(
        f"[profile] {root.name}: {pte.name} + {ptd.name if ptd else 'no .ptd'}, {args.threads} threads, "
        f"prompt {args.prompt_len} tokens (max T {max_T}), {args.steps} decode steps",
        file=sys.stderr,
    )
    plain = plain_timing(runner, ids, args.steps, args.repeats)
    del runner

    # 2. Profiled.
    prof = profiled_run(pte, ptd, ids, args.steps, max_T, out)
    prefill_runs = [analyse_run(r, backend) for r in runs_from_etdump(prof["files"]["prefill"])]
    decode_runs = [analyse_run(r, backend) for r in runs_from_etdump(prof["files"]["decode"])]
    if len(prefill_runs) != prof["prefill_calls"] or len(decode_runs) != args.steps:
        raise SystemExit(
            f"error: the etdumps hold {len(prefill_runs)} prefill and {len(decode_runs)} decode forward calls, "
            f"expected {prof['prefill_calls']} and {args.steps}"
        )
    prefill = combine(prefill_runs, "sum")
    decode = combine(decode_runs, "median")

    print(f"\n{root.name}  ({manifest['backend']} {manifest['quant']['scheme']['name']}, {args.threads} threads)")
    r, b = plain["runner"], plain["bare_call"]
    print("wall time, ms          no ETDump: runner (edge bench)  bare call   with ETDump: bare call  Method::execute")
    print(
        f"  prefill {args.prompt_len:>4} tokens  {r['prefill_ms']:>31.2f} {b['prefill_ms']:>11.2f} "
        f"{prof['wall_prefill_ms']:>24.2f} {prefill['total_ms']:>16.2f}"
    )
    print(
        f"  decode, per step     {r['decode_ms_per_step_median']:>31.2f} {b['decode_ms_per_step_median']:>11.2f} "
        f"{prof['wall_decode_ms_per_step_median']:>24.2f} {decode['total_ms']:>16.2f}"
    )
    print(
        "  (runner: executorch.runtime Method.execute, which clones the logits; bare call: the pybinding's call"
        " without the clone; no-ETDump figures are medians of"
        f" {args.repeats} rounds, the ETDump ones of the one profiled prefill and the median step)"
    )
    if not (r["tokens"] == b["tokens"] == prof["tokens"]):
        print("  note: the greedy tokens differ between the passes", file=sys.stderr)
    print_table(f"PREFILL ({args.prompt_len} tokens)", prefill, args.top)
    print_table(f"DECODE (median over {args.steps} steps, at positions {args.prompt_len}..)", decode, args.top)

    result = {
        "bundle": str(root),
        "artifact": pte.name,
        "weights": ptd.name if ptd else None,
        "backend": manifest["backend"],
        "scheme": manifest["quant"]["scheme"]["name"],
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "max_T": max_T,
        "executorch": _version(),
        "plain": plain,
        "profiled_wall": {k: v for k, v in prof.items() if k != "files"},
        "etdump_files": {k: str(v) for k, v in prof["files"].items()},
        "prefill": prefill,
        "decode": decode,
        "notes": (
            "times in ms; rows: kernel = a non-delegated instruction (OPERATOR_CALL, named by its "
            "native_call_ kernel event); '<backend> op' = XNNPACK operators inside delegate calls "
            "(XNNPACK basic profiling, whole microseconds); '<backend> call / call overhead' = "
            "DELEGATE_CALL minus its ops; runtime = the rest of Method::execute. Prefill sums its "
            "forward calls; decode is the median over steps per row."
        ),
    }
    (out / "profile.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}/profile.json and {', '.join(p.name for p in prof['files'].values())}")


def _version() -> str:
    try:
        from executorch.version import __version__

        return __version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    main()
