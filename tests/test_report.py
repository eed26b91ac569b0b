"""The sweep report: fake job folders in, table, CSV and PNG plots out; no training needed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from matplotlib.image import imread

from instruct.reporting import find_jobs, plot_run, rank, report, rows, swept_params
from tests.conftest import run_module

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMON = ["model=tiny", "trainer.max_steps=20"]  # the same in every job: not swept

# job -> (swept overrides, best val loss); job 2 wins, job 1 has lr in scientific notation.
FINISHED_JOBS = {
    0: (["template=alpaca", "lora.rank=8", "optimizer.lr=1e-3"], 2.5),
    1: (["template=chatml", "lora.rank=16", "optimizer.lr=1e-5"], 2.75),
    2: (["template=chatml", "lora.rank=8", "optimizer.lr=1e-3"], 2.125),
}


def fake_results(best: float, seed: int) -> dict:
    val = [[0, best + 1.0], [10, best + 0.25], [20, best]]
    train = [[s, best + 1.5 - s / 20] for s in range(1, 21)]
    return {
        "best_val_loss": best,
        "best_step": 20,
        "initial_val_loss": best + 1.0,
        "final_val_loss": best,
        "final_train_loss": train[-1][1],
        "train_loss_history": train,
        "val_loss_history": val,
        "supervised_tokens": 1000 * (seed + 1),
        "steps": 20,
        "train_seconds": 4.0 + seed,
        "eval_seconds": 1.5,
        "checkpoint": f"/runs/sweep/{seed}/checkpoints/best",
        "data": {"train": 76, "val": 8},
        "world_size": 1,
    }


def write_job(root: Path, index: int, overrides: list[str]) -> Path:
    job = root / str(index)
    (job / ".hydra").mkdir(parents=True)
    lines = "".join(f"- {o}\n" for o in overrides)
    (job / ".hydra" / "overrides.yaml").write_text(lines, encoding="utf-8")
    return job


def write_metrics(job: Path, last_step: int) -> None:
    records = [{"step": 0, "val/loss": 4.0}]
    records += [{"step": s, "train/loss": 4.0 - s / 10} for s in range(1, last_step + 1)]
    records.append({"step": 5, "val/loss": 3.5})
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 99, "train/lo'  # cut off
    (job / "metrics.jsonl").write_text(text, encoding="utf-8")


@pytest.fixture
def sweep(tmp_path) -> tuple[Path, dict[int, dict]]:
    """Three finished jobs, one failed (Traceback in run.log), one still running, one with a
    corrupt results.json; (sweep folder, results of the finished jobs by job number)."""
    root = tmp_path / "multirun" / "2026-11-24" / "10-00-00"
    results = {}
    for index, (overrides, best) in FINISHED_JOBS.items():
        job = write_job(root, index, [*COMMON, *overrides])
        results[index] = fake_results(best, index)
        (job / "results.json").write_text(json.dumps(results[index]), encoding="utf-8")
        write_metrics(job, 20)

    failed = write_job(root, 3, [*COMMON, "template=vicuna", "lora.rank=8", "optimizer.lr=1e-3"])
    write_metrics(failed, 7)
    (failed / "run.log").write_text(
        "[INFO] - step 7\nError executing job with overrides: [...]\n"
        "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n",
        encoding="utf-8",
    )
    running = write_job(root, 4, [*COMMON, "template=vicuna", "lora.rank=16", "optimizer.lr=1e-3"])
    write_metrics(running, 12)
    (running / "checkpoints" / "step-00000010").mkdir(parents=True)
    (running / "run.log").write_text("[INFO] - step 12\n", encoding="utf-8")

    corrupt = write_job(root, 5, [*COMMON, "template=alpaca", "lora.rank=16", "optimizer.lr=1e-3"])
    (corrupt / "results.json").write_text('{"best_val_loss": 2.0, "best_st', encoding="utf-8")
    (root / "multirun.yaml").write_text("hydra: {}\n", encoding="utf-8")  # Hydra writes one
    return root, results


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] >= 100 and image.shape[1] >= 100, image.shape


def test_rows_match_results_sorted_winner_first(sweep):
    root, results = sweep
    table = rows(find_jobs(root))
    assert [r["job"] for r in table] == ["2", "0", "1", "3", "4", "5"]  # finished by loss, rest

    for row in table[:3]:
        r = results[int(row["job"])]
        assert row["status"] == "finished"
        assert row["overrides"] == ",".join([*COMMON, *FINISHED_JOBS[int(row["job"])][0]])
        for key in ("best_val_loss", "best_step", "final_train_loss", "supervised_tokens"):
            assert row[key] == r[key], key
        assert row["train_seconds"] == r["train_seconds"]
        assert row["tokens_per_s"] == pytest.approx(r["supervised_tokens"] / r["train_seconds"])
        assert row["checkpoint"] == r["checkpoint"]
    assert [r["rank"] for r in table] == [1, 2, 3, None, None, None]

    failed, running, corrupt = table[3:]
    assert failed["status"] == "failed" and failed["last_step"] == 7
    assert running["status"] == "running/incomplete" and running["last_step"] == 12
    assert corrupt["status"].startswith("unreadable results.json: ")
    assert "line 1" in corrupt["status"]  # the JSON error, with its position
    assert failed["best_val_loss"] is None and failed["checkpoint"] is None


@pytest.mark.slow
def test_report_md_marks_the_winner_and_lists_every_job(sweep):
    root, results = sweep
    written = report(root)
    assert root / "report.md" in written
    text = (root / "report.md").read_text(encoding="utf-8")
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = table[0], table[1:]
    assert "best val loss" in header and "tokens/s" in header and "checkpoint" in header
    assert len(body) == 6
    assert "**best**" in body[0] and "template=chatml,lora.rank=8" in body[0]
    assert sum("**best**" in line for line in body) == 1
    assert "2.1250" in body[0] and "`/runs/sweep/2/checkpoints/best`" in body[0]
    assert f"{3000 / 6.0:.0f}" in body[0]  # tokens/s of job 2: 3000 tokens in 6 s
    assert "| failed |" in body[3] and "| running/incomplete |" in body[4]
    assert "unreadable results.json" in body[5]
    assert "3 of 6 jobs finished" in text


@pytest.mark.slow
def test_csv_parses_back_to_the_same_values(sweep):
    root, results = sweep
    report(root)
    with (root / "report.csv").open(newline="", encoding="utf-8") as f:
        parsed = list(csv.DictReader(f))
    assert [r["job"] for r in parsed] == ["2", "0", "1", "3", "4", "5"]
    for row in parsed[:3]:
        r = results[int(row["job"])]
        assert float(row["best_val_loss"]) == r["best_val_loss"]
        assert int(row["best_step"]) == r["best_step"]
        assert float(row["final_train_loss"]) == r["final_train_loss"]
        assert int(row["supervised_tokens"]) == r["supervised_tokens"]
        assert float(row["train_seconds"]) == r["train_seconds"]
        assert float(row["tokens_per_s"]) == r["supervised_tokens"] / r["train_seconds"]
        assert row["checkpoint"] == r["checkpoint"]
        assert row["status"] == "finished"
    assert [r["status"] for r in parsed[3:5]] == ["failed", "running/incomplete"]
    assert [r["last_step"] for r in parsed[3:5]] == ["7", "12"]
    assert parsed[3]["best_val_loss"] == "" and parsed[3]["rank"] == ""


@pytest.mark.slow
def test_swept_parameters_and_their_plots(sweep):
    root, _ = sweep
    swept = swept_params(find_jobs(root))
    assert list(swept) == ["template", "lora.rank", "optimizer.lr"]  # not model, max_steps
    assert swept["lora.rank"] == ["8", "16", "8", "8", "16", "16"]

    written = report(root)
    pngs = {p.name for p in written if p.suffix == ".png"}
    assert pngs == {
        "val_loss.png",
        "best_val_loss_by_template.png",
        "best_val_loss_by_lora.rank.png",
        "best_val_loss_by_optimizer.lr.png",
    }
    for name in pngs:
        assert_png(root / name)
    assert not (root / "loss.png").exists()


def test_single_run_folder_gets_loss_png(tmp_path):
    run = tmp_path / "outputs" / "2026-11-24" / "10-00-00"
    run.mkdir(parents=True)
    results = fake_results(2.0, 0)
    (run / "results.json").write_text(json.dumps(results), encoding="utf-8")
    written = report(run)
    assert run / "loss.png" in written
    assert_png(run / "loss.png")
    table = rows(find_jobs(run))
    assert len(table) == 1 and table[0]["best_val_loss"] == 2.0


@pytest.mark.slow
def test_single_unfinished_run_plots_from_metrics(tmp_path):
    write_metrics(tmp_path, 9)
    report(tmp_path)
    assert_png(tmp_path / "loss.png")
    [row] = rows(find_jobs(tmp_path))
    assert row["status"] == "running/incomplete" and row["last_step"] == 9


def test_plot_run_draws_a_png(tmp_path):
    plot_run(fake_results(1.5, 0), tmp_path / "loss.png")
    assert_png(tmp_path / "loss.png")
    plot_run({"best_val_loss": math.nan, "val_loss_history": []}, tmp_path / "empty.png")
    assert_png(tmp_path / "empty.png")  # nothing logged yet: an empty chart, not a crash


def test_folders_without_jobs_are_named_in_the_error(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        find_jobs(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "7").mkdir()  # a numbered folder Hydra never started a job in
    with pytest.raises(ValueError, match="no jobs"):
        report(tmp_path)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        report(missing)


@pytest.mark.slow
def test_cli_writes_the_report(sweep, tmp_path):
    root, _ = sweep
    done = run_module("instruct.report", str(root), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert str(root / "report.md") in done.stdout
    assert (root / "report.csv").is_file()
    assert_png(root / "val_loss.png")

    missing = tmp_path / "nowhere"
    done = run_module("instruct.report", str(missing), cwd=tmp_path)
    assert done.returncode != 0
    assert f"error: {missing}" in done.stderr
    assert "Traceback" not in done.stderr


# --- ranking by an eval score, with intervals, ties and the base model's row -------------


def write_evaluated_job(root: Path, index: int, overrides: list[str], passed: list[int],
                        base: list[int], fingerprint: str = "same") -> None:  # fmt: skip
    """A finished job whose eval (one suite, prompt-level 0/1 per prompt) is written by the
    runner's own functions, as a real run writes it."""
    from types import SimpleNamespace

    from instruct.eval.runner import headline, save_result, summarise
    from instruct.eval.suite import Score, SuiteResult

    cfg = SimpleNamespace(bootstrap_samples=500, confidence=0.95, seed=0)
    job = write_job(root, index, [*COMMON, *overrides])
    ids = [f"k{i}" for i in range(len(passed))]
    evaluation = {"name": "quick", "suites": ["ifeval"], "tuned": {}, "base": {}}
    for label, values in (("tuned", passed), ("base", base)):
        result = SuiteResult(
            "ifeval", ids, {"prompt_strict": Score(values, [1] * len(values))}, "prompt_strict"
        )
        save_result(job / "eval", label, result)
        evaluation[label]["ifeval"] = summarise(result, cfg)
    evaluation["headline"] = headline(evaluation)
    results = {**fake_results(2.0 + index, index), "eval": evaluation}
    results["val_fingerprint"] = fingerprint
    (job / "results.json").write_text(json.dumps(results), encoding="utf-8")


@pytest.fixture
def evaluated(tmp_path) -> Path:
    """Job 1 wins on every prompt where the others differ; jobs 0 and 2 are identical."""
    root = tmp_path / "multirun" / "2026-12-01" / "10-00-00"
    base = [0] * 60
    middling = [1 if i % 3 == 0 else 0 for i in range(60)]  # 20 of 60
    strong = [1 if i % 3 == 0 or i < 30 else 0 for i in range(60)]  # 40 of 60
    write_evaluated_job(root, 0, ["optimizer.lr=1e-4"], middling, base)
    write_evaluated_job(root, 1, ["optimizer.lr=1e-3"], strong, base)
    write_evaluated_job(root, 2, ["optimizer.lr=1e-5"], middling, base)
    return root


def test_an_evaluated_sweep_is_ranked_by_the_eval_score_with_ties(evaluated):
    ranked = rank(find_jobs(evaluated))
    assert ranked.metric.name == "ifeval/prompt_strict" and ranked.metric.higher_is_better
    table = {r["job"]: r for r in ranked.rows}
    assert [r["job"] for r in ranked.rows][:3] == ["1", "0", "2"]
    assert table["1"]["vs_best"] == "best" and table["1"]["value"] == pytest.approx(40 / 60)
    low, high = table["1"]["ci_low"], table["1"]["ci_high"]
    assert low < 40 / 60 < high
    for job in ("0", "2"):  # 20 prompts worse, never better: separated from the best
        assert table[job]["vs_best"] == "below best"
        assert table[job]["diff"] == pytest.approx(-20 / 60)
        assert table[job]["diff_ci_high"] < 0
    base = table["base model"]
    assert base["status"] == "base model" and base["value"] == 0.0 and base["rank"] is None
    assert len([r for r in ranked.rows if r["status"] == "base model"]) == 1  # shared base
    assert ranked.warnings == []  # an eval score: no validation-loss warning


def test_identical_jobs_are_tied_with_the_best(tmp_path):
    root = tmp_path / "sweep"
    same = [1 if i % 2 else 0 for i in range(40)]
    write_evaluated_job(root, 0, ["optimizer.lr=1e-4"], same, [0] * 40)
    write_evaluated_job(root, 1, ["optimizer.lr=1e-3"], same, [0] * 40)
    table = rank(find_jobs(root)).rows
    assert table[0]["vs_best"] == "best" and table[1]["vs_best"] == "tied with best"
    assert table[1]["diff"] == 0 and table[1]["prompts_to_separate"] is None
    report(root)
    text = (root / "report.md").read_text(encoding="utf-8")
    assert "tied with best: +0.0000 [+0.0000, +0.0000]" in text
    assert "ifeval/prompt_strict (95% CI)" in text and "| base model |" in text


def test_report_files_carry_the_intervals_and_a_score_plot(evaluated):
    written = report(evaluated)
    names = {p.name for p in written}
    assert "ifeval_prompt_strict.png" in names
    assert "best_ifeval_prompt_strict_by_optimizer.lr.png" in names
    assert_png(evaluated / "ifeval_prompt_strict.png")
    with (evaluated / "report.csv").open(newline="", encoding="utf-8") as f:
        parsed = list(csv.DictReader(f))
    assert parsed[0]["job"] == "1" and parsed[0]["vs_best"] == "best"
    assert float(parsed[0]["ci_low"]) < float(parsed[0]["value"]) < float(parsed[0]["ci_high"])
    assert parsed[-1]["job"] == "base model"
    assert parsed[1]["vs_best"] == "below best" and float(parsed[1]["diff_ci_high"]) < 0


def test_val_loss_ranking_warns_when_validation_tokens_differ(tmp_path):
    root = tmp_path / "templates"
    for i, (template, fp) in enumerate((("alpaca", "aaa"), ("chatml", "ccc"))):
        job = write_job(root, i, [*COMMON, f"template={template}"])
        results = {**fake_results(2.0 + i, i), "val_fingerprint": fp}
        (job / "results.json").write_text(json.dumps(results), encoding="utf-8")
    ranked = rank(find_jobs(root))
    assert ranked.metric.name == "val_loss"
    assert len(ranked.warnings) == 1 and "different tokens" in ranked.warnings[0]
    report(root)
    assert "**Warning:**" in (root / "report.md").read_text(encoding="utf-8")


def test_an_eval_ranking_notes_that_the_val_loss_column_compares_different_tokens(tmp_path):
    """Ranked by an eval score, nothing is wrong with the ranking, but the table's val loss
    column still invites a comparison it cannot carry: a note says so, and only then."""
    root = tmp_path / "templates"
    passed = [1 if i % 2 else 0 for i in range(40)]
    for i, template in enumerate(("alpaca", "chatml")):
        write_evaluated_job(root, i, [f"template={template}"], passed, [0] * 40, f"fp{i}")
    ranked = rank(find_jobs(root))
    assert ranked.metric.is_eval and ranked.warnings == []
    assert len(ranked.notes) == 1 and "different tokens" in ranked.notes[0]
    report(root)
    text = (root / "report.md").read_text(encoding="utf-8")
    assert "**Note:** the best val loss column is not comparable" in text
    assert "**Warning:**" not in text
    same = tmp_path / "lr"
    for i, lr in enumerate(("1e-4", "1e-3")):
        write_evaluated_job(same, i, [f"optimizer.lr={lr}"], passed, [0] * 40)
    assert rank(find_jobs(same)).notes == []


def test_val_loss_ranking_does_not_warn_when_only_the_learning_rate_differs(tmp_path):
    root = tmp_path / "lr"
    for i, lr in enumerate(("1e-4", "1e-3")):
        job = write_job(root, i, [*COMMON, f"optimizer.lr={lr}"])
        results = {**fake_results(2.0 + i, i), "val_fingerprint": "same"}
        (job / "results.json").write_text(json.dumps(results), encoding="utf-8")
    assert rank(find_jobs(root)).warnings == []


def test_metric_can_be_chosen(evaluated):
    ranked = rank(find_jobs(evaluated), "val_loss")
    assert ranked.metric.name == "val_loss" and not ranked.metric.higher_is_better
    assert [r["job"] for r in ranked.rows] == ["0", "1", "2"]  # by loss, no base row
    with pytest.raises(ValueError, match="report.metric"):
        rank(find_jobs(evaluated), "nonsense")
