"""The end-of-run summary and the clock behind its time split."""

from __future__ import annotations

import time

from instruct.summary import end_summary, peak_memory, time_line
from instruct.timing import Clock

RESULTS = {
    "best_val_loss": 2.25601, "best_step": 10, "initial_val_loss": 2.4012, "steps": 10,
    "time_split": {"load": 12.06, "prepare": 3.2, "train": 111.6, "validate": 30.2,
                   "samples": 20.1, "checkpoints": 1.2, "eval": 180.1},
    "total_seconds": 360.0, "memory": {"peak_rss_gib": 1.234},
    "checkpoint": "outputs/x/checkpoints/best",
}  # fmt: skip
EVAL = {
    "suites": ["ifeval"],
    "tuned": {"ifeval": {"prompts": 120, "headline": "prompt_strict", "scores": {
        "prompt_strict": {"value": 0.3, "ci": [0.22, 0.38]}}}},
}  # fmt: skip


def test_the_summary_names_results_time_memory_and_files():
    text = end_summary({**RESULTS, "eval": EVAL}, "outputs/x/loss.png", None)
    lines = text.splitlines()
    assert lines[0] == lines[-1] == "─" * 72
    body = dict(line.split("  ", 1) for line in lines[1:-1])
    body = {k.strip(): v.strip() for k, v in body.items()}
    assert body["best val loss"] == "2.2560 at step 10 (initial 2.4012, 10 steps)"
    assert body["eval ifeval"] == "tuned (120 prompts): prompt_strict 0.300 [0.220, 0.380]"
    assert body["time"] == ("360.0 s: load 12.1 · prepare 3.2 · train 111.6 · validate 30.2 · "
                            "samples 20.1 · checkpoints 1.2 · eval 180.1")  # fmt: skip
    assert body["peak memory"] == "1.23 GiB resident"
    assert body["checkpoint"] == "outputs/x/checkpoints/best"
    assert body["loss plot"] == "outputs/x/loss.png" and body["W&B"] == "off (logger=none)"
    assert len(lines) <= 24  # one screen


def test_time_line_keeps_the_run_order_and_skips_what_did_not_happen():
    assert time_line({"train": 2.0, "load": 1.0}, 3.5) == "3.5 s: load 1.0 · train 2.0"
    assert time_line({}, None) == "seconds"


def test_the_clock_splits_time_and_a_resume_adds_to_it():
    clock = Clock()
    with clock.phase("load"):
        time.sleep(0.01)
    with clock.training():
        time.sleep(0.01)
    with clock.not_training(), clock.phase("validate"):
        time.sleep(0.01)
    state = clock.state()
    assert list(state["time_split"]) == ["load", "train", "validate"]
    assert state["time_split"]["train"] == state["train_seconds"] >= 0.01
    assert state["eval_seconds"] >= state["time_split"]["validate"] >= 0.01
    resumed = Clock()
    with resumed.phase("load"):  # the resumed process's own start-up
        time.sleep(0.01)
    resumed.restore(state)
    assert resumed.split["load"] >= state["time_split"]["load"] + 0.01  # both start-ups
    assert resumed.train_seconds == state["train_seconds"]
    old = Clock()
    old.restore({"train_seconds": 1.0, "eval_seconds": 2.0})  # saved before the split was kept
    assert old.split == {} and old.train_seconds == 1.0


def test_peak_memory_is_this_process_resident_set():
    assert 0.05 < peak_memory()["peak_rss_gib"] < 64
