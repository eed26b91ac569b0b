"""Progress bars: a rate and an ETA once a step takes a while, on the main process only."""

from __future__ import annotations

import time

from instruct.decoding import counted
from instruct.progress import SHOW_AFTER, progress


def test_a_long_step_shows_its_rate_and_eta(monkeypatch, capsys):
    monkeypatch.setenv("INSTRUCT_PROGRESS", "1")  # shown although stderr is captured
    for _ in progress(range(3), desc="validate", unit="batch"):
        time.sleep(SHOW_AFTER / 2 + 0.05)
    err = capsys.readouterr().err
    assert "validate:" in err and "3/3" in err
    assert "batch/s" in err or "s/batch" in err  # the rate
    assert "<" in err  # elapsed<remaining: the ETA


def test_quick_steps_other_processes_and_progress_0_print_nothing(monkeypatch, capsys):
    monkeypatch.setenv("INSTRUCT_PROGRESS", "1")
    for _ in progress(range(3), desc="quick"):
        pass  # over before SHOW_AFTER
    for _ in progress(range(2), desc="rank 1", main=False):
        time.sleep(SHOW_AFTER / 2 + 0.05)
    monkeypatch.setenv("INSTRUCT_PROGRESS", "0")
    for _ in progress(range(2), desc="off"):
        time.sleep(SHOW_AFTER / 2 + 0.05)
    assert capsys.readouterr().err == ""


def test_generation_ticks_once_per_finished_reply():
    class Bar:
        n = 0

        def update(self, k: int = 1) -> None:
            self.n += k

    bar = Bar()
    done = counted(lambda ids: ids[-1] == 0, bar)
    assert [done([5]), done([5, 0]), done([0])] == [False, True, True]
    assert bar.n == 2
