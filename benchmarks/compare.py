"""Our bundles side by side with llama.cpp and eager PyTorch on this machine, in ONE run.

    .venv/bin/python benchmarks/compare.py --bundle exports/gemma3-270m-android-xnnpack-int4-2pass \\
        --bundle exports/gemma3-270m-linux-xnnpack-int8 --out docs/compare

Every contender runs in its own process (its peak RSS is its own), the same 128-token prompt (real
prose in the Gemma 3 tokenizer, BOS first) and 128 greedy tokens, `--threads` threads; the contenders
take turns, in a rotated order each round, and the table gives medians over `--rounds` rounds, so that
load on this shared machine hits all of them alike. Read bandwidth is measured in the same run, once a
round: decode reads every weight once a token, so bandwidth / model bytes is decode's ceiling.

Contenders: each `--bundle` through `edge bench` (its own runner), and a bundle's `model.litertlm` also in
LiteRT-LM's own engine (benchmarks/peers/litert_lm_bench.py; no accuracy column: the same program as the
bundle's `.tflite`, whose greedy tokens tests/test_real_device_formats.py checks); llama.cpp on the same GGUF the
bundles were made from (llama-cpp-python built from source in its own venv by
benchmarks/peers/llama_cpp.sh, its build flags recorded); ExecuTorch's stock LLM export of the same weights
(optimum-executorch's recipe: 8da4w linears, 8-bit embedding, custom SDPA and KV cache; exported in its own
venv by benchmarks/peers/executorch_stock.sh, included when built, run by executorch_stock_bench.py);
eager PyTorch fp32 (`--eager`).
Accuracy: each bundle's `edge validate --stages lowered` (mean KLD / top-1 vs the fp32 reference on the
golden prompts), and llama.cpp's and the stock export's logits on the same golden prompts scored by the same code.

Writes OUT/compare.json (every round's raw figures), OUT/compare.md (the table) and OUT/compare.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EDGE = [sys.executable, "-m", "edge"]
CACHE = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "gemma-edge"))
LLAMA_VENV = CACHE / "peers" / "llama-cpp" / "venv"
LLAMA_BENCH = ROOT / "benchmarks" / "peers" / "llama_cpp_bench.py"
LITERT_LM_BENCH = ROOT / "benchmarks" / "peers" / "litert_lm_bench.py"
STOCK_DIR = CACHE / "peers" / "executorch-stock"
STOCK_PY = STOCK_DIR / "venv" / "bin" / "python"
STOCK_PTE = STOCK_DIR / "model.pte"
STOCK_BENCH = ROOT / "benchmarks" / "peers" / "executorch_stock_bench.py"
STOCK = "ExecuTorch stock (optimum-executorch 8da4w) .pte"


def run_json(cmd: list[str], timeout: float = 3600) -> dict:
    """One contender's process; its last stdout line is its JSON. A failure names the command."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode not in (0, 1):  # edge validate exits 1 on FAIL, still with its JSON
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import psutil

    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


# ---- contenders -------------------------------------------------------------------------------------


def bundle_cmd(path: Path, a) -> list[str]:
    return [*EDGE, "bench", str(path), "--json", "--repeats", "1", "--threads", str(a.threads),
            "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len)]  # fmt: skip


def llama_cmd(gguf: Path, ids_file: Path, a) -> list[str]:
    return [str(LLAMA_VENV / "bin" / "python"), str(LLAMA_BENCH), "--gguf", str(gguf), "--prompt-ids",
            str(ids_file), "--gen-len", str(a.gen_len), "--threads", str(a.threads), "--repeats", "1"]  # fmt: skip


def stock_cmd(ids_file: Path, a) -> list[str]:
    return [str(STOCK_PY), str(STOCK_BENCH), "--pte", str(STOCK_PTE), "--prompt-ids", str(ids_file), "--gen-len",
            str(a.gen_len), "--threads", str(a.threads), "--repeats", "1"]  # fmt: skip


def litert_lm_cmd(manifest: dict, a) -> list[str] | None:
    """A bundle's `model.litertlm` in LiteRT-LM's own engine and benchmark (None: the bundle has none)."""
    package = manifest["io"].get("package")
    if not package:
        return None
    root = Path(manifest["path"])
    size = (root / manifest["artifact"]).stat().st_size
    return [sys.executable, str(LITERT_LM_BENCH), "--litertlm", str(root / package["file"]), "--prompt-len",
            str(a.prompt_len), "--gen-len", str(a.gen_len), "--threads", str(a.threads), "--max-num-tokens",
            str(manifest["max_seq_len"]), "--model-bytes", str(size)]  # fmt: skip


def eager_cmd(ids_file: Path, a) -> list[str]:
    return [sys.executable, __file__, "--eager-worker", str(ids_file), "--gen-len", str(a.gen_len),
            "--threads", str(a.threads)]  # fmt: skip


def eager_worker(ids_file: Path, gen_len: int, threads: int) -> dict:
    """The re-authored 270M in eager PyTorch fp32, timed like a bundle (edge.bench.time_runner)."""
    import time

    import torch

    from edge.bench import rss_mb, time_runner
    from edge.models.loading import load_weights
    from edge.models.variants import get_variant
    from edge.progress import peak_rss_mb
    from edge.runtime.eager import EagerRunner

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    ids = json.loads(ids_file.read_text())
    t = time.perf_counter()
    loaded = load_weights(get_variant("270m"), None, False, 0)
    runner = EagerRunner(loaded.build(1024))
    load_s = time.perf_counter() - t
    loaded_rss = rss_mb()
    timed = time_runner(runner, ids, gen_len, 1, say=lambda _: None)
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    return {"load_s": load_s, **timed, "model_bytes": weights,
            "memory_mb": {"after_load": round(loaded_rss, 1), "peak": round(peak_rss_mb(), 1)}}  # fmt: skip


# ---- accuracy ---------------------------------------------------------------------------------------


def bundle_accuracy(path: Path, threads: int) -> dict:
    r = run_json([*EDGE, "validate", str(path), "--stages", "lowered", "--json", "--threads", str(threads)])
    o = r["stages"]["lowered"]["overall"]
    return {"mean_kld": o["mean_kld"], "top1": o["top1"], "verdict": r["verdict"]["passed"]}


def peer_accuracy(cmd: list[str], golden_file: Path) -> dict:
    """A peer's logits on the golden prompts (its bench script's --observe), through the same Observed /
    score code as a device dump."""
    from edge.validate import golden
    from edge.validate import stages as st

    prompts = golden.load(golden_file)
    with tempfile.TemporaryDirectory() as d:
        req = Path(d) / "golden-request.npz"
        out = Path(d) / "observed.npz"
        st.write_observe_request(req, prompts)
        run_json([*cmd, "--observe", str(req), "--observe-out", str(out)])
        observed, _ = st.load_dump(out)
    o = st.score(prompts, observed)["overall"]
    return {"mean_kld": o["mean_kld"], "top1": o["top1"], "verdict": None}


# ---- table ------------------------------------------------------------------------------------------


def med(rows: list[dict], key: str, sub: str | None = None):
    vals = [(r[key][sub] if sub else r[key]) for r in rows if r.get(key) is not None]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(name: str, rows: list[dict], bandwidth: float, acc: dict | None) -> dict:
    decode = med(rows, "decode_tok_s")
    size = rows[0].get("model_bytes")
    return {
        "name": name,
        "model_mb": size / 1e6 if size else None,
        "load_s": med(rows, "load_s"),
        "ttft_ms": med(rows, "time_to_first_token_ms"),
        "prefill_tok_s": med(rows, "prefill_tok_s"),
        "decode_tok_s": decode,
        "p90_ms": med(rows, "decode_ms_per_token", "p90"),
        "peak_rss_mb": med(rows, "memory_mb", "peak"),
        "ceiling_fraction": decode / (bandwidth * 1e9 / size) if decode and size else None,
        "mean_kld": acc and acc.get("mean_kld"),
        "top1": acc and acc.get("top1"),
        "rounds": len(rows),
    }


def markdown(result: dict) -> str:
    cols = [("name", "runtime, artifact", "{}"), ("model_mb", "MB", "{:.1f}"), ("load_s", "load s", "{:.2f}"),
            ("ttft_ms", "TTFT ms", "{:.0f}"), ("prefill_tok_s", "prefill tok/s", "{:.0f}"),
            ("decode_tok_s", "decode tok/s", "{:.1f}"), ("p90_ms", "p90 ms/token", "{:.1f}"),
            ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("ceiling_fraction", "of ceiling", "{:.0%}"),
            ("mean_kld", "mean KLD", "{:.4f}"), ("top1", "top-1", "{:.2%}")]  # fmt: skip
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in result["rows"]:
        lines.append("| " + " | ".join("-" if row.get(k) is None else f.format(row[k]) for k, _, f in cols) + " |")
    m, a = result["machine"], result["args"]
    ratios = []
    # Every row against llama.cpp; ours against the stock ExecuTorch export too (the goal: decode >= 1.25x it).
    for prefix, whom, only in (("llama.cpp", "llama.cpp", ""), (STOCK, "ExecuTorch stock", "gemma-edge")):
        base = next((r for r in result["rows"] if r["name"].startswith(prefix)), None)
        for r in result["rows"] if base and base["decode_tok_s"] else []:
            if r is not base and r["name"].startswith(only) and r["decode_tok_s"]:
                ratios.append(f"{r['name']}: decode {r['decode_tok_s'] / base['decode_tok_s']:.2f}x, prefill "
                              f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x {whom}")  # fmt: skip
    return "\n".join([
        f"Measured {result['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB), {a['threads']} threads,"
        f" {a['prompt_len']}-token prompt then {a['gen_len']} greedy tokens, medians of {a['rounds']} alternated"
        f" rounds; read bandwidth {result['bandwidth_gb_s']:.1f} GB/s (median of the rounds; the ceiling is"
        " bandwidth / model bytes). Accuracy: mean KLD and top-1 vs the fp32 reference on the golden prompts.",
        "", *lines, "", *(f"- {r}" for r in ratios), ""])  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 1.6))
    for ax, key, title in ((axes[0], "decode_tok_s", "decode tok/s"), (axes[1], "prefill_tok_s", "prefill tok/s")):
        vals = [r[key] or 0 for r in rows]
        peer = ("llama", "eager", "ExecuTorch")
        bars = ax.barh(names, vals, color=["#888" if n.startswith(peer) else "#2a7" for n in names])
        ax.bar_label(bars, fmt="%.0f", padding=3)
        ax.set_title(title)
        ax.invert_yaxis()
        ax.margins(x=0.15)
    axes[1].set_yticks([])
    fig.suptitle(f"Gemma 3 270M, {result['args']['threads']} threads, {result['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- main -------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, action="append", default=[], help="a bundle folder (repeatable)")
    p.add_argument("--gguf", type=Path, default=CACHE / "gemma-3-270m-q4_k_m.gguf", help="llama.cpp's model")
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--no-stock-executorch", action="store_true", help="leave out ExecuTorch's stock export")
    p.add_argument("--eager", action="store_true", help="also eager PyTorch fp32")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "compare")
    p.add_argument("--render", action="store_true", help="only rewrite OUT/compare.md and .png from OUT/compare.json")
    p.add_argument("--eager-worker", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.eager_worker:
        print(json.dumps(eager_worker(a.eager_worker, a.gen_len, a.threads)))
        return
    if a.render:
        return render(json.loads((a.out / "compare.json").read_text()), a.out)

    from edge import bundle as bundle_mod
    from edge.bench import prompt_ids, read_bandwidth_gb_s
    from edge.models.tokenizer import Tokenizer

    manifests = {b: bundle_mod.load(b) for b in a.bundle}
    if not manifests and a.no_llama_cpp and (a.no_stock_executorch or not STOCK_PTE.exists()) and not a.eager:
        p.error("nothing to compare: give --bundle, or leave llama.cpp / add --eager")
    tok_file = next((Path(m["path"]) / m["tokenizer"]["file"] for m in manifests.values()), None)
    if tok_file is None:
        from edge.models.loading import load_weights
        from edge.models.variants import get_variant

        tokenizer = load_weights(get_variant("270m"), None, False, 0).tokenizer
    else:
        tokenizer = Tokenizer(tok_file)
    a.out.mkdir(parents=True, exist_ok=True)
    ids_file = a.out / "prompt-ids.json"
    ids_file.write_text(json.dumps(prompt_ids(tokenizer, a.prompt_len)))

    def base_label(m: dict) -> str:
        kind = {"executorch": ".pte", "litert": ".tflite", "onnx": ".onnx"}.get(m["backend_family"], "")
        return f"gemma-edge {m['backend']} {m['quant']['scheme']['name']} {kind}"

    bases = [base_label(m) for m in manifests.values()]
    # Two bundles of the same kind (e.g. before / after a change) are told apart by their folder names.
    labels = {b: base_label(m) + (f" ({b.name})" if bases.count(base_label(m)) > 1 else "")
              for b, m in manifests.items()}  # fmt: skip

    def label(m: dict) -> str:
        return labels[Path(m["path"])]

    contenders = {label(m): bundle_cmd(b, a) for b, m in manifests.items()}
    for m in manifests.values():  # a .tflite bundle also in the runtime apps use (ours copies the KV cache)
        cmd = litert_lm_cmd(m, a)
        if cmd is not None:
            contenders[f"LiteRT-LM {m['quant']['scheme']['name']} .litertlm" + label(m)[len(base_label(m)) :]] = cmd
    if not a.no_llama_cpp:
        if not (LLAMA_VENV / "bin" / "python").exists():
            raise SystemExit(f"no llama.cpp venv at {LLAMA_VENV}: run benchmarks/peers/llama_cpp.sh first")
        contenders["llama.cpp Q4_K_M .gguf"] = llama_cmd(a.gguf, ids_file, a)
    if not a.no_stock_executorch:
        if STOCK_PTE.exists() and STOCK_PY.exists():
            contenders[STOCK] = stock_cmd(ids_file, a)
        else:  # a 16-minute export: not built on the fly
            print(f"no stock ExecuTorch peer at {STOCK_PTE}: build it with benchmarks/peers/executorch_stock.sh;"
                  " skipped", file=sys.stderr)  # fmt: skip
    if a.eager:
        contenders["eager PyTorch fp32"] = eager_cmd(ids_file, a)

    raw: dict[str, list[dict]] = {n: [] for n in contenders}
    bandwidths = []
    names = list(contenders)
    for rnd in range(a.rounds):
        bandwidths.append(read_bandwidth_gb_s(a.threads))
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for n in order:
            r = run_json(contenders[n])
            raw[n].append(r)
            print(f"round {rnd + 1}/{a.rounds} {n}: prefill {r['prefill_tok_s']:.0f}, decode "
                  f"{r['decode_tok_s']:.1f} tok/s", file=sys.stderr)  # fmt: skip
    bandwidth = statistics.median(bandwidths)

    acc: dict[str, dict] = {}
    if not a.no_accuracy:
        for b, m in manifests.items():
            acc[label(m)] = bundle_accuracy(b, a.threads)
        # The peers are scored on a bundle's golden prompts (without a bundle, none to score on).
        golden_file = next((Path(m["path"]) / m["golden"]["file"] for m in manifests.values()), None)
        peers = {"llama.cpp Q4_K_M .gguf": [str(LLAMA_VENV / "bin" / "python"), str(LLAMA_BENCH), "--gguf",
                                            str(a.gguf)],
                 STOCK: [str(STOCK_PY), str(STOCK_BENCH), "--pte", str(STOCK_PTE)]}  # fmt: skip
        for n, cmd in peers.items():
            if n in contenders and golden_file is not None:
                acc[n] = peer_accuracy([*cmd, "--threads", str(a.threads)], golden_file)
        if a.eager:
            acc["eager PyTorch fp32"] = {"mean_kld": 0.0, "top1": 1.0}  # the reference itself
    # Greedy tokens of the same model in two runtimes may part at a near-tie; recorded, not asserted.
    gen = {n: rows[0].get("generated_ids") for n, rows in raw.items()}
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "args": {"threads": a.threads, "prompt_len": a.prompt_len, "gen_len": a.gen_len, "rounds": a.rounds},
        "bandwidth_gb_s": bandwidth,
        "bandwidths_gb_s": bandwidths,
        "rows": [summarize(n, raw[n], bandwidth, acc.get(n)) for n in names],
        "generated_ids": gen,
        "raw": raw,
    }
    llama_build = CACHE / "peers" / "llama-cpp" / "build.json"
    if not a.no_llama_cpp and llama_build.exists():
        result["llama_cpp_build"] = json.loads(llama_build.read_text())
    if STOCK in contenders and (STOCK_DIR / "build.json").exists():
        result["executorch_stock_build"] = json.loads((STOCK_DIR / "build.json").read_text())
    (a.out / "compare.json").write_text(json.dumps(result, indent=1))
    render(result, a.out)


def render(result: dict, out: Path) -> None:
    table = markdown(result)
    (out / "compare.md").write_text(table)
    try:
        plot(result, out / "compare.png")
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no PNG", file=sys.stderr)
    print(table)


if __name__ == "__main__":
    main()
