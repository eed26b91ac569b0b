"""Crash, kill and signal safety: exact resume, atomic checkpoints, refused config changes.

The kill tests run real training processes (the CLI, or a small script around ``train``) and
stop them with real signals.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from instruct.checkpoint import (
    COMPLETE_FILE,
    WEIGHTS_FILE,
    latest_complete,
    load_checkpoint,
    step_checkpoints,
    step_name,
    write_config,
)
from instruct.loss import loss_sum
from instruct.tracking import read_offline_run
from instruct.train import train
from tests.conftest import assert_best_reloads, best_val_loss, toy_config

REPO = Path(__file__).parents[1]

# LoRA with dropout, so that an exact resume also needs the RNG state back.
LORA = ["lora=default", "lora.rank=4", "lora.dropout=0.1", "optimizer.lr=5e-3"]


def cli_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "model=tiny",
        "template=chatml",
        "data=file",
        f"data.paths=[{data}]",
        "data.val_fraction=0.25",
        *LORA,
        "trainer.batch_size=4",
        "trainer.eval_every=5",
        "trainer.checkpoint_every=5",
        "trainer.samples=1",
        "trainer.sample_max_new_tokens=4",
        "logger.mode=offline",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "instruct.run", *args],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {path}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.002)


def finish(args: list[str], log: Path) -> str:
    proc = start_cli(args, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return log.read_text()


def wandb_history(run_dir: Path) -> tuple[set[str], list[dict]]:
    """Run ids (from the folder names) and history rows of every offline W&B run file under
    ``run_dir``. A killed process's file may hold nothing: W&B's service buffers records."""
    ids, rows = set(), []
    for run_file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        ids.add(run_file.parent.name.rsplit("-", 1)[1])
        rows += read_offline_run(run_file, wait_seconds=30)["history"]
    return ids, rows


def train_rows(rows: list[dict]) -> dict[int, float]:
    steps = [row["_step"] for row in rows if "train/loss" in row]
    assert len(steps) == len(set(steps)), f"duplicate W&B steps: {sorted(steps)}"
    return {row["_step"]: row["train/loss"] for row in rows if "train/loss" in row}


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(toy_data, tmp_path):
    """SIGKILL after the step-10 checkpoint, then trainer.resume=auto: the same final weights,
    loss history and best val loss as a run never stopped, and one W&B run without repeats."""
    steps = ["trainer.max_steps=30"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finish(cli_args(toy_data, whole, *steps), tmp_path / "whole.log")

    proc = start_cli(cli_args(toy_data, killed, *steps), tmp_path / "killed.log")
    wait_for(killed / "checkpoints" / step_name(10) / COMPLETE_FILE, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (killed / "results.json").exists()

    out = finish(cli_args(toy_data, killed, *steps, "trainer.resume=auto"), tmp_path / "r.log")
    assert "resuming from" in out and step_name(10) in out

    a = json.loads((whole / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    for key in ("train_loss_history", "val_loss_history"):
        assert len(a[key]) == len(b[key]) and [s for s, _ in a[key]] == [s for s, _ in b[key]]
        assert all(abs(x - y) <= 1e-6 for (_, x), (_, y) in zip(a[key], b[key], strict=True))
    assert abs(a["best_val_loss"] - b["best_val_loss"]) <= 1e-6
    assert a["best_step"] == b["best_step"]
    assert a["supervised_tokens"] == b["supervised_tokens"]
    final = step_name(30)
    wa = load_file(whole / "checkpoints" / final / WEIGHTS_FILE)
    wb = load_file(killed / "checkpoints" / final / WEIGHTS_FILE)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6

    # W&B: the resumed process continued the same run id, and no step was logged twice.
    ids_a, rows_a = wandb_history(whole)
    ids_b, rows_b = wandb_history(killed)
    state = json.loads((killed / "checkpoints" / final / "trainer_state.json").read_text())
    assert ids_b == {state["wandb_run_id"]}
    assert len(list((killed / "wandb").glob("offline-run-*"))) == 2
    losses_a, losses_b = train_rows(rows_a), train_rows(rows_b)
    assert sorted(losses_b) == sorted(losses_a) == list(range(1, 31))
    assert all(abs(losses_a[s] - losses_b[s]) <= 1e-6 for s in losses_a)
    # The local metrics file too: one line per step, as in the uninterrupted run.
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["step"] for line in lines if "train/loss" in line]
    assert logged == list(range(1, 31))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_saves_and_prints_the_resume_command(toy_data, tmp_path, signum):
    run_dir = tmp_path / "run"
    args = cli_args(toy_data, run_dir, "trainer.max_steps=400", "trainer.checkpoint_every=1000")
    proc = start_cli(args, tmp_path / "run.log")
    wait_for(run_dir / "metrics.jsonl", proc)
    while "train/loss" not in (run_dir / "metrics.jsonl").read_text():  # training has begun
        assert proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signum)
    code = proc.wait(timeout=120)
    out = (tmp_path / "run.log").read_text()
    assert code == 128 + signum, out[-3000:]
    (saved,) = step_checkpoints(run_dir / "checkpoints")
    assert (saved / COMPLETE_FILE).is_file()
    stopped_at = int(saved.name.removeprefix("step-"))
    assert 0 < stopped_at < 400
    assert f"stopped by {signal.Signals(signum).name} after step {stopped_at}" in out
    (command,) = [line.split("resume with: ", 1)[1] for line in out.splitlines()
                  if line.startswith("resume with: ")]  # fmt: skip
    assert f"hydra.run.dir={run_dir}" in command and "trainer.resume=auto" in command

    import shlex

    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "instruct.run"]
    done = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {saved}" in done.stdout + done.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert [s for s, _ in results["train_loss_history"]] == list(range(1, 401))


def short_run(data: Path, run_dir: Path, *extra: str, **dependencies: Any) -> dict:
    return train(toy_config(data, run_dir, *LORA, "logger=none", "trainer.samples=0",
                            "trainer.max_steps=8", "trainer.eval_every=2", *extra),
                 **dependencies)  # fmt: skip


@pytest.mark.slow
def test_resume_refuses_changes_that_matter_and_allows_training_longer(toy_data, tmp_path):
    run_dir = tmp_path / "run"
    first = short_run(toy_data, run_dir)
    with pytest.raises(ValueError) as refused:
        short_run(toy_data, run_dir, "trainer.resume=auto", "trainer.batch_size=3",
                  "template=alpaca", "trainer.max_steps=12")  # fmt: skip
    message = str(refused.value)
    assert "trainer.batch_size" in message and "template.name" in message
    assert "max_steps" not in message
    assert not (run_dir / "checkpoints" / step_name(12)).exists()

    longer = short_run(toy_data, run_dir, "trainer.resume=auto", "trainer.max_steps=12")
    assert longer["train_loss_history"][:8] == first["train_loss_history"]
    assert [s for s, _ in longer["train_loss_history"]] == list(range(1, 13))
    # Resuming a run that already did every step it is asked for does nothing.
    again = short_run(toy_data, run_dir, "trainer.resume=auto", "trainer.max_steps=12")
    assert again == json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
def test_a_fresh_run_never_overwrites_an_existing_run_folder(toy_data, tmp_path):
    run_dir = tmp_path / "run"
    short_run(toy_data, run_dir)
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}
    with pytest.raises(FileExistsError, match="trainer.resume=auto"):
        short_run(toy_data, run_dir)
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")} == before


@pytest.mark.slow
def test_checkpoints_rotate_and_an_incomplete_one_is_skipped(toy_data, tmp_path, caplog):
    run_dir = tmp_path / "run"
    short_run(toy_data, run_dir, "trainer.keep_checkpoints=3")
    folder = run_dir / "checkpoints"
    assert [p.name for p in step_checkpoints(folder)] == [step_name(s) for s in (4, 6, 8)]
    (folder / step_name(8) / COMPLETE_FILE).unlink()  # as if its save had been cut off
    with caplog.at_level(logging.WARNING):
        assert latest_complete(folder) == folder / step_name(6)
    assert "incomplete checkpoint" in caplog.text
    (run_dir / "results.json").unlink()
    resumed = short_run(toy_data, run_dir, "trainer.resume=auto")
    assert [s for s, _ in resumed["train_loss_history"]] == list(range(1, 9))


@pytest.mark.slow
def test_a_save_that_fails_midway_leaves_the_previous_checkpoints(toy_data, tmp_path):
    """The writer raises half-way through a save (weights written, config not): the run fails,
    and the previous best and latest checkpoints still load; the run resumes from them."""
    run_dir, calls = tmp_path / "run", []

    def failing(folder, cfg):
        calls.append(folder)
        if len(calls) == 4:  # best at 0, best at 2, state at 2, then this one
            raise OSError(28, "No space left on device")
        write_config(folder, cfg)

    with pytest.raises(OSError, match="No space left"):
        short_run(toy_data, run_dir, config_writer=failing)
    assert len(calls) == 4
    folder = run_dir / "checkpoints"
    assert latest_complete(folder) == folder / step_name(2)
    assert_best_reloads(run_dir, best_val_loss(run_dir))
    resumed = short_run(toy_data, run_dir, "trainer.resume=auto")
    assert [s for s, _ in resumed["train_loss_history"]] == list(range(1, 9))


KILL_DURING_SAVE = r"""
import sys, time
from pathlib import Path
import instruct.checkpoint as checkpoint
from instruct.train import train
from tests.conftest import toy_config

data, run_dir, flag, lora = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
real = checkpoint._fsync_tree

def slow(path):
    if path.name == ".step-00000004.tmp":
        flag.write_text(path.name)
        time.sleep(600)  # killed here, with the folder half-way to its place
    real(path)

checkpoint._fsync_tree = slow
train(toy_config(data, run_dir, *lora, "logger=none", "trainer.samples=0",
                 "trainer.max_steps=8", "trainer.eval_every=2"))
"""


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoints(toy_data, tmp_path):
    run_dir, flag = tmp_path / "run", tmp_path / "saving"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_SAVE, str(toy_data), str(run_dir), str(flag), *LORA],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for(flag, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    folder = run_dir / "checkpoints"
    assert (folder / f".{step_name(4)}.tmp").is_dir()  # the save it was killed in
    assert latest_complete(folder) == folder / step_name(2)
    _, _, cfg = load_checkpoint(folder / "best")
    assert cfg.trainer.max_steps == 8
    assert_best_reloads(run_dir, best_val_loss(run_dir))
    resumed = short_run(toy_data, run_dir, "trainer.resume=auto")
    assert [s for s, _ in resumed["train_loss_history"]] == list(range(1, 9))
    assert not (folder / f".{step_name(4)}.tmp").exists()  # cleaned up by the next save


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_best(toy_data, tmp_path):
    run_dir = tmp_path / "run"
    calls: list[bool] = []

    def poisoned(model, batch, fused=True):
        loss, n = loss_sum(model, batch, fused)
        calls.append(model.training)
        if sum(calls) == 5:  # the fifth training micro-batch: step 5
            loss = loss * float("nan")
        return loss, n

    with pytest.raises(FloatingPointError, match="step 5: training loss is nan"):
        short_run(toy_data, run_dir, loss_fn=poisoned)
    state = json.loads((run_dir / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert state["step"] <= 4 and state["val_loss"] == state["val_loss"]  # finite, not NaN
    assert_best_reloads(run_dir, state["val_loss"])


@pytest.mark.slow
def test_resume_path_must_be_a_complete_checkpoint(toy_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        short_run(toy_data, tmp_path / "a", f"trainer.resume={tmp_path / 'nowhere'}")
    best_only = tmp_path / "b"
    short_run(toy_data, best_only)
    with pytest.raises(ValueError, match="not a resumable checkpoint"):
        short_run(toy_data, tmp_path / "c", f"trainer.resume={best_only / 'checkpoints/best'}")
    with pytest.raises(FileNotFoundError, match="not a checkpoint|resumable training state"):
        load_checkpoint(best_only / "checkpoints" / step_name(8))


@pytest.mark.slow
def test_optimizer_state_is_plain_tensors_read_with_weights_only(toy_data, tmp_path):
    run_dir = tmp_path / "run"
    short_run(toy_data, run_dir)
    state = torch.load(run_dir / "checkpoints" / step_name(8) / "optimizer.pt", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "rng"} <= set(state)
    assert isinstance(state["rng"][0]["torch"], torch.Tensor)  # one per process
