"""edge.progress.counter: quarters, and a heartbeat on slow loops."""

from edge.progress import counter


def _lines(capsys) -> list[str]:
    return [line.strip() for line in capsys.readouterr().err.splitlines()]


def test_counter_reports_the_first_step_and_each_quarter_once(capsys):
    update = counter("layers", every_s=1e9)
    for i in range(1, 9):
        update(i, 8)
    assert _lines(capsys) == ["layers: 1 / 8", "layers: 2 / 8", "layers: 4 / 8", "layers: 6 / 8", "layers: 8 / 8"]


def test_counter_reports_a_slow_loop_between_quarters(capsys):
    update = counter("layers", every_s=0.0)  # every call is "slow": each one is reported
    for i in range(1, 4):
        update(i, 100)
    assert _lines(capsys) == ["layers: 1 / 100", "layers: 2 / 100", "layers: 3 / 100"]
