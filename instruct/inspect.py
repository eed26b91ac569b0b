"""``python -m instruct.inspect [the run's overrides]``: look at the data before training.

Writes ``inspect.html`` into the run folder: the examples as training sees them, token by
token (trained tokens highlighted, control tokens marked, the truncation point), the
masking report, length histograms against ``trainer.max_length``, per-source counts of a
mixture, and for a Self-Instruct data set each task's filter verdicts and nearest ROUGE-L
neighbour. A person accepts or rejects examples in the page and saves a reviewed file;
``data.exclude_ids=<that file>`` then leaves the rejected ones out of training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig

from instruct.data import load_splits
from instruct.data.features import describe, tokenize_by_source
from instruct.data.inspection import example_views
from instruct.data.review import all_ids
from instruct.entry import hydra_main
from instruct.inspect_page import (
    SplitReport,
    histograms,
    masking_report,
    rejected_table,
    render_page,
    source_counts,
)
from instruct.model import base_model_of, fit_tokenizer

log = logging.getLogger(__name__)

PAGE = "inspect.html"


def run_tokenizer(cfg: Any) -> Any:
    """The run's tokenizer, fitted to its template as training fits it (tokens added)."""
    model, tokenizer = base_model_of(cfg.model)
    fit_tokenizer(model, tokenizer, cfg.template)
    return tokenizer


def chosen_splits(cfg: Any) -> dict[str, list[dict[str, Any]]]:
    """The run's splits (``data.exclude_ids`` applied) that ``inspect.split`` names."""
    train, val = load_splits(cfg.data, cfg.seed)
    splits = {"train": train, "validation": val}
    wanted = str(cfg.inspect.split)
    return splits if wanted == "all" else {wanted: splits[wanted]}


def split_report(
    name: str, examples: list[dict[str, Any]], cfg: Any, tokenizer: Any, shown: int | None
) -> tuple[SplitReport, list[dict[str, Any]]]:
    """One split: the trainer's counts (:func:`tokenize_by_source`) and the page's views."""
    _, stats, per_source = tokenize_by_source(examples, cfg, tokenizer)
    views, lengths = example_views(examples, name, cfg, tokenizer, shown)
    where = [str(e.get("where") or f"{name}[{i}]") for i, e in enumerate(examples)]
    report = SplitReport(
        name, stats, lengths, where, all_ids(examples), per_source, describe(name, stats)
    )
    return report, views


def self_instruct_parts(cfg: Any) -> tuple[dict[str, Any], str]:
    """A Self-Instruct data set's per-task checks and its rejection counts; else nothing."""
    if cfg.data.source != "self_instruct":
        return {}, ""
    from instruct.self_instruct.provenance import rejected_counts, task_provenance

    return task_provenance(cfg.data), rejected_table(rejected_counts(cfg.data))


def page_of(cfg: Any, tokenizer: Any) -> str:
    """The whole page for the run config ``cfg``."""
    splits = chosen_splits(cfg)
    left = cfg.inspect.examples
    reports, views = [], []
    for name, examples in splits.items():
        report, shown = split_report(name, examples, cfg, tokenizer, left)
        reports.append(report)
        views += shown
        left = None if left is None else max(left - len(shown), 0)
    max_length = cfg.trainer.max_length
    provenance, rejected = self_instruct_parts(cfg)
    labels = {name: [e.get("source") for e in examples] for name, examples in splits.items()}
    summary = (
        f"<h2>Masking report</h2>{masking_report(reports, max_length)}"
        f"<h2>Token lengths</h2>{histograms(reports, max_length)}"
        f"{source_counts(reports, labels)}{rejected}"
    )
    title = f"{cfg.data.source} data, template {cfg.template.name}, model {cfg.model.name}"
    data = {
        "title": title,
        "max_length": max_length,
        "examples": views,
        "self_instruct": provenance,
    }
    return render_page(title, summary, data)


def inspect(cfg: Any) -> Path:
    """Write the page for the run config ``cfg`` (``inspect.out``, else the run folder's
    ``inspect.html``); return its path."""
    out = Path(cfg.inspect.out) if cfg.inspect.out else Path(cfg.run_dir) / PAGE
    tokenizer = run_tokenizer(cfg)
    page = page_of(cfg, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    log.info("wrote %s (%.1f MB)", out, len(page.encode("utf-8")) / 1e6)
    return out


@hydra_main("inspect")
def main(cfg: Any) -> None:
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    out = inspect(cfg)
    print(f"wrote {out.resolve()}")


if __name__ == "__main__":
    main()
