"""Size / accuracy frontier of the 270M's schemes: a Markdown table and a PNG plot from measured results.

    .venv/bin/python benchmarks/schemes.py --quant fp32,int8,int4,int4-hqq,int4-g128,rtn-int8,rtn-int4 --out DIR
    .venv/bin/python benchmarks/frontier.py DIR/results-xnnpack.json --png docs/frontier.png --md docs/frontier.md

Reads what benchmarks/schemes.py measured (the artifact's bytes as a device loads them, mean KLD and
top-1 vs the fp32 reference on the golden prompts, decode tok/s) and marks the schemes that no other
scheme beats on both size and KLD. llama.cpp running the source Q4_K_M file is drawn as a reference
point: 253.1 MB (the GGUF), KLD 0.0053 / top-1 96.7%, measured on this machine by the same metric
(shared/notes/quant-accuracy.md); it is not re-measured here (llama-cpp-python is a source build).
The plot needs matplotlib (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LLAMA_CPP = {"artifact_mb": 253.1, "mean_kld": 0.0053, "top1": 0.967}
KLD_FLOOR = 1e-7  # fp32's KLD is ~1e-6: plotted on a log axis, a zero would vanish


def frontier(rows: dict[str, dict]) -> set[str]:
    """Schemes for which no other scheme is at most as large and at most as wrong, and better in one."""

    def beaten(a: dict, b: dict) -> bool:
        le = b["artifact_mb"] <= a["artifact_mb"] and b["mean_kld"] <= a["mean_kld"]
        return le and (b["artifact_mb"] < a["artifact_mb"] or b["mean_kld"] < a["mean_kld"])

    return {q for q, a in rows.items() if not any(beaten(a, b) for p, b in rows.items() if p != q)}


def _kld(x: float) -> str:
    return f"{x:.4f}" if x >= 1e-3 else f"{x:.1e}"


def table(rows: dict[str, dict], backend: str) -> str:
    front = frontier(rows)
    lines = [
        f"| scheme ({backend}) | size MB | mean KLD | top-1 | decode tok/s | on the frontier |",
        "|---|---|---|---|---|---|",
    ]
    for q, r in sorted(rows.items(), key=lambda kv: kv[1]["artifact_mb"]):
        speed = r.get("decode_tok_s", "-")
        lines.append(
            f"| {q} | {r['artifact_mb']:.1f} | {_kld(r['mean_kld'])} | {r['top1']:.1%} | {speed} |"
            f" {'yes' if q in front else ''} |"
        )
    c = LLAMA_CPP
    lines.append(f"| llama.cpp Q4_K_M (reference) | {c['artifact_mb']} | {c['mean_kld']} | {c['top1']:.1%} | - | |")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict], backend: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = frontier(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    labels = []
    for q, r in sorted(rows.items(), key=lambda kv: (kv[1]["artifact_mb"], -kv[1]["mean_kld"])):
        on = q in front
        ax.scatter(r["artifact_mb"], max(r["mean_kld"], KLD_FLOOR), color="C0" if on else "C7", zorder=3)
        labels.append(
            ax.annotate(
                f"{q} ({r['top1']:.1%})",
                (r["artifact_mb"], max(r["mean_kld"], KLD_FLOOR)),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
            )
        )
    pts = sorted((rows[q]["artifact_mb"], max(rows[q]["mean_kld"], KLD_FLOOR)) for q in front)
    ax.plot(*zip(*pts, strict=True), color="C0", lw=1, zorder=2)
    c = LLAMA_CPP
    ax.scatter(c["artifact_mb"], c["mean_kld"], marker="*", s=120, color="C3", zorder=3)
    ax.annotate(
        f"llama.cpp Q4_K_M ({c['top1']:.1%})",
        (c["artifact_mb"], c["mean_kld"]),
        textcoords="offset points",
        xytext=(6, -12),
        fontsize=8,
        color="C3",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    sizes = [r["artifact_mb"] for r in rows.values()]
    ticks = [
        t
        for t in (100, 150, 200, 300, 500, 700, 1000, 1500, 2000, 3000, 5000)
        if 0.6 * min(sizes) < t < 1.5 * max(sizes)
    ]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    _unstack(fig, labels)
    ax.set_xlabel("bundle weights (MB, what the device loads)")
    ax.set_ylabel("mean KLD vs fp32 (golden prompts)")
    ax.set_title(f"Gemma 3 270M on {backend}: size vs accuracy (top-1 in brackets)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _unstack(fig, labels) -> None:
    """Move each label down, in order, until it overlaps no label placed before it (nearby schemes)."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for a in labels:
        for _ in range(8):
            box = a.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed):
                break
            x, y = a.xyann
            a.xyann = (x, y - 10)
        placed.append(a.get_window_extent(renderer))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="results-<backend>.json written by benchmarks/schemes.py")
    ap.add_argument("--png", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    rows = json.loads(args.results.read_text())
    backend = args.results.stem.removeprefix("results-")
    md = table(rows, backend)
    print(md)
    if args.md:
        png = f"\n![size vs KLD]({args.png.name})\n" if args.png and args.png.parent == args.md.parent else ""
        head = (
            f"# Size / accuracy frontier: Gemma 3 270M, {backend}\n\n"
            f"Written by `benchmarks/frontier.py {args.results}` from what `benchmarks/schemes.py`\n"
            "measured: the bytes a device loads; mean KLD and top-1 of the lowered artifact vs the fp32\n"
            "reference on the golden prompts (`edge validate`); decode tok/s through the artifact's runner\n"
            "('-' where not measured yet). On the frontier: no other scheme is both as small and as accurate.\n"
            "llama.cpp's point is its own runtime on the source Q4_K_M file, measured with the same metric\n"
            "(shared/notes/quant-accuracy.md; the script does not re-measure it).\n"
        )
        args.md.write_text(head + png + "\n" + md)
    if args.png:
        plot(rows, backend, args.png)
        print(f"plot written to {args.png}")


if __name__ == "__main__":
    main()
