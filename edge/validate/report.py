"""`edge validate --report DIR`: DIR/report.json (the result) and DIR/report.html (what a person reads).

The HTML is self-contained: one file, no scripts, no external CSS, fonts or images; the plots are
inline SVG drawn here. Every number in its tables carries `data-key` (the dotted path of the value
in report.json) and `data-value` (its full precision), so a test can check the page against the JSON.
Standard library only: the device mode has numpy and a runtime, nothing more.
"""

from __future__ import annotations

import json
import math
import os
from html import escape
from pathlib import Path

from edge.errors import EdgeError
from edge.jsonout import json_safe  # noqa: F401 (tests and callers import it from here too)

STAGE_ORDER = ("reference", "re-authored", "quantized", "lowered", "device")
COLORS = {
    "reference": "#6b7280",
    "re-authored": "#2563eb",
    "quantized": "#d97706",
    "lowered": "#7c3aed",
    "device": "#db2777",
}
# The stages that often agree (reference and re-authored; quantized and lowered; lowered and device)
# differ in width or dash: the one drawn first shows as a halo around the next.
STROKES = {
    "reference": 'stroke-width="5" stroke-opacity="0.5"',
    "re-authored": 'stroke-width="2" stroke-opacity="0.95"',
    "quantized": 'stroke-width="4" stroke-opacity="0.55"',
    "lowered": 'stroke-width="1.8" stroke-opacity="0.95"',
    "device": 'stroke-width="1.6" stroke-opacity="0.95" stroke-dasharray="6 3"',
}
COLUMNS = (
    ("positions", "positions"),
    ("mean_kld", "mean KLD"),
    ("p99_kld", "p99 KLD"),
    ("max_kld", "max KLD"),
    ("top1", "top-1"),
    ("top5_overlap", "top-5"),
    ("max_abs_dlogit", "max |Δlogit|"),
    ("ppl_ratio", "ppl ratio"),
)
VERDICT_WORDS = {True: "PASS", False: "FAIL", None: "MEASURED"}


# ---- JSON ---------------------------------------------------------------------------------------


# ---- formatting (the test formats the JSON values with these same functions) ---------------------


def fmt(key: str, value) -> str:
    """How a value shows in the tables, by its metric name (the last part of its data-key)."""
    if key == "passed":
        return VERDICT_WORDS[value]
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "ok" if value else "FAILED"
    if key == "positions":
        return str(int(value))
    if key in ("top1", "top5_overlap", "ppl_ratio", "top1_agreement"):
        return f"{value:.4f}"
    if key in ("cap", "max_abs_logit"):
        return f"{value:.6g}"
    return f"{value:.3g}"


def _tagged(tag: str, path: str, value, cls: str = "") -> str:
    """An element showing one value of report.json: its dotted path, its full value, its text."""
    key = path.rsplit(".", 1)[-1]
    raw = "null" if value is None else json.dumps(value)
    c = f' class="{cls}"' if cls else ""
    return f'<{tag}{c} data-key="{escape(path)}" data-value="{escape(raw)}">{escape(fmt(key, value))}</{tag}>'


def _num(path: str, value, cls: str = "") -> str:
    return _tagged("td", path, value, cls)


def _breaks(key: str, value, band: dict) -> bool:
    """Whether this cell alone is outside the scheme's band (same limits as run.breaks)."""
    if value is None or not band:
        return False
    if key == "mean_kld" and band.get("mean_kld") is not None:
        return value > band["mean_kld"]
    if key == "top1" and band.get("top1") is not None:
        return value < band["top1"]
    if key == "max_abs_dlogit" and band.get("max_abs_logit") is not None:
        return value > band["max_abs_logit"]
    return False


def _row_cells(path: str, row: dict, band: dict, renamed: dict[str, str] | None = None) -> str:
    """One cell per column; `renamed` maps a column to the key its value has in this row."""
    out = []
    for col, _ in COLUMNS:
        key = (renamed or {}).get(col, col)
        if key in row:
            out.append(_num(f"{path}.{key}", row[key], "bad" if _breaks(key, row[key], band) else ""))
        else:
            out.append('<td class="na" title="not measured">—</td>')
    return "".join(out)


def _head(first: str) -> str:
    cols = "".join(f"<th>{escape(label)}</th>" for _, label in COLUMNS)
    return f"<thead><tr><th>{escape(first)}</th>{cols}</tr></thead>"


def _band_row(band: dict) -> str:
    if not band:
        return ""
    limit = {
        "mean_kld": f"≤ {band['mean_kld']}" if band.get("mean_kld") is not None else "",
        "top1": f"≥ {band['top1']}" if band.get("top1") is not None else "",
        "max_abs_dlogit": f"≤ {band['max_abs_logit']}" if band.get("max_abs_logit") is not None else "",
    }
    cells = "".join(f"<td>{escape(limit.get(k, ''))}</td>" for k, _ in COLUMNS)
    return f'<tfoot><tr class="band"><th>band</th>{cells}</tr></tfoot>'


# ---- SVG ----------------------------------------------------------------------------------------


def _sup(n: int) -> str:
    return str(n).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))


def _nice_step(span: float, most: int = 8) -> float:
    raw = max(span, 1e-12) / most
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def kld_decades(stages: dict) -> tuple[int, int]:
    """The shared log-scale y range of the KLD panels, in whole decades (at most 12 of them)."""
    values = [v for s in stages.values() for vs in s["kld_by_position"].values() for v in vs if v and v > 0]
    if not values:
        return -12, 0
    hi = math.ceil(math.log10(max(values)))
    lo = math.floor(math.log10(min(values)))
    lo = min(max(lo, hi - 12), hi - 1)
    return (lo - 1, hi) if hi - lo > 6 and (hi - lo) % 2 else (lo, hi)  # labels every 2nd decade: even span


def kld_panel(prompt: str, series: list[tuple[str, list]], window: int | None, decades: tuple[int, int]) -> str:
    """One prompt's KLD per position: a line per stage on a log y axis; the sliding window dashed."""
    w, h = 560, 250
    left, right, top, bottom = 58, 14, 40, 38
    pw, ph = w - left - right, h - top - bottom
    lo, hi = decades
    n = max((len(v) for _, v in series), default=1)
    xmax = max(n - 1, 1)

    def x(i: float) -> float:
        return left + pw * i / xmax

    def y(v) -> float:
        lv = math.log10(v) if v and v > 0 else lo
        lv = min(max(lv, lo), hi)
        return top + ph * (hi - lv) / (hi - lo)

    parts = [
        f'<svg class="panel" viewBox="0 0 {w} {h}" role="img" aria-label="KLD per position, {escape(prompt)}" '
        f'data-prompt="{escape(prompt)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{left}" y="18" class="title">{escape(prompt)}</text>',
        f'<text x="{w - right}" y="18" class="sub" text-anchor="end">{n} positions</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>',
    ]
    every = 1 if hi - lo <= 6 else 2 if hi - lo <= 12 else 3
    for d in range(lo, hi + 1):
        yy = y(10.0**d)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}" class="grid"/>')
        if (hi - d) % every == 0:
            parts.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" class="tick" text-anchor="end">10{_sup(d)}</text>')
    step = max(1, int(_nice_step(xmax)))
    for i in range(0, xmax + 1, step):
        xx = x(i)
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top + ph}" y2="{top + ph + 4}" class="axis"/>')
        parts.append(f'<text x="{xx:.1f}" y="{top + ph + 17}" class="tick" text-anchor="middle">{i}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{h - 4}" class="label" text-anchor="middle">position</text>')
    parts.append(
        f'<text transform="translate(13 {top + ph / 2}) rotate(-90)" class="label" text-anchor="middle">KLD</text>'
    )
    if window and 0 < window <= xmax:
        xx = x(window)
        anchor = "end" if window > 0.8 * xmax else "middle" if window > 0.1 * xmax else "start"
        parts.append(
            f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top}" y2="{top + ph}" class="window" data-window="{window}"/>'
        )
        parts.append(
            f'<text x="{xx:.1f}" y="{top - 5}" class="wlabel" text-anchor="{anchor}">sliding window {window}</text>'
        )
    for stage, values in series:
        pts = " ".join(
            f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values) if v is not None and not math.isnan(float(v))
        )
        parts.append(
            f'<polyline points="{pts}" fill="none" stroke="{COLORS.get(stage, "#111827")}" '
            f'{STROKES.get(stage, STROKES["lowered"])} stroke-linejoin="round" '
            f'data-stage="{escape(stage)}" data-prompt="{escape(prompt)}" data-n="{len(values)}">'
            f"<title>{escape(stage)} · {escape(prompt)}</title></polyline>"
        )
    parts.append("</svg>")
    return "".join(parts)


def top1_bars(stages: dict, band: dict) -> str:
    """Top-1 agreement by stage: horizontal bars on 0..1, the band's top-1 limit dashed."""
    names = list(stages)
    w, bar, gap, top, left, right = 560, 24, 12, 26, 100, 24
    h = top + len(names) * (bar + gap) + 30
    pw = w - left - right
    parts = [
        f'<svg class="bars" viewBox="0 0 {w} {h}" role="img" aria-label="top-1 agreement by stage" '
        'xmlns="http://www.w3.org/2000/svg">'
    ]
    base = top + len(names) * (bar + gap)
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        xx = left + pw * t
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top - 4}" y2="{base}" class="grid"/>')
        parts.append(f'<text x="{xx:.1f}" y="{base + 16}" class="tick" text-anchor="middle">{t:g}</text>')
    for i, name in enumerate(names):
        v = stages[name]["overall"].get("top1")
        yy = top + i * (bar + gap)
        parts.append(
            f'<text x="{left - 8}" y="{yy + bar / 2 + 4}" class="tick" text-anchor="end">{escape(name)}</text>'
        )
        if v is None:
            continue
        bad = _breaks("top1", v, band)
        parts.append(
            f'<rect x="{left}" y="{yy}" width="{pw * max(0.0, min(1.0, v)):.1f}" height="{bar}" rx="3" '
            f'fill="{COLORS.get(name, "#111827")}" data-stage="{escape(name)}" data-top1="{v}"/>'
        )
        inside = v > 0.25  # the value in white at the bar's start (clear of the band line); past a short bar
        cls = ("value in" if inside else "value") + (" bad" if bad else "")
        xx = left + 8 if inside else left + pw * max(v, 0.0) + 6
        parts.append(f'<text x="{xx:.1f}" y="{yy + bar / 2 + 4}" class="{cls}">{v:.4f}</text>')
    if band.get("top1") is not None:
        xx = left + pw * band["top1"]
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top - 8}" y2="{base}" class="limit"/>')
        parts.append(
            f'<text x="{xx - 4:.1f}" y="{top - 12}" class="limitlabel" text-anchor="end">band ≥ {band["top1"]}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


# ---- the page -----------------------------------------------------------------------------------

CSS = """
:root { --fg:#111827; --muted:#6b7280; --line:#e5e7eb; --bg:#f5f6f8; --card:#fff;
        --pass:#15803d; --fail:#b91c1c; --measured:#1d4ed8; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font:14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Roboto, sans-serif; }
main { max-width:1240px; margin:0 auto; padding:24px 28px 40px; }
header.top { display:flex; gap:20px; align-items:flex-start; justify-content:space-between; flex-wrap:wrap; }
h1 { font-size:22px; margin:0 0 4px; }
h2 { font-size:16px; margin:0 0 10px; }
h3 { font-size:14px; margin:18px 0 6px; }
.muted, .what { color:var(--muted); }
.what { font-size:12px; font-weight:normal; display:block; }
code, .mono { font-family:"DejaVu Sans Mono", ui-monospace, monospace; font-size:12.5px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:16px 18px;
        margin-top:16px; box-shadow:0 1px 2px rgba(0,0,0,.04); }
.verdict { display:flex; gap:14px; align-items:center; padding:14px 18px; border-radius:10px;
           border:1px solid var(--line); background:var(--card); min-width:360px; max-width:640px; }
.badge { font-weight:700; letter-spacing:.06em; color:#fff; padding:6px 12px; border-radius:6px; font-size:15px; }
.badge.pass { background:var(--pass); } .badge.fail { background:var(--fail); }
.badge.measured { background:var(--measured); }
.verdict.pass { border-color:#86efac; background:#f0fdf4; }
.verdict.fail { border-color:#fca5a5; background:#fef2f2; }
.verdict.measured { border-color:#93c5fd; background:#eff6ff; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th:first-child, td:first-child { text-align:left; }
thead th { font-size:12px; color:var(--muted); font-weight:600; border-bottom:2px solid var(--line); }
tbody th { font-weight:600; }
tr.sub th { font-weight:normal; padding-left:26px; color:var(--muted); }
tr.sub td { color:#374151; font-size:13px; }
tfoot th, tfoot td { color:var(--muted); font-size:12px; border-bottom:none; }
td.bad, tr.sub td.bad { color:var(--fail); font-weight:700; }
td.na { color:#9ca3af; }
.swatch { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:6px; vertical-align:0; }
.note { margin:10px 0 0; font-size:12.5px; color:var(--muted); }
.legend { display:flex; gap:18px; flex-wrap:wrap; margin:0 0 8px; font-size:13px; }
.legend span { display:inline-flex; align-items:center; }
.legend svg { width:28px; height:10px; display:inline-block; margin-right:6px; }
.panels { display:grid; grid-template-columns:repeat(2, minmax(0, 1fr)); gap:12px 22px; }
.two { display:grid; grid-template-columns:minmax(0, 3fr) minmax(0, 2fr); gap:16px; }
.two > .card { margin-top:16px; }
svg { width:100%; height:auto; display:block; font-family:"DejaVu Sans", system-ui, sans-serif; }
svg .title { font-size:14px; font-weight:600; fill:var(--fg); }
svg .sub, svg .tick { font-size:11px; fill:var(--muted); }
svg .label { font-size:11px; fill:var(--muted); }
svg .value { font-size:12px; fill:var(--fg); font-weight:600; } svg .value.bad { fill:var(--fail); }
svg .value.in { fill:#fff; } svg .value.in.bad { fill:#fff; text-decoration:underline; }
svg .limitlabel { font-size:11px; fill:var(--fail); }
svg .frame { fill:none; stroke:#d1d5db; }
svg .grid { stroke:#eef0f3; } svg .axis { stroke:#9ca3af; }
svg .window { stroke:#111827; stroke-dasharray:5 4; stroke-width:1.2; opacity:.55; }
svg .wlabel { font-size:11px; fill:#374151; }
svg .limit { stroke:var(--fail); stroke-dasharray:5 4; stroke-width:1.5; }
ul.probes { list-style:none; padding:0; margin:0; }
ul.probes li { padding:5px 0; border-bottom:1px solid var(--line); display:flex; justify-content:space-between; }
ul.probes li:last-child { border-bottom:none; }
.ok { color:var(--pass); font-weight:700; } .failed { color:var(--fail); font-weight:700; }
footer { margin-top:22px; font-size:12px; color:var(--muted); }
"""


def _ordered(stages: dict) -> list[str]:
    return [s for s in STAGE_ORDER if s in stages] + [s for s in stages if s not in STAGE_ORDER]


def _stage_th(name: str, what: str | None) -> str:
    sw = f'<span class="swatch" style="background:{COLORS.get(name, "#111827")}"></span>'
    sub = f'<span class="what">{escape(what)}</span>' if what else ""
    return f"<th>{sw}{escape(name)}{sub}</th>"


def _vs_previous_row(name: str, c: dict) -> str:
    """A stage against the stage before it (no band: the band is against fp32); top-1 = same argmax."""
    cells = _row_cells(f"stages.{name}.vs_previous", c, {}, renamed={"top1": "top1_agreement"})
    what = f"vs {c['stage']}, pointwise (top-1: same argmax)"
    return f'<tr class="sub vs" data-side="vs_previous"><th>{escape(what)}</th>{cells}</tr>'


def _stage_table(r: dict, band: dict) -> str:
    window = r.get("window")
    rows = []
    for name in _ordered(r["stages"]):
        s = r["stages"][name]
        rows.append(
            f"<tr>{_stage_th(name, s.get('what'))}{_row_cells(f'stages.{name}.overall', s['overall'], band)}</tr>"
        )
        if "vs_previous" in s:
            rows.append(_vs_previous_row(name, s["vs_previous"]))
        for side, label in (("within_window", "within"), ("past_window", "past")):
            if side in s:
                what = f"{label} the sliding window" + (f" ({window})" if window else "")
                rows.append(
                    f'<tr class="sub" data-side="{side}"><th>{escape(what)}</th>'
                    f"{_row_cells(f'stages.{name}.{side}', s[side], band)}</tr>"
                )
    return f'<table class="stages">{_head("stage")}<tbody>{"".join(rows)}</tbody>{_band_row(band)}</table>'


def _prompt_tables(r: dict, band: dict) -> str:
    out = []
    for name in _ordered(r["stages"]):
        s = r["stages"][name]
        rows = "".join(
            f"<tr><th>{escape(p)}</th>{_row_cells(f'stages.{name}.prompts.{p}', row, band)}</tr>"
            for p, row in s["prompts"].items()
        )
        sw = f'<span class="swatch" style="background:{COLORS.get(name, "#111827")}"></span>'
        what = f' <span class="muted">— {escape(s["what"])}</span>' if s.get("what") else ""
        out.append(
            f"<h3>{sw}{escape(name)}{what}</h3>"
            f'<table class="prompts" data-stage="{escape(name)}">{_head("prompt")}<tbody>{rows}</tbody></table>'
        )
    return "".join(out)


def _probes(r: dict) -> str:
    items = []
    for k, v in r["probes"].items():
        value = _tagged("span", f"probes.{k}", v, "ok" if v else "failed")
        items.append(f"<li><span>{escape(k.replace('_', ' '))}</span>{value}</li>")
    for name in _ordered(r["stages"]):
        sc = r["stages"][name].get("softcap")
        if sc:
            cap = _tagged("span", f"stages.{name}.softcap.cap", sc["cap"], "mono")
            peak = _tagged(
                "span", f"stages.{name}.softcap.max_abs_logit", sc["max_abs_logit"], "ok" if sc.get("ok") else "failed"
            )
            items.append(f"<li><span>{escape(name)}: peak |logit| (final softcap {cap})</span>{peak}</li>")
    return f'<ul class="probes">{"".join(items)}</ul>'


def _legend(names: list[str]) -> str:
    spans = "".join(
        f'<span><svg viewBox="0 0 28 10"><line x1="1" x2="27" y1="5" y2="5" stroke="{COLORS.get(n, "#111827")}" '
        f"{STROKES.get(n, STROKES['lowered'])}/></svg>{escape(n)}</span>"
        for n in names
    )
    return f'<div class="legend">{spans}</div>'


def render_html(r: dict) -> str:
    """The page, from the JSON-safe result."""
    from edge import __version__

    v = r["verdict"]
    band = v.get("band") or {}
    word = VERDICT_WORDS[v.get("passed")]
    cls = word.lower()
    names = _ordered(r["stages"])
    window = r.get("window")
    prompts = list(dict.fromkeys(p for s in r["stages"].values() for p in s["kld_by_position"]))
    decades = kld_decades(r["stages"])
    panels = "".join(
        kld_panel(
            p,
            [(n, r["stages"][n]["kld_by_position"][p]) for n in names if p in r["stages"][n]["kld_by_position"]],
            window,
            decades,
        )
        for p in prompts
    )
    words = {"mean_kld": "mean KLD ≤", "top1": "top-1 ≥", "max_abs_logit": "max |Δlogit| ≤"}
    limits = ", ".join(f"{words.get(k, k)} {val}" for k, val in band.items() if val is not None) or "none"
    culprit = (
        f'<div class="muted">culprit: <b data-key="verdict.culprit">{escape(v["culprit"])}</b></div>'
        if v.get("culprit")
        else ""
    )
    floor = (
        f" Values below 10{_sup(decades[0])} (exact agreement: 0) are drawn on the bottom axis."
        if any(
            not (x and x > 0) or math.log10(x) < decades[0]
            for s in r["stages"].values()
            for xs in s["kld_by_position"].values()
            for x in xs
            if x is not None
        )
        else ""
    )
    wnote = f" The dashed line marks the sliding window ({window} positions)." if window else ""
    title = f"{r['variant']} {r['scheme']} on {r['backend']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edge validate: {escape(title)}: {word}</title>
<style>{CSS}</style></head>
<body><main>
<header class="top">
  <div>
    <h1><span data-key="variant">{escape(r["variant"])}</span> · <span data-key="scheme">{escape(r["scheme"])}</span>
      on <span data-key="backend">{escape(r["backend"])}</span></h1>
    <div class="muted">bundle <code data-key="bundle">{escape(r["bundle"])}</code></div>
    <div class="muted">band (on the final stage, <b>{escape(str(v.get("final_stage", "")))}</b>): {escape(limits)}</div>
  </div>
  <div class="verdict {cls}" id="verdict">
    <span class="badge {cls}" data-key="verdict.passed" data-value="{json.dumps(v.get("passed"))}">{word}</span>
    <div><div data-key="verdict.sentence">{escape(v.get("sentence", ""))}</div>{culprit}</div>
  </div>
</header>

<section class="card"><h2>Stages against the fp32 reference</h2>
{_stage_table(r, band)}
<p class="note" id="kld-note" data-key="kld_note">{escape(r.get("kld_note", ""))}</p>
</section>

<section class="card"><h2>KLD per position</h2>
{_legend(names)}
<div class="panels">{panels}</div>
<p class="note">Log scale, one line per stage, the same y range in every panel.{wnote}{floor}</p>
</section>

<div class="two">
<section class="card"><h2>Top-1 agreement by stage</h2>{top1_bars({n: r["stages"][n] for n in names}, band)}
<p class="note">Share of positions whose argmax is the reference's.{
        " Dashed: the band's top-1 limit; underlined: below it." if band.get("top1") is not None else ""
    }</p></section>
<section class="card"><h2>Probes</h2>{_probes(r)}</section>
</div>

<section class="card"><h2>Per prompt</h2>{_prompt_tables(r, band)}</section>
<footer>gemma-edge {escape(__version__)} · <code>edge validate --report</code> · the same numbers are in
report.json beside this file.</footer>
</main></body></html>
"""


def _write(path: Path, text: str) -> None:
    """Write beside the target and rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def prepare_dir(out_dir: str | Path) -> Path:
    """Create the report folder (before a long validation), or say why it cannot be."""
    out = Path(out_dir)
    hint = "pass a folder that can be created and written, e.g. --report reports/run1"
    if out.exists() and not out.is_dir():
        raise EdgeError(f"--report {out}: exists and is not a folder", hint=hint)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeError(f"--report {out}: cannot create the folder ({e.strerror or e})", hint=hint) from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise EdgeError(f"--report {out}: the folder is not writable", hint=hint)
    return out


def write_report(result: dict, out_dir: str | Path) -> Path:
    """Write out_dir/report.json and out_dir/report.html; return the HTML's path."""
    out = prepare_dir(out_dir)
    safe = json_safe(result)
    try:
        _write(out / "report.json", json.dumps(safe, indent=1, allow_nan=False) + "\n")
        _write(out / "report.html", render_html(safe))
    except OSError as e:
        raise EdgeError(f"cannot write the report into {out}: {e}", hint="check the folder's space and rights") from e
    return out / "report.html"
