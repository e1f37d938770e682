"""`edge validate --report DIR`: report.json round-trips, report.html's numbers are report.json's,
and headless Chromium renders the page to the same numbers.

The result is made by the real scoring code (stages.evaluate, run.verdict) on synthetic logits in
milliseconds; the CLI's wiring is checked with a stubbed validate(), so nothing here exports a model.
"""

import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from typer.testing import CliRunner

from edge.validate import stages as st
from edge.validate.golden import GoldenPrompt
from edge.validate.metrics import Reference
from edge.validate.report import COLUMNS, fmt, json_safe, write_report
from edge.validate.run import verdict

BAND = {"mean_kld": 0.005, "top1": 0.97, "max_abs_logit": None}
PROMPTS = {"prose": 24, "code": 16, "chat": 10, "long": 40}  # positions; the window is 12


def synthetic_result(noise: dict[str, float] | None = None, band: dict | None = None, window: int = 12) -> dict:
    """What validate() returns, scored by the real metrics on noisy copies of random reference logits."""
    rng = np.random.default_rng(0)
    vocab, golden, ref_logits = 64, [], {}
    for name, n in PROMPTS.items():
        ids = np.concatenate([[2], rng.integers(3, vocab, n - 1)]).astype(np.int32)
        logits = rng.normal(0, 2.0, (n, vocab)).astype(np.float32)
        logits[np.arange(n - 1), ids[1:]] += 4.0  # the next token is likely: in the top-k, a ppl ratio
        golden.append(GoldenPrompt(name, ids, Reference.from_logits(logits, k=16)))
        ref_logits[tuple(ids.tolist())] = logits
    noise = noise or {"reference": 1e-3, "re-authored": 0.0, "quantized": 0.15, "lowered": 0.2, "device": 0.6}

    def noisy(sd: float):
        return lambda ids: ref_logits[tuple(ids)] + rng.normal(0, sd, ref_logits[tuple(ids)].shape)

    stages, before = {}, None
    for stage, sd in noise.items():
        observed = st.observe(golden, noisy(sd))
        stages[stage] = st.score(golden, observed, window) | {"what": f"{stage}, synthetic"}
        if before is not None:  # as validate() does: each stage against the one before it
            stages[stage]["vs_previous"] = {"stage": list(stages)[-2]} | st.compare(before, observed)
        before = observed
        peak = max(float(np.abs(ref_logits[k]).max()) for k in ref_logits)
        stages[stage]["softcap"] = {"cap": 30.0, "max_abs_logit": np.float32(peak), "ok": peak <= 30.0}
    stages["device"]["prompts"]["chat"]["ppl_ratio"] = float("nan")  # a metric that could not be measured
    return {
        "bundle": "/tmp/bundles/tiny <int8> & co",  # escaped in the page
        "variant": "tiny-test",
        "scheme": "int8",
        "backend": "xnnpack",
        "window": window,
        "kld_note": "KLD over the reference's top-128 plus one tail bucket: a lower bound of the full KLD",
        "probes": {"bos_first": True, "tokenizer_matches_golden": True, "final_softcap": True},
        "stages": stages,
        "verdict": verdict(stages, BAND if band is None else band, window),
    }


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Cells(HTMLParser):
    """Every element with a data-key (its text, nested elements included, and data-value); the SVG lines.

    Works on our file (SVG leaves written `<line/>`) and on Chromium's DOM (`<line></line>`)."""

    def __init__(self):
        super().__init__()
        self.cells: list[dict] = []
        self.open: list[tuple[str, dict | None]] = []
        self.polylines: list[dict] = []
        self.windows: list[str] = []

    def _element(self, tag: str, a: dict) -> dict | None:
        if tag == "polyline":
            self.polylines.append(a)
        if tag == "line" and "data-window" in a:
            self.windows.append(a["data-window"])
        if "data-key" not in a:
            return None
        cell = {"key": a["data-key"], "value": a.get("data-value"), "text": "", "class": a.get("class", "")}
        self.cells.append(cell)
        return cell

    def handle_starttag(self, tag, attrs):
        cell = self._element(tag, dict(attrs))
        if tag not in VOID:
            self.open.append((tag, cell))

    def handle_startendtag(self, tag, attrs):
        self._element(tag, dict(attrs))

    def handle_endtag(self, tag):
        if any(t == tag for t, _ in self.open):
            while self.open.pop()[0] != tag:
                pass

    def handle_data(self, data):
        for _, cell in self.open:
            if cell is not None:
                cell["text"] += data


def parse(html: str) -> Cells:
    p = Cells()
    p.feed(html)
    p.close()
    return p


def lookup(obj, key: str):
    for part in key.split("."):
        obj = obj[part]
    return obj


def check_cells_match(cells: list[dict], data: dict) -> None:
    """Each data-key's text is its JSON value formatted; its data-value is the value itself."""
    assert cells, "no data-key cells"
    for c in cells:
        value = lookup(data, c["key"])
        assert " ".join(c["text"].split()) == fmt(c["key"].rsplit(".", 1)[-1], value), c
        if c["value"] is not None:
            assert json.loads(c["value"]) == value, c


@pytest.fixture(scope="module")
def result():
    return synthetic_result()


@pytest.fixture(scope="module")
def written(result, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "new" / "dir"  # created, parents too
    html = write_report(result, out)
    return html, json.loads((out / "report.json").read_text())


def test_fmt_is_what_a_reader_expects():
    assert fmt("mean_kld", 0.0026234) == "0.00262" and fmt("p99_kld", 7.27e-17) == "7.27e-17"
    assert fmt("top1", 0.939534) == "0.9395" and fmt("ppl_ratio", 1.01234) == "1.0123"
    assert fmt("positions", 215) == "215" and fmt("max_kld", 0.0) == "0"
    assert fmt("ppl_ratio", None) == "n/a" and fmt("bos_first", False) == "FAILED"
    assert [fmt("passed", v) for v in (True, False, None)] == ["PASS", "FAIL", "MEASURED"]


def test_json_round_trips_with_nan_as_null(result, written):
    html, data = written
    text = (html.parent / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert data == json_safe(result)
    assert data["stages"]["device"]["prompts"]["chat"]["ppl_ratio"] is None
    assert isinstance(data["stages"]["lowered"]["softcap"]["max_abs_logit"], float)  # was np.float32
    assert data["stages"]["lowered"]["overall"] == result["stages"]["lowered"]["overall"]
    assert data["window"] == 12
    assert list(data["stages"]) == ["reference", "re-authored", "quantized", "lowered", "device"]


def test_every_number_cell_is_the_json_value(written):
    html, data = written
    p = parse(html.read_text())
    check_cells_match(p.cells, data)
    keys = {c["key"] for c in p.cells}
    for name, s in data["stages"].items():  # every metric of every row is on the page
        rows = {"overall": s["overall"], "within_window": s["within_window"], "past_window": s["past_window"]}
        rows |= {f"prompts.{k}": v for k, v in s["prompts"].items()}
        for where, row in rows.items():
            for key, _ in COLUMNS:
                assert key in row and f"stages.{name}.{where}.{key}" in keys
        if name != "reference":  # each later stage against the one before it, pointwise
            assert {f"stages.{name}.vs_previous.{k}" for k in ("mean_kld", "max_kld", "top1_agreement")} <= keys
    assert "vs_previous" not in data["stages"]["reference"]
    assert data["stages"]["device"]["vs_previous"]["mean_kld"] > data["stages"]["lowered"]["vs_previous"]["mean_kld"]
    assert {"verdict.passed", "verdict.sentence", "kld_note", "bundle", "probes.final_softcap"} <= keys
    assert data["verdict"]["passed"] is False and data["verdict"]["culprit"] == "quantized"
    page = html.read_text()
    assert "&lt;int8&gt; &amp; co" in page and "<int8>" not in page  # strings are escaped
    bad = {c["key"] for c in p.cells if "bad" in c["class"].split()}
    assert "stages.device.overall.top1" in bad and "stages.re-authored.overall.top1" not in bad


def test_one_line_per_stage_per_prompt_on_a_log_axis(written):
    html, data = written
    p = parse(html.read_text())
    pairs = [(a["data-stage"], a["data-prompt"]) for a in p.polylines]
    assert sorted(pairs) == sorted((s, q) for s in data["stages"] for q in PROMPTS)
    frame_top, frame_bottom = 40, 250 - 38
    logs = []
    for a in p.polylines:
        pts = [tuple(map(float, xy.split(","))) for xy in a["points"].split()]
        want = data["stages"][a["data-stage"]]["kld_by_position"][a["data-prompt"]]
        assert len(pts) == len(want) == int(a["data-n"])
        assert all(frame_top <= y <= frame_bottom for _, y in pts)
        assert [x for x, _ in pts] == sorted(x for x, _ in pts)
        logs += [(math.log10(k), y) for k, (_, y) in zip(want, pts, strict=True) if k > 0 and y < frame_bottom]
        assert all(y == frame_bottom for k, (_, y) in zip(want, pts, strict=True) if k <= 0)  # 0 on the floor
    # one log axis for every panel: y = a - b log10(KLD), to the drawing's 0.1 px rounding
    slope, icept = np.polyfit([lk for lk, _ in logs], [y for _, y in logs], 1)
    assert slope < 0 and max(abs(icept + slope * lk - y) for lk, y in logs) < 0.2
    assert max(lk for lk, _ in logs) - min(lk for lk, _ in logs) > 4  # the stages span decades
    lowered = next(a for a in p.polylines if a["data-stage"] == "lowered" and a["data-prompt"] == "long")
    ys = [float(xy.split(",")[1]) for xy in lowered["points"].split()]
    assert max(ys) - min(ys) > 5  # a line, not a flat clamp
    assert p.windows == ["12"] * sum(n > 12 for n in PROMPTS.values())  # chat (10) ends within the window


def test_the_page_is_self_contained(written):
    html, _ = written
    page = html.read_text()
    for needle in ("<script", "<link", "<img", "@import", "url(", "src=", "https://"):
        assert needle not in page, needle
    assert page.count("http://") == page.count('xmlns="http://www.w3.org/2000/svg"')
    assert page.count("<svg") >= len(PROMPTS) + 1 and "data-top1" in page


@pytest.mark.parametrize(
    "band, word", [(BAND | {"mean_kld": 10.0, "top1": 0.5}, "PASS"), ({}, "MEASURED")], ids=["pass", "measured"]
)
def test_verdict_word_and_color(tmp_path, band, word):
    r = synthetic_result(band=band)
    page = write_report(r, tmp_path).read_text()
    badge = next(c for c in parse(page).cells if c["key"] == "verdict.passed")
    assert badge["text"] == word and word.lower() in badge["class"].split()
    if word == "PASS":
        assert not any("bad" in c["class"].split() for c in parse(page).cells)


def test_cli_writes_the_report_and_keeps_the_exit_code(monkeypatch, tmp_path, result):
    import edge.validate.run as run
    from edge.cli import app

    monkeypatch.setattr(run, "validate", lambda *a, **k: result)
    out = tmp_path / "r"
    cli = CliRunner().invoke(app, ["validate", str(tmp_path / "bundle"), "--report", str(out)])
    assert cli.exit_code == 1, cli.output  # the verdict fails: exit 1, report written all the same
    assert f"report written to {out / 'report.html'}" in cli.output and "FAIL:" in cli.output
    assert json.loads((out / "report.json").read_text())["verdict"]["passed"] is False
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]  # no temporaries left


def test_cli_report_into_a_file_exits_2_before_validating(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("x")
    r = subprocess.run(
        [sys.executable, "-m", "edge", "validate", str(tmp_path / "no-bundle"), "--report", str(taken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "is not a folder" in r.stderr and "hint:" in r.stderr and "Traceback" not in r.stderr
    assert taken.read_text() == "x"


# ---- headless Chromium --------------------------------------------------------------------------


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not on PATH: `make sysdeps` installs it (Debian package chromium)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=60)


def test_chromium_renders_the_json_numbers(written, tmp_path):
    html, data = written
    r = chromium(tmp_path, "--dump-dom", html.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    p = parse(r.stdout)
    assert len(p.cells) == len(parse(html.read_text()).cells) > 100
    check_cells_match(p.cells, data)
    shown = {c["key"]: c["text"] for c in p.cells}
    assert shown["verdict.passed"] == "FAIL" and shown["verdict.sentence"] == data["verdict"]["sentence"]
    assert len(p.polylines) == len(data["stages"]) * len(PROMPTS)


def test_chromium_screenshot_is_a_real_image(written, tmp_path):
    html, _ = written
    png = tmp_path / "report.png"
    r = chromium(tmp_path, f"--screenshot={png}", "--window-size=1280,2400", html.as_uri())
    assert r.returncode == 0 and png.exists(), r.stderr[-2000:]
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (1280, 2400)
    assert png.stat().st_size > 50_000  # a blank page of this size compresses to a few KB
