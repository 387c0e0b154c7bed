"""Progress in a log (ilrdpo.progress): plain lines with done/total and an ETA, at least every
PLAIN_EVERY_S seconds, also while one long batch runs (unit tier: stderr is captured, not a terminal)."""

from __future__ import annotations

import re
import time

import pytest

from ilrdpo import progress

pytestmark = pytest.mark.unit

LINE = r"iter 1 sampling: {done}/4  elapsed \d:\d\d:\d\d  eta (\d:\d\d:\d\d|\?)"


@pytest.fixture
def log(monkeypatch, capsys):
    """Progress as a log would get it, with lines every 0.05 s instead of every 30 s."""
    monkeypatch.delenv("ILRDPO_QUIET", raising=False)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.05)
    return capsys


def test_a_bar_in_a_log_is_a_line_at_the_start_every_interval_and_at_the_end(log):
    with progress.progress_bar("iter 1 sampling", 4, done=1) as bar:
        bar.advance(1, tokens_per_s="12")
        time.sleep(0.4)  # one long batch: the lines keep coming
        bar.advance(2)
    lines = log.readouterr().err.splitlines()
    assert lines[0] == "iter 1 sampling: 1/4 (1 done before, reused)"
    assert len(lines[1:-1]) >= 3 and all(re.fullmatch(LINE.format(done=2) + "  tokens_per_s=12", x) for x in lines[1:-1])
    assert re.fullmatch(LINE.format(done=4) + "  tokens_per_s=12", lines[-1]) and "eta 0:00:00" in lines[-1]


def test_the_eta_counts_only_the_work_done_since_the_start():
    bar = progress.PlainBar("training", 10, done=5)
    bar.start -= 60  # one step in a minute: 4 steps left are 4 minutes, not 4/6 of a minute
    bar.advance(1)
    assert "eta 0:04:00" in bar.line() and "training: 6/10" in bar.line()


def test_a_stage_without_a_bar_still_reports_every_interval(log):
    with progress.stage("iter 1 pair"):
        time.sleep(0.3)
    lines = log.readouterr().err.splitlines()
    assert lines[0] == "iter 1 pair: started"
    assert any(re.fullmatch(r"iter 1 pair: running, elapsed \d:\d\d:\d\d", x) for x in lines[1:-1])
    assert re.fullmatch(r"iter 1 pair: \d+\.\d s", lines[-1])


def test_quiet_is_silent(monkeypatch, capsys):
    monkeypatch.setenv("ILRDPO_QUIET", "1")
    with progress.progress_bar("scoring", 2) as bar:
        bar.advance(2)
    assert capsys.readouterr().err == ""
