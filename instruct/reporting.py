"""Reports of a sweep (or one run): jobs read from their folders, ranked by one yardstick
with intervals, written as Markdown, CSV and plots (``python -m instruct.report``)."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure  # the object API: no pyplot state, always Agg for PNG

from instruct.environment import differences
from instruct.eval.metric import Metric, interval_of, resolve, value_of
from instruct.eval.stats import paired_difference

FINISHED = "finished"
FAILED = "failed"
INCOMPLETE = "running/incomplete"
BASE = "base model"
COLUMNS = [
    "rank",
    "job",
    "overrides",
    "status",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "vs_best",
    "diff_ci_low",
    "diff_ci_high",
    "prompts",
    "prompts_to_separate",
    "best_val_loss",
    "best_step",
    "final_train_loss",
    "supervised_tokens",
    "train_seconds",
    "tokens_per_s",
    "eval_seconds",
    "checkpoint",
    "last_step",
]
HEADERS = {  # report.md's column titles; report.csv keeps the keys above
    "rank": "#",
    "job": "job",
    "overrides": "overrides",
    "status": "status",
    "metric": "metric",
    "value": "score",
    "ci_low": "95% CI",
    "ci_high": "",
    "vs_best": "vs best",
    "diff_ci_low": "difference (95% CI)",
    "diff_ci_high": "",
    "prompts": "prompts",
    "prompts_to_separate": "prompts to separate",
    "best_val_loss": "best val loss",
    "best_step": "best step",
    "final_train_loss": "final train loss",
    "supervised_tokens": "supervised tokens",
    "train_seconds": "train time s",
    "tokens_per_s": "tokens/s",
    "eval_seconds": "eval time s",
    "checkpoint": "checkpoint",
    "last_step": "last logged step",
}
# report.md shows fewer columns than the CSV: intervals as one "[lo, hi]" cell.
MD_COLUMNS_EVAL = [
    "rank", "job", "overrides", "status", "value", "vs_best", "prompts_to_separate",
    "best_val_loss", "train_seconds", "eval_seconds", "checkpoint",
]  # fmt: skip
MD_COLUMNS_LOSS = [
    "rank", "job", "overrides", "status", "best_val_loss", "best_step", "final_train_loss",
    "supervised_tokens", "train_seconds", "tokens_per_s", "checkpoint", "last_step",
]  # fmt: skip
FAILURE_MARKS = ("Error executing job", "Traceback (most recent call last)")


@dataclass
class Job:
    """One run folder: what it was asked (overrides) and what it gave (results or status)."""

    name: str
    path: Path
    overrides: list[str] = field(default_factory=list)
    results: dict[str, Any] | None = None
    status: str = INCOMPLETE
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.results is not None

    @property
    def params(self) -> dict[str, str]:
        """Overrides as key -> value (``lora.rank=8`` -> ``{"lora.rank": "8"}``)."""
        return dict(o.split("=", 1) if "=" in o else (o, "") for o in self.overrides)

    @property
    def last_step(self) -> int | None:
        steps = [m["step"] for m in self.metrics if isinstance(m.get("step"), int)]
        return max(steps) if steps else None

    def curves(self) -> dict[str, list[list[float]]]:
        """Train and val loss histories: from results.json, else from metrics.jsonl."""
        if self.results is not None:
            return {
                "train_loss_history": self.results.get("train_loss_history") or [],
                "val_loss_history": self.results.get("val_loss_history") or [],
            }
        return {
            f"{split}_loss_history": [
                [m["step"], m[f"{split}/loss"]] for m in self.metrics if f"{split}/loss" in m
            ]
            for split in ("train", "val")
        }


def is_run_folder(path: Path) -> bool:
    return (path / "results.json").is_file() or (path / "metrics.jsonl").is_file()


def is_job_folder(path: Path) -> bool:
    """A numbered sweep job that at least started: Hydra wrote its config, or it logged."""
    return (
        path.is_dir()
        and path.name.isdigit()
        and (is_run_folder(path) or (path / ".hydra").is_dir() or (path / "checkpoints").is_dir())
    )


def find_jobs(folder: str | Path) -> list[Job]:
    """Every job of a sweep folder (or the one job of a run folder), read; none dropped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if is_run_folder(folder):
        return [read_job(folder, name=folder.name)]
    jobs = sorted((p for p in folder.iterdir() if is_job_folder(p)), key=lambda p: int(p.name))
    if not jobs:
        raise ValueError(
            f"{folder}: no jobs here (neither results.json nor metrics.jsonl, nor numbered "
            "job folders 0/, 1/, ... of a Hydra multirun)"
        )
    return [read_job(p) for p in jobs]


def read_job(path: Path, name: str | None = None) -> Job:
    job = Job(name=name or path.name, path=path, overrides=read_overrides(path))
    job.metrics = read_metrics(path / "metrics.jsonl")
    results_path = path / "results.json"
    if results_path.is_file():
        try:
            results = json.loads(results_path.read_text(encoding="utf-8"))
            if not isinstance(results, dict):
                raise ValueError(f"expected a JSON object, got {type(results).__name__}")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            job.status = f"unreadable results.json: {err}"
        else:
            job.results, job.status = results, FINISHED
    elif failed(path):
        job.status = FAILED
    return job


def read_overrides(path: Path) -> list[str]:
    """The job's command-line overrides, as Hydra saved them in ``.hydra/overrides.yaml``."""
    file = path / ".hydra" / "overrides.yaml"
    try:
        overrides = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a line cut off by a kill is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def failed(path: Path) -> bool:
    """Whether the job's Hydra log (``run.log``, named after the task) shows an exception."""
    for log_file in path.glob("*.log"):
        try:
            text = log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if any(mark in text for mark in FAILURE_MARKS):
            return True
    return False


def swept_params(jobs: Sequence[Job]) -> dict[str, list[str]]:
    """Override keys whose value differs between jobs -> each job's value ("" if unset)."""
    keys = sorted({key for job in jobs for key in job.params}, key=first_seen(jobs))
    values = {key: [job.params.get(key, "") for job in jobs] for key in keys}
    return {key: v for key, v in values.items() if len(set(v)) > 1}


def first_seen(jobs: Sequence[Job]):
    order: dict[str, int] = {}
    for job in jobs:
        for key in job.params:
            order.setdefault(key, len(order))
    return order.__getitem__


def number(value: Any) -> float | None:
    """``value`` as a finite-or-not float, or None when it is not a number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass
class Ranked:
    """The ranking of a set of jobs by one metric."""

    metric: Metric
    rows: list[dict[str, Any]]
    warnings: list[str]
    best: str | None  # the best job's name
    notes: list[str] = field(default_factory=list)  # what to read the table with


def choose_metric(jobs: Sequence[Job], metric: str) -> Metric:
    """``metric`` resolved against the finished jobs (``auto``: their eval headline)."""
    finished = [j.results for j in jobs if j.results is not None]
    for results in finished:
        chosen = resolve(metric, results)
        if chosen.is_eval or metric != "auto":
            return chosen
    return resolve(metric, finished[0] if finished else None)


def per_prompt(job_path: Path, metric: Metric, label: str = "tuned") -> tuple | None:
    """``(ids, num, den)`` of an eval figure from a job's ``eval/<label>/<suite>.json``."""
    suite, _, figure = metric.name.partition("/")
    try:
        data = json.loads((job_path / "eval" / label / f"{suite}.json").read_text("utf-8"))
        score = data["scores"][figure]
        return [str(i) for i in data["ids"]], score["num"], score["den"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fingerprint_groups(jobs: Sequence[Job]) -> dict[str | None, list[str]]:
    """The finished jobs' names by the fingerprint of their tokenised validation split
    (``None``: not recorded)."""
    groups: dict[str | None, list[str]] = {}
    for job in jobs:
        if job.finished:
            groups.setdefault((job.results or {}).get("val_fingerprint"), []).append(job.name)
    return groups


def val_loss_warning(jobs: Sequence[Job]) -> str | None:
    """Why the jobs' validation losses cannot be compared, if they cannot."""
    groups = fingerprint_groups(jobs)
    if sum(len(names) for names in groups.values()) < 2:
        return None
    if None in groups:
        missing = ", ".join(groups[None])
        return (
            f"jobs {missing} record no validation fingerprint (trained before it was kept), so "
            "whether their validation tokens are the same cannot be told"
        )
    if len(groups) == 1:
        return None
    listed = "; ".join("jobs " + ", ".join(names) for names in groups.values())
    return (
        f"the jobs' validation losses were measured on different tokens ({listed}): another "
        "template or data set changes what the loss measures, so ranking by it compares "
        "different things. Rank by an eval score instead: rerun with eval=quick"
    )


def environment_warning(jobs: Sequence[Job]) -> str | None:
    """A warning when the finished jobs ran with other package versions or project commits
    (``results.json``'s ``environment``): their numbers may differ for that alone."""
    recorded = {job.name: (job.results or {}).get("environment") for job in jobs if job.finished}
    found = differences(recorded)
    if not found:
        return None
    return (
        "the jobs did not all run on the same code, so a difference between them may come "
        "from that alone: " + "; ".join(found)
    )


def sort_key(metric: Metric):
    """Finished jobs by the metric (best first; a NaN or missing value last among them),
    then the unfinished ones in job order."""

    def key(job: Job) -> tuple[int, float, int]:
        value = value_of(metric, job.results)
        ok = not math.isnan(value)
        score = (-value if metric.higher_is_better else value) if ok else math.inf
        index = int(job.name) if job.name.isdigit() else 0
        return (0 if job.finished else 1, score, index)

    return key


def base_rows(jobs: Sequence[Job], metric: Metric) -> list[tuple[str, dict, Path]]:
    """One ``(label, results, job folder)`` per distinct base-model result (one per template
    in a template sweep), taken from the jobs' own evaluations."""
    seen: dict[str, tuple[str, dict, Path]] = {}
    templates = {job.name: template_of(job) for job in jobs}
    for job in jobs:
        if not job.results or interval_of(metric, job.results, "base") is None:
            continue
        data = per_prompt(job.path, metric, "base")
        # The same base model and template score the same; another template is another row.
        key = json.dumps([templates[job.name], data], sort_keys=True) if data else job.name
        if key not in seen:
            label = (
                BASE
                if len(set(templates.values())) <= 1
                else (f"{BASE} (template={templates[job.name]})")
            )
            seen[key] = (label, job.results, job.path)
    return list(seen.values())


def template_of(job: Job) -> str:
    """The template a job trained with (its saved config, else its overrides)."""
    try:
        cfg = yaml.safe_load((job.path / ".hydra" / "config.yaml").read_text(encoding="utf-8"))
        return str(cfg["template"]["name"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return job.params.get("template", "")


def rank(jobs: Sequence[Job], metric_name: str = "auto", samples: int = 1000) -> Ranked:
    """Rows in report order, each finished job compared with the best by paired bootstrap."""
    metric = choose_metric(jobs, metric_name)
    ordered = sorted(jobs, key=sort_key(metric))
    warnings, notes = [], []
    why = val_loss_warning(jobs)
    groups = fingerprint_groups(jobs)
    if why and not metric.is_eval:
        warnings.append(why)
    if same_code := environment_warning(jobs):
        warnings.append(same_code)
    elif None not in groups and len(groups) > 1:
        notes.append(
            "the best val loss column is not comparable across these jobs: their validation "
            "losses were measured on different tokens (another template or data set). The "
            f"ranking uses {metric.name}, which scores every job on the same prompts."
        )
    best = next((j for j in ordered if j.finished and not math.isnan(value_of(metric, j.results))),
                None)  # fmt: skip
    best_data = per_prompt(best.path, metric) if best and metric.is_eval else None
    out = []
    for position, job in enumerate(ordered, start=1):
        row = job_row(job, metric, position if job.finished else None)
        if job is best:
            row["vs_best"] = "best"
        elif best_data is not None and job.finished:
            compare(row, per_prompt(job.path, metric), best_data, samples, warnings, job.name)
        out.append(row)
    if metric.is_eval:
        for label, results, path in base_rows(jobs, metric):
            row = job_row(Job(name=label, path=path, results=results), metric, None, "base")
            row.update(status=BASE, overrides="", checkpoint=None, best_val_loss=None,
                       best_step=None, final_train_loss=None, supervised_tokens=None,
                       train_seconds=None, tokens_per_s=None, eval_seconds=None)  # fmt: skip
            if best_data is not None:
                compare(row, per_prompt(path, metric, "base"), best_data, samples, warnings, label)
            out.append(row)
    return Ranked(metric, out, warnings, best.name if best else None, notes)


def compare(row: dict, data: tuple | None, best: tuple, samples: int, warnings: list[str],
            name: str) -> None:  # fmt: skip
    """Fill ``row``'s comparison with the best job (a paired bootstrap on shared prompts)."""
    if data is None:
        warnings.append(f"{name}: no per-prompt scores (eval/ folder) to compare with the best")
        return
    try:
        paired = paired_difference(data, best, samples=samples)
    except ValueError as err:
        warnings.append(f"{name}: {err}")
        return
    row.update(
        vs_best="tied with best" if paired.tied else "below best",
        diff=paired.difference, diff_ci_low=paired.low, diff_ci_high=paired.high,
        prompts_to_separate=paired.prompts_to_separate if paired.tied else None,
    )  # fmt: skip


def job_row(job: Job, metric: Metric, position: int | None, label: str = "tuned") -> dict:
    r = job.results or {}
    tokens, seconds = number(r.get("supervised_tokens")), number(r.get("train_seconds"))
    value, low, high = math.nan, None, None
    if metric.is_eval:
        found = interval_of(metric, r, label) if r else None
        if found:
            value, low, high = found
    else:
        value = value_of(metric, r)
    evaluation = r.get("eval") or {}
    suite = metric.name.partition("/")[0]
    return {
        "rank": position,
        "job": job.name,
        "overrides": ",".join(job.overrides),
        "status": job.status,
        "metric": metric.name,
        "value": None if math.isnan(value) else value,
        "ci_low": low,
        "ci_high": high,
        "vs_best": "",
        "diff": None,
        "diff_ci_low": None,
        "diff_ci_high": None,
        "prompts": evaluation.get(label, {}).get(suite, {}).get("prompts"),
        "prompts_to_separate": None,
        "best_val_loss": r.get("best_val_loss"),
        "best_step": r.get("best_step"),
        "final_train_loss": r.get("final_train_loss"),
        "supervised_tokens": r.get("supervised_tokens"),
        "train_seconds": r.get("train_seconds"),
        "tokens_per_s": tokens / seconds if tokens is not None and seconds else None,
        "eval_seconds": evaluation.get("total_seconds"),
        "checkpoint": r.get("checkpoint"),
        "last_step": job.last_step,
    }


def rows(jobs: Sequence[Job], metric: str = "auto") -> list[dict[str, Any]]:
    """One row per job (and base model) in report order; see :func:`rank`."""
    return rank(jobs, metric).rows


def fmt(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        digits = {"train_seconds": 1, "eval_seconds": 1, "tokens_per_s": 0}.get(key, 4)
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def md_cell(key: str, row: dict[str, Any]) -> str:
    if key == "rank" and row["vs_best"] == "best":
        return f"{row['rank']} **best**"
    if key == "value":
        if row["value"] is None:
            return ""
        if row["ci_low"] is None:
            return fmt("value", row["value"])
        return f"{row['value']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
    if key == "vs_best" and row.get("diff") is not None:
        return (
            f"{row['vs_best']}: {row['diff']:+.4f} "
            f"[{row['diff_ci_low']:+.4f}, {row['diff_ci_high']:+.4f}]"
        )
    if key in ("overrides", "checkpoint"):
        return f"`{row[key]}`" if row[key] else ""
    if key == "prompts_to_separate" and row[key] is not None:
        return f"~{row[key]}"
    return fmt(key, row[key])


def markdown(folder: Path, ranked: Ranked) -> str:
    """``report.md``: how the jobs were ranked, the warnings, then the table."""
    table, metric = ranked.rows, ranked.metric
    jobs = [r for r in table if r["status"] != BASE]
    finished = [r for r in jobs if r["status"] == FINISHED]
    direction = "higher is better" if metric.higher_is_better else "lower is better"
    lines = [f"# Report: {folder}", "", f"{len(finished)} of {len(jobs)} jobs finished."]
    lines.append(f"Ranked by **{metric.name}** ({direction}).")
    if metric.is_eval:
        lines.append(
            "Scores carry 95% bootstrap intervals over prompts. Each job is compared with the "
            "best by a paired bootstrap on the same prompts: *tied with best* where the "
            "interval of the difference contains 0 (the data cannot tell them apart), with "
            "about how many prompts would separate them at that difference."
        )
    for warning in ranked.warnings:
        lines += ["", f"> **Warning:** {warning}"]
    for note in ranked.notes:
        lines += ["", f"> **Note:** {note}"]
    best = next((r for r in table if r["vs_best"] == "best"), None)
    if best is not None:
        tied = [r["job"] for r in table if r["vs_best"] == "tied with best"]
        lines.append("")
        lines.append(
            f"Best: job {best['job']} (`{best['overrides'] or '(no overrides)'}`), "
            f"{metric.name} {md_cell('value', best)}"
            + (f"; tied with it: {', '.join(tied)}." if tied else "; no job is tied with it.")
        )
    columns = MD_COLUMNS_EVAL if metric.is_eval else MD_COLUMNS_LOSS
    titles = {**HEADERS, "value": f"{metric.name} (95% CI)" if metric.is_eval else metric.name,
              "vs_best": "vs best: difference [95% CI]"}  # fmt: skip
    lines += ["", "| " + " | ".join(titles[c] for c in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in table:
        cells = [md_cell(c, row).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, table: list[dict[str, Any]]) -> None:
    """``report.csv``: the same rows; floats in full (``repr``), empty cells for none."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in table:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in COLUMNS})


def plot_scores(ranked: Ranked, path: Path, swept: dict[str, list[str]]) -> None:
    """Each job's (and the base model's) score with its interval, best at the top."""
    points = [r for r in ranked.rows if r["value"] is not None and r["ci_low"] is not None]
    fig = Figure(figsize=(10, 1.5 + 0.45 * max(len(points), 1)), layout="constrained")
    ax = fig.subplots()
    for y, row in enumerate(reversed(points)):
        colour = "grey" if row["status"] == BASE else (
            "tab:red" if row["vs_best"] == "best" else "tab:blue")  # fmt: skip
        ax.errorbar(row["value"], y, xerr=[[row["value"] - row["ci_low"]],
                    [row["ci_high"] - row["value"]]], fmt="o", color=colour, capsize=4)  # fmt: skip
    ax.set_yticks(range(len(points)), [score_label(r, swept) for r in reversed(points)],
                  fontsize="small")  # fmt: skip
    ax.set(xlabel=f"{ranked.metric.name} (95% bootstrap interval)", title=ranked.metric.name)
    ax.grid(alpha=0.3, axis="x")
    fig.savefig(path, dpi=100)


def score_label(row: dict[str, Any], swept: dict[str, list[str]]) -> str:
    """A row's name on the score plot: the job and its swept overrides, kept short."""
    params = dict(o.split("=", 1) for o in row["overrides"].split(",") if "=" in o)
    parts = [f"{k}={params[k]}" for k in swept if k in params] or [row["overrides"]]
    text = f"{row['job']}: {','.join(parts)}" if any(parts) else row["job"]
    return text if len(text) <= 60 else text[:57] + "..."


def plot_run(results: dict[str, Any], path: Path) -> None:
    """Draw the train and val loss curves of one run's ``results`` (as in results.json)."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for key, label, style in (
        ("train_loss_history", "train", {"alpha": 0.6, "linewidth": 1}),
        ("val_loss_history", "val", {"marker": "o", "linewidth": 2}),
    ):
        points = results.get(key) or []
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
    best = number(results.get("best_step")), number(results.get("best_val_loss"))
    if None not in best:
        ax.scatter([best[0]], [best[1]], s=120, facecolors="none", edgecolors="red", zorder=3)
        ax.annotate(f"best {best[1]:.4f}", best, textcoords="offset points", xytext=(6, 6))
    ax.set(xlabel="optimizer step", ylabel="loss (responses only)", title=str(path.parent.name))
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend()
    fig.savefig(path, dpi=100)


def label(job: Job, swept: dict[str, list[str]]) -> str:
    """A curve's legend entry: the job's swept overrides (all of them if none are swept)."""
    parts = [f"{k}={job.params[k]}" for k in swept if k in job.params] or job.overrides
    return f"{job.name}: {','.join(parts)}" if parts else job.name


def plot_val_curves(jobs: Sequence[Job], path: Path, swept: dict[str, list[str]]) -> None:
    """Every job's validation curve on one chart; unfinished jobs dashed, as far as logged."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for job in jobs:
        points = job.curves()["val_loss_history"]
        if not points:
            continue
        text = label(job, swept) + ("" if job.finished else f" ({job.status})")
        style = "-" if job.finished else "--"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=text)
    ax.set(xlabel="optimizer step", ylabel="validation loss", title="validation loss")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def plot_param(jobs: Sequence[Job], key: str, path: Path, metric: Metric) -> None:
    """The ranking metric against one swept key: numeric on a number axis, else categorical;
    eval scores with their intervals."""
    points = []
    for job in jobs:
        value = value_of(metric, job.results)
        if job.results and not math.isnan(value):
            found = interval_of(metric, job.results) if metric.is_eval else None
            err = (value - found[1], found[2] - value) if found else (0.0, 0.0)
            points.append((job.params.get(key, ""), value, err))
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    numeric = bool(points) and all(number(v) is not None for v, _, _ in points)
    if numeric:
        xs = [float(v) for v, _, _ in points]
        if max(xs) > 0 and min(xs) > 0 and max(xs) / min(xs) >= 100:  # e.g. learning rates
            ax.set_xscale("log")
    else:
        categories = sorted({v for v, _, _ in points})
        xs = [categories.index(v) for v, _, _ in points]
        ax.set_xticks(range(len(categories)), [c or "(unset)" for c in categories])
        ax.set_xlim(-0.5, len(categories) - 0.5)  # room at the edges for two categories
    errors = [[e[0] for _, _, e in points], [e[1] for _, _, e in points]]
    ax.errorbar(xs, [v for _, v, _ in points], yerr=errors, fmt="o", capsize=4)
    ax.set(xlabel=key, ylabel=metric.name, title=f"{metric.name} by {key}")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") or "param"


def report(folder: str | Path, metric: str = "auto") -> list[Path]:
    """Write report.md, report.csv and the plots into ``folder``; the files written."""
    folder = Path(folder)
    jobs = find_jobs(folder)
    ranked = rank(jobs, metric)
    for warning in ranked.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    written = [folder / "report.md", folder / "report.csv"]
    written[0].write_text(markdown(folder, ranked), encoding="utf-8")
    write_csv(written[1], ranked.rows)
    swept = swept_params(jobs)
    if ranked.metric.is_eval:
        path = folder / f"{safe_name(ranked.metric.name)}.png"
        plot_scores(ranked, path, swept)
        written.append(path)
    if is_run_folder(folder):  # a single run: its own train and val curves
        job = jobs[0]
        plot_run({**(job.results or {}), **job.curves()}, folder / "loss.png")
        return [*written, folder / "loss.png"]
    plot_val_curves(jobs, folder / "val_loss.png", swept)
    written.append(folder / "val_loss.png")
    for key in swept:
        path = folder / f"best_{safe_name(ranked.metric.name)}_by_{safe_name(key)}.png"
        plot_param(jobs, key, path, ranked.metric)
        written.append(path)
    return written
