"""benchmarks/frontier.py: which schemes are on the size / KLD frontier, and the table it prints."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from frontier import frontier, table  # noqa: E402


def rows(**kw):
    return {q: {"artifact_mb": mb, "mean_kld": kld, "top1": 1 - kld} for q, (mb, kld) in kw.items()}


def test_frontier_keeps_only_schemes_nothing_beats_on_both_axes():
    r = rows(fp32=(1000, 0.0), int8=(280, 0.003), int4=(250, 0.02), bad=(260, 0.5), same_size_worse=(280, 0.01))
    assert frontier(r) == {"fp32", "int8", "int4"}


def test_a_tie_on_both_axes_keeps_both():
    assert frontier(rows(a=(100, 0.1), b=(100, 0.1))) == {"a", "b"}


def test_table_sorts_by_size_and_marks_the_frontier():
    md = table(rows(fp32=(1000, 0.0), bad=(260, 0.5), int4=(250, 0.02)), "xnnpack").splitlines()
    assert [line.split("|")[1].strip() for line in md[2:5]] == ["int4", "bad", "fp32"]
    assert md[2].rstrip().endswith("yes |") and not md[3].rstrip().endswith("yes |")
    assert "llama.cpp Q4_K_M" in md[-1]
