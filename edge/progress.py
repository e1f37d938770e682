"""Stages and progress on stderr: each slow step is timed and its peak RSS recorded.

stdout stays clean for `--json`; everything a person watches goes to stderr.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def say(msg: str) -> None:
    if os.environ.get("EDGE_QUIET") != "1":
        print(msg, file=sys.stderr, flush=True)


@dataclass
class StageRecord:
    name: str
    seconds: float
    peak_rss_mb: float


@dataclass
class Stages:
    """Typed log of the pipeline's stages, written into manifests and JSON output."""

    records: list[StageRecord] = field(default_factory=list)

    @contextmanager
    def run(self, name: str, detail: str = "") -> Iterator[None]:
        say(f"[{name}] {detail}".rstrip())
        t0 = time.perf_counter()
        yield
        rec = StageRecord(name, round(time.perf_counter() - t0, 3), round(peak_rss_mb(), 1))
        self.records.append(rec)
        say(f"[{name}] done in {rec.seconds:.1f} s (peak RSS {rec.peak_rss_mb / 1024:.2f} GB)")

    def to_list(self) -> list[dict]:
        return [asdict(r) for r in self.records]


class ByteProgress:
    """A one-line byte counter for long copies (assembling the GGUF), redrawn on a terminal."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.tty = sys.stderr.isatty()
        self._last = -1

    def update(self, n: int) -> None:
        self.done += n
        pct = int(100 * self.done / max(self.total, 1))
        if pct != self._last and (self.tty or pct % 25 == 0):
            self._last = pct
            end = "\r" if self.tty and pct < 100 else "\n"
            if os.environ.get("EDGE_QUIET") != "1":
                mb = self.done / 1e6
                print(f"  {self.label}: {mb:.0f} / {self.total / 1e6:.0f} MB ({pct}%)", end=end, file=sys.stderr)


def counter(label: str, every_s: float = 30.0):
    """A callback(done, total) that reports a count every quarter (for loops over layers or sites), and
    at least every `every_s` seconds while it runs (the 2B's GPTQ spends many minutes per quarter)."""
    last = [-1, time.monotonic()]

    def update(done: int, total: int) -> None:
        quarter = 4 * done // max(total, 1)
        if quarter != last[0] or time.monotonic() - last[1] >= every_s:
            last[0], last[1] = quarter, time.monotonic()
            say(f"  {label}: {done} / {total}")

    return update
