"""Sweeps: a real 4-job multirun through the CLI (its W&B runs and its report), the same
command continuing it after a job was killed, an Optuna search, the experiment presets, and
the sweep-folder lookup on hand-made folders."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from instruct.compat.hydra import sweeper_target
from instruct.config import compose, option_names
from instruct.sweep import (
    continue_sweep,
    count_jobs,
    override_values,
    parse_command,
)
from instruct.tracking import read_offline_run
from tests.conftest import toy_config
from tests.test_report import assert_png

# model=tiny, 2 steps, no sample replies: about 1 s a job once the first has warmed up.
FAST = [
    "model=tiny",
    "trainer.max_steps=2",
    "trainer.eval_every=1",
    "data.domains=[math]",
    "trainer.samples=0",
]
# eval=quick as a sweep's default, cut to 6 prompts and 8 tokens for the tiny model.
EVAL = ["eval=quick", "eval.ifeval.subset=6", "eval.max_new_tokens=8"]
SWEPT = ["template=alpaca,vicuna", "lora.rank=4,8"]
JOBS = {0: ("alpaca", 4), 1: ("alpaca", 8), 2: ("vicuna", 4), 3: ("vicuna", 8)}  # Hydra's order
FIXED = {
    "model": "tiny",
    "trainer.max_steps": 2,
    "trainer.eval_every": 1,
    "data.domains": ["math"],
    "trainer.samples": 0,
    "eval": "quick",
    "eval.ifeval.subset": 6,
    "eval.max_new_tokens": 8,
}


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m instruct.run args`` in ``cwd``, with its own W&B service (see conftest)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return subprocess.run(
        [sys.executable, "-m", "instruct.run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def wandb_runs(job: Path) -> list[Path]:
    return sorted(job.glob("wandb/offline-run-*/run-*.wandb"))


def results(job: Path) -> dict:
    return json.loads((job / "results.json").read_text(encoding="utf-8"))


def pairs(history: list[list[float]]) -> list[tuple]:
    """A loss history as (step, loss) tuples, as read back from W&B."""
    return [(int(step), value) for step, value in history]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """``python -m instruct.run -m <FAST> template=alpaca,vicuna lora.rank=4,8``, once, in a
    fresh working directory: Hydra picks the timestamped folder, as for a user."""
    cwd = tmp_path_factory.mktemp("sweep")
    proc = run_cli(cwd, "-m", *FAST, *EVAL, *SWEPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = cwd.glob("outputs/multirun/*/*")
    return SimpleNamespace(cwd=cwd, folder=folder, proc=proc)


@pytest.mark.slow
def test_each_job_is_its_own_wandb_run_in_the_sweeps_group(sweep):
    date, time = sweep.folder.parts[-2:]
    seen = []
    for number, (template, rank) in JOBS.items():
        job = sweep.folder / str(number)
        (run_file,) = wandb_runs(job)  # exactly one W&B run per job
        recorded = read_offline_run(run_file)
        assert recorded["complete"]  # its exit record: wandb.finish() ran before the next job
        run, config = recorded["run"], recorded["config"]
        assert run["group"] == f"sweep-{date}_{time}"
        assert f"template={template}" in run["name"] and f"lora.rank={rank}" in run["name"]
        # The overrides, flat and typed, for W&B's grouping and parallel coordinates.
        assert config["overrides"] == {**FIXED, "template": template, "lora.rank": rank}
        assert "overrides" not in config["logger"]
        assert config["lora"]["rank"] == rank and config["template"]["name"] == template
        # The run holds this job's validation curve and no other job's.
        logged = [
            (row["_step"], row["val/loss"]) for row in recorded["history"] if "val/loss" in row
        ]
        assert logged == pairs(results(job)["val_loss_history"])
        assert recorded["summary"]["best_val_loss"] == pytest.approx(results(job)["best_val_loss"])
        # The shared evaluation: scores with intervals, the base model's, and the replies.
        scores = results(job)["eval"]["tuned"]["ifeval"]["scores"]
        summary = recorded["summary"]
        for figure in ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose"):
            name = f"eval/ifeval/{figure}"
            assert summary[name] == pytest.approx(scores[figure]["value"])
            assert [summary[f"{name}_ci_low"], summary[f"{name}_ci_high"]] == scores[figure]["ci"]
            assert f"eval/base/ifeval/{figure}" in summary
        assert any("eval/ifeval/prompt_strict" in row for row in recorded["history"])
        tables = [r for r in recorded["history"] if r.get("eval/ifeval/_type") == "table-file"]
        assert len(tables) == 1 and tables[0]["eval/ifeval/nrows"] == 6  # the replies
        seen.append((run["id"], run["name"]))
    assert len({i for i, _ in seen}) == 4 and len({n for _, n in seen}) == 4


@pytest.mark.slow
def test_the_report_ranks_by_the_eval_score_with_intervals_and_base_rows(sweep):
    done = subprocess.run(
        [sys.executable, "-m", "instruct.report", str(sweep.folder)],
        cwd=sweep.cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with (sweep.folder / "report.csv").open(newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    jobs, bases = table[:4], table[4:]
    assert [row["status"] for row in jobs] == ["finished"] * 4
    # One base-model row per template, each scored with that template.
    assert sorted(row["job"] for row in bases) == [
        "base model (template=alpaca)",
        "base model (template=vicuna)",
    ]
    values = [float(row["value"]) for row in jobs]
    assert values == sorted(values, reverse=True)  # a score: higher first
    assert jobs[0]["vs_best"] == "best"
    for row in table:
        assert row["metric"] == "ifeval/prompt_strict"
        assert float(row["ci_low"]) <= float(row["value"]) <= float(row["ci_high"])
    for row in table[1:]:
        tied = float(row["diff_ci_low"]) <= 0 <= float(row["diff_ci_high"])
        assert row["vs_best"] == ("tied with best" if tied else "below best")
    for row in jobs:
        job = sweep.folder / row["job"]
        r = results(job)
        template, rank = JOBS[int(row["job"])]
        assert (
            f"template={template}" in row["overrides"] and f"lora.rank={rank}" in row["overrides"]
        )
        tuned = r["eval"]["tuned"]["ifeval"]
        assert float(row["value"]) == tuned["scores"]["prompt_strict"]["value"]
        assert int(row["prompts"]) == tuned["prompts"] == 6
        assert float(row["best_val_loss"]) == r["best_val_loss"]
        assert row["checkpoint"] == r["checkpoint"] == str(job / "checkpoints" / "best")
        assert_png(job / "loss.png")

    text = (sweep.folder / "report.md").read_text(encoding="utf-8")
    assert "4 of 4 jobs finished." in text and "Ranked by **ifeval/prompt_strict**" in text
    assert "| base model (template=alpaca) |" in text
    assert "warning" not in done.stderr.lower()
    for name in ("val_loss.png", "ifeval_prompt_strict.png",
                 "best_ifeval_prompt_strict_by_template.png"):  # fmt: skip
        assert_png(sweep.folder / name)

    # Ranked by validation loss instead: the two templates' losses measure different tokens.
    done = subprocess.run(
        [sys.executable, "-m", "instruct.report", str(sweep.folder), "--metric", "val_loss"],
        cwd=sweep.cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "measured on different tokens" in done.stderr
    with (sweep.folder / "report.csv").open(newline="", encoding="utf-8") as f:
        losses = [float(row["best_val_loss"]) for row in csv.DictReader(f)]
    assert losses == sorted(losses)


@pytest.mark.slow
def test_the_same_command_continues_the_sweep(sweep):
    """Job 3 is made to look killed during its step 2 (no results.json, no step-2 checkpoint);
    the identical command then finds the sweep, skips jobs 0-2 (results.json untouched, no
    new W&B run) and resumes job 3 from step 1 to the result it had."""
    jobs = [sweep.folder / str(n) for n in JOBS]
    stamps = {job: (job / "results.json").stat().st_mtime_ns for job in jobs[:3]}
    before = results(jobs[3])
    (jobs[3] / "results.json").unlink()
    for path in sorted((jobs[3] / "checkpoints" / "step-00000002").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (jobs[3] / "checkpoints" / "step-00000002").rmdir()

    proc = run_cli(sweep.cwd, "-m", *FAST, *EVAL, *SWEPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    relative = sweep.folder.relative_to(sweep.cwd)
    assert f"continuing sweep {relative}: 3 of 4 jobs finished, skipping them" in proc.stderr
    assert list(sweep.cwd.glob("outputs/multirun/*/*")) == [sweep.folder]  # no new folder

    for job in jobs[:3]:  # how a job knows: its results.json, for this config
        assert f"{job}: this run already finished (results.json); nothing to do" in proc.stdout
        assert (job / "results.json").stat().st_mtime_ns == stamps[job]
        assert len(wandb_runs(job)) == 1
    step_1 = jobs[3] / "checkpoints" / "step-00000001"
    assert f"resuming from {step_1} (step 1 of 2)" in proc.stdout
    after = results(jobs[3])
    assert after["best_val_loss"] == pytest.approx(before["best_val_loss"], abs=1e-6)
    assert [s for s, _ in after["val_loss_history"]] == [0, 1, 2]
    assert [v for _, v in after["val_loss_history"]] == pytest.approx(
        [v for _, v in before["val_loss_history"]], abs=1e-6
    )
    first, resumed = wandb_runs(jobs[3])  # the same W&B run, continued
    assert read_offline_run(first)["run"]["id"] == read_offline_run(resumed)["run"]["id"]


@pytest.mark.slow
def test_an_optuna_search_of_three_trials(tmp_path):
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper",
        reason="hydra-optuna-sweeper is not installed: pip install -e '.[optuna]' (setup.sh does)",
    )
    # eval=none: each trial returns its best validation loss, which Optuna minimises.
    proc = run_cli(
        tmp_path, "-m", "hydra/sweeper=optuna_lr", "hydra.sweeper.n_trials=3", *FAST, "eval=none"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = tmp_path.glob("outputs/multirun/*/*")
    trials = sorted(p for p in folder.iterdir() if p.name.isdigit())
    assert [p.name for p in trials] == ["0", "1", "2"]
    params, groups = [], set()
    for job in trials:
        (run_file,) = wandb_runs(job)
        recorded = read_offline_run(run_file)
        overrides = recorded["config"]["overrides"]
        assert 1e-5 <= overrides["optimizer.lr"] <= 1e-2  # conf/hydra/sweeper/optuna_lr.yaml
        assert overrides["lora.rank"] in (4, 8, 16, 32)
        assert recorded["config"]["optimizer"]["lr"] == overrides["optimizer.lr"]
        params.append((overrides["optimizer.lr"], overrides["lora.rank"], results(job)))
        groups.add(recorded["run"]["group"])
    assert len(groups) == 1 and len({lr for lr, _, _ in params}) == 3
    best = yaml.safe_load((folder / "optimization_results.yaml").read_text(encoding="utf-8"))
    lr, rank, winner = min(params, key=lambda p: p[2]["best_val_loss"])
    assert best["best_value"] == winner["best_val_loss"]  # what main returned to Optuna
    assert best["best_params"] == {"optimizer.lr": lr, "lora.rank": rank}
    # Only the learning rate and rank differ: the same validation tokens, no warning.
    done = subprocess.run(
        [sys.executable, "-m", "instruct.report", str(folder)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ranked by **val_loss**" in (folder / "report.md").read_text(encoding="utf-8")
    assert "warning" not in done.stderr.lower()


@pytest.mark.slow
@pytest.mark.parametrize("name", option_names("experiment"))
def test_every_experiment_composes_and_sweeps(name):
    """Each preset is a ``# @package _global_`` file whose hydra.sweeper.params sweep keys
    that compose, one value at a time, into the run config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose([f"+experiment={name}"], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    assert count_jobs(params) >= 2
    for override in OverridesParser.create().parse_overrides(params):
        for value in override.sweep_string_iterator():
            compose([f"+experiment={name}", f"{override.get_key_element()}={value}"])


@pytest.mark.slow
def test_sweepers_are_told_which_way_the_metric_goes():
    """Optuna maximises an eval score and minimises a validation loss (what main returns)."""
    for overrides, direction in (
        (["eval=quick"], "maximize"),
        (["eval=none"], "minimize"),
        (["eval=quick", "report.metric=val_loss"], "minimize"),
        (["eval=none", "report.metric=ifeval/inst_loose"], "maximize"),
    ):
        cfg = compose(["hydra/sweeper=optuna_lr", *overrides], return_hydra_config=True)
        assert cfg.hydra.sweeper.direction == direction, overrides


def test_a_sweep_gets_eval_quick_unless_it_names_an_eval():
    from instruct.run import with_sweep_eval

    assert with_sweep_eval(["run", "-m", "lora.rank=4,8"])[-1] == "eval=quick"
    assert with_sweep_eval(["run", "-m", "eval=none"]) == ["run", "-m", "eval=none"]
    assert with_sweep_eval(["run", "lora.rank=4"]) == ["run", "lora.rank=4"]  # one run


def test_experiments_ship():
    assert {"template_comparison", "lora_rank"} <= set(option_names("experiment"))


# The lookup on hand-made sweep folders: which folder a command continues, and why.


def fake_sweep(
    root: Path,
    stamp: str,
    task: list[str],
    finished: list[int],
    started: list[int] = (),
    hydra: list[str] = (),
    sweeper: str | None = None,  # None: Hydra's basic sweeper
    params: dict | None = None,
) -> Path:
    sweeper = sweeper or sweeper_target("basic")
    folder = root / stamp
    folder.mkdir(parents=True)
    recorded = {
        "hydra": {
            "overrides": {"hydra": ["hydra.mode=MULTIRUN", *hydra], "task": task},
            "job": {"config_name": "config"},
            "sweeper": {"_target_": sweeper, "params": params},
        }
    }
    (folder / "multirun.yaml").write_text(yaml.safe_dump(recorded), encoding="utf-8")
    for number in {*finished, *started}:
        (folder / str(number) / ".hydra").mkdir(parents=True)
    for number in finished:
        (folder / str(number) / "results.json").write_text('{"best_val_loss": 1.5}')
    return folder


ARGV = ["instruct.run", "-m", "model=tiny", *SWEPT]
TASK = ARGV[2:]


def test_an_unfinished_sweep_of_the_same_command_is_continued(tmp_path, capsys):
    root = tmp_path / "outputs" / "multirun"
    # As under torchrun, where another process than the main one may write multirun.yaml last.
    logging = ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    ours = fake_sweep(root, "2026-11-24/10-00-00", TASK, [0, 1], started=[2], hydra=logging)
    fake_sweep(root, "2026-11-24/11-00-00", ["model=tiny", "lora.rank=4,8"], finished=[])
    assert continue_sweep(ARGV, root) == [*ARGV, f"hydra.sweep.dir={ours}"]
    said = capsys.readouterr().err
    assert f"continuing sweep {ours}: 2 of 4 jobs finished, skipping them" in said
    assert "--new-sweep starts a new sweep instead" in said


def test_a_complete_sweep_or_new_sweep_starts_a_new_folder(tmp_path, capsys):
    root = tmp_path / "outputs" / "multirun"
    fake_sweep(root, "2026-11-24/09-00-00", TASK, finished=[0])  # older, unfinished
    done = fake_sweep(root, "2026-11-24/10-00-00", TASK, finished=[0, 1, 2, 3])
    assert continue_sweep(ARGV, root) == ARGV  # the newest is complete: a new sweep
    said = capsys.readouterr().err
    assert f"{done}, is complete (4 of 4 jobs finished); starting a new sweep" in said

    unfinished = fake_sweep(root, "2026-11-24/12-00-00", TASK, finished=[3])
    assert continue_sweep(ARGV, root)[-1] == f"hydra.sweep.dir={unfinished}"
    capsys.readouterr()
    assert continue_sweep([*ARGV, "--new-sweep"], root) == ARGV  # asked for a fresh one
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["instruct.run", "-m", "model=tiny", "lora.rank=4,8", "template=alpaca,vicuna"],  # order
        [*ARGV, "lora.dropout=0.1"],
        [*ARGV, "hydra.sweeper.max_batch_size=2"],
        ["instruct.run", "-m", "-cn", "other", *TASK],
        ["instruct.run", *TASK],  # not a multirun
        [*ARGV, "--cfg", "job"],  # prints the config, runs nothing
    ],
)
def test_only_the_identical_command_continues_a_sweep(tmp_path, argv):
    """Job N is the same job only for the same overrides in the same order."""
    root = tmp_path / "outputs" / "multirun"
    fake_sweep(root, "2026-11-24/10-00-00", TASK, finished=[0])
    assert continue_sweep(argv, root) == argv


def test_a_sweep_another_sweeper_ran_is_not_continued(tmp_path, capsys):
    root = tmp_path / "outputs" / "multirun"
    fake_sweep(root, "2026-11-24/10-00-00", TASK, finished=[0], sweeper="optuna.Sweeper")
    assert continue_sweep(ARGV, root) == ARGV
    assert "cannot be continued; starting a new sweep" in capsys.readouterr().err


def test_a_given_sweep_dir_must_hold_the_same_sweep(tmp_path, capsys):
    ours = fake_sweep(tmp_path, "ours", TASK, finished=[0, 1])
    pinned = [*ARGV, f"hydra.sweep.dir={ours}"]
    assert continue_sweep(pinned, tmp_path / "nowhere") == pinned
    assert f"continuing sweep {ours}: 2 of 4 jobs finished" in capsys.readouterr().err

    other = fake_sweep(tmp_path, "other", ["model=tiny", "lora.rank=16,32"], finished=[])
    with pytest.raises(SystemExit) as refused:
        continue_sweep([*ARGV, f"hydra.sweep.dir={other}"])
    message = str(refused.value)
    assert f"hydra.sweep.dir={other} holds a sweep of other overrides" in message
    assert "(model=tiny lora.rank=16,32)" in message and "template=alpaca,vicuna" in message

    optuna = tmp_path / "optuna"
    (optuna / "0").mkdir(parents=True)  # job folders, no multirun.yaml: not the basic sweeper
    with pytest.raises(SystemExit, match=f"hydra.sweep.dir={optuna} holds job folders"):
        continue_sweep([*ARGV, f"hydra.sweep.dir={optuna}"])
    new = [*ARGV, f"hydra.sweep.dir={tmp_path / 'new'}"]
    assert continue_sweep(new) == new


def test_counting_jobs_as_the_basic_sweeper_does():
    assert count_jobs(["template=alpaca,vicuna,chatml", "lora.rank=8,16"]) == 6
    assert count_jobs(["lora.rank=4,8,16,32", "model=tiny", "lora.rank=8"]) == 1  # last wins
    assert count_jobs(["lora.rank=range(4,12,4)", "seed=0"]) == 2
    assert count_jobs(["optimizer.lr=interval(1e-5,1e-3)"]) is None  # a search, not a grid


def test_parse_command_splits_task_and_hydra_overrides():
    command = parse_command([*ARGV, "hydra/sweeper=optuna", "hydra.sweep.dir=out/x"])
    assert command.task == TASK
    assert command.hydra == ["hydra/sweeper=optuna"]
    assert command.sweep_dir == "out/x" and command.config_name == "config"
    assert parse_command(["instruct.run", "-m", "lora.rank=4,"]) is None  # Hydra reports it


def test_override_values_are_typed_as_the_config_holds_them():
    overrides = ["template=vicuna", "lora.rank=16", "optimizer.lr=1e-3", "data.domains=[math]"]
    cfg = compose(overrides, return_hydra_config=True)
    assert override_values(overrides, cfg, cfg.hydra.runtime.choices) == {
        "template": "vicuna",
        "lora.rank": 16,
        "optimizer.lr": 0.001,
        "data.domains": ["math"],
    }


@pytest.mark.slow
def test_a_finished_folder_of_another_config_is_refused_not_skipped(toy_data, tmp_path):
    """A sweep folder reused with other values must not hand back the old job's results."""
    from instruct.train import train

    run_dir = tmp_path / "run"
    short = ["logger=none", "trainer.samples=0", "trainer.max_steps=2", "trainer.eval_every=2"]
    train(toy_config(toy_data, run_dir, "lora=default", "lora.rank=4", *short))
    again = train(toy_config(toy_data, run_dir, "lora=default", "lora.rank=4", *short,
                             "trainer.resume=auto"))  # fmt: skip
    assert again == json.loads((run_dir / "results.json").read_text())
    with pytest.raises(ValueError, match="lora.rank"):
        train(toy_config(toy_data, run_dir, "lora=default", "lora.rank=8", *short,
                         "trainer.resume=auto"))  # fmt: skip
