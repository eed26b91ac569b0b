"""``python -m instruct.evaluate checkpoint=<dir>``: the base model against the tuned one.

Both answer the same held-out prompts with the same template: the run's validation split and
a shipped list of test instructions whose constraints a program can verify (IFEval style,
:mod:`instruct.checks`). Written to the output folder: ``eval.jsonl`` (one row per prompt),
``eval.md`` and ``eval.html`` (side-by-side tables) and ``metrics.json``; the same go to W&B.
"""

from __future__ import annotations

import html
import json
import logging
import math
from contextlib import contextmanager, nullcontext
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from instruct.checks import pass_rate, run_checks, validate_checks
from instruct.config import CONFIG_MODULE, HYDRA_VERSION_BASE, register_schemas, to_container
from instruct.data import Example, load_splits, prompt_and_reference, read_records
from instruct.generate import generate, load_for_inference
from instruct.templates import Message, to_messages
from instruct.tracking import start_tracking
from instruct.train import evaluate as val_loss_of
from instruct.train import tokenize_split

log = logging.getLogger(__name__)

MODELS = ("base", "tuned")


def test_instructions_path() -> Path:
    return Path(str(resources.files("instruct.data").joinpath("test_instructions.jsonl")))


def load_test_instructions(path: str | Path) -> list[dict[str, Any]]:
    """Test prompts with their checks; a malformed record names its file and line."""
    items = []
    for where, record in read_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise ValueError(f"{where}: expected an object with a string 'instruction'")
        checks = record.get("checks", [])
        validate_checks(checks, where)
        items.append(
            {
                "source": "test",
                "id": record.get("id", where),
                "domain": record.get("domain"),
                "example": {"instruction": record["instruction"], "input": record.get("input", "")},
                "reference": record.get("reference"),
                "checks": checks,
            }
        )
    return items


def validation_items(examples: list[Example]) -> list[dict[str, Any]]:
    """Validation examples as prompts; each one's last reply is the reference."""
    items = []
    for i, e in enumerate(examples):
        example, reference = prompt_and_reference(e)
        items.append(
            {
                "source": "validation",
                "id": e.get("id", f"val-{i}"),
                "domain": e.get("domain"),
                "example": example,
                "reference": reference,
                "checks": [],
            }
        )
    return items


def prompt_of(item: dict[str, Any], template: Any) -> list[Message]:
    return to_messages(item["example"], template)


def last_user_text(messages: list[Message]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


@contextmanager
def base_model_of(model: Any, run_cfg: DictConfig, tokenizer: Any):
    """The model before tuning: LoRA adapters switched off, or the base weights rebuilt."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
        return
    from instruct.model import build_model

    base, _ = build_model(run_cfg.model)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    yield base.to(next(model.parameters()).device).eval()


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint``; write the reports and return the metrics."""
    model, tokenizer, run_cfg = load_for_inference(cfg.checkpoint)
    template = run_cfg.template
    out = output_dir(cfg)
    _, val_examples = load_splits(run_cfg.data, run_cfg.seed)
    if cfg.max_val_examples is not None:
        val_examples = val_examples[: cfg.max_val_examples]
    items = validation_items(val_examples)
    items += load_test_instructions(cfg.test_file or test_instructions_path())
    prompts = [prompt_of(item, template) for item in items]
    val_set, _ = tokenize_split(val_examples, run_cfg, tokenizer)
    device = next(model.parameters()).device

    metrics: dict[str, dict[str, float]] = {}
    responses: dict[str, list[str]] = {}
    for name in MODELS if cfg.compare_base else ("tuned",):
        context = base_model_of(model, run_cfg, tokenizer) if name == "base" else nullcontext(model)
        with context as m:
            log.info("%s model: validation loss and %d replies", name, len(prompts))
            loss = val_loss_of(m, val_set, cfg.batch_size, tokenizer.pad_token_id, device)
            responses[name] = generate(
                m, tokenizer, template, prompts, cfg.sampling, batch_size=cfg.batch_size
            )
        checked = [
            run_checks(r, item["checks"]) for r, item in zip(responses[name], items, strict=True)
        ]
        for item, result in zip(items, checked, strict=True):
            item.setdefault("check_results", {})[name] = result
        rates = pass_rate([c for c, item in zip(checked, items, strict=True) if item["checks"]])
        metrics[name] = {
            "val_loss": loss,
            "val_perplexity": math.exp(min(loss, 50)),
            "checks_prompt_level": rates["prompt_level"],
            "checks_check_level": rates["check_level"],
        }
    rows = [
        {
            "source": item["source"],
            "id": item["id"],
            "domain": item["domain"],
            "instruction": last_user_text(prompt),
            "input": item["example"].get("input", ""),
            "reference": item["reference"],
            **{f"{n}_response" if n == "base" else "response": responses[n][i] for n in responses},
            "checks": item["checks"],
            "check_results": item["check_results"],
        }
        for i, (item, prompt) in enumerate(zip(items, prompts, strict=True))
    ]
    summary = {
        "checkpoint": str(cfg.checkpoint),
        "prompts": len(rows),
        "validation_prompts": len(val_examples),
        "test_prompts": sum(1 for r in rows if r["source"] == "test"),
        **metrics,
    }
    write_reports(out, rows, summary)
    log_to_wandb(cfg, run_cfg, out, rows, summary)
    log.info("wrote %s", out)
    return summary


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.out``, or ``<run dir>/eval``; an earlier evaluation is never overwritten."""
    if cfg.out:
        out = Path(cfg.out)
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"out={out} already exists and is not empty")
    else:
        checkpoint = Path(cfg.checkpoint).resolve()
        root = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
        out, n = root / "eval", 1
        while out.exists():
            n += 1
            out = root / f"eval-{n}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, list[str]]]:
    names = [n for n in MODELS if n in summary]
    labels = {
        "val_loss": "validation loss (responses)",
        "val_perplexity": "validation perplexity",
        "checks_prompt_level": "checks passed, prompt level",
        "checks_check_level": "checks passed, check level",
    }
    return [(label, [_fmt(summary[n][key]) for n in names]) for key, label in labels.items()]


def _check_cell(row: dict[str, Any], name: str) -> str:
    results = row["check_results"].get(name, [])
    return f"{sum(r['passed'] for r in results)}/{len(results)}" if results else ""


def write_reports(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    names = [n for n in MODELS if n in summary]
    with open(out / "eval.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")

    def md(text: Any) -> str:
        return html.escape(str(text or "")).replace("|", "\\|").replace("\n", "<br>")

    lines = [
        f"# Evaluation of `{summary['checkpoint']}`",
        "",
        f"{summary['validation_prompts']} validation prompts, "
        f"{summary['test_prompts']} test instructions with checks, greedy decoding.",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    lines += [
        f"| {label} | " + " | ".join(values) + " |" for label, values in summary_rows(summary)
    ]
    responses = [("base_response" if n == "base" else "response", n) for n in names]
    lines += [
        "",
        "| # | source | instruction | "
        + " | ".join(n for _, n in responses)
        + " | reference | checks "
        + " / ".join(names)
        + " |",
        "|---" * (len(responses) + 5) + "|",
    ]
    for i, row in enumerate(rows, 1):
        instruction = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        cells = [
            str(i),
            row["source"],
            md(instruction),
            *(md(row[k]) for k, _ in responses),
            md(row["reference"]),
            " / ".join(_check_cell(row, n) for n in names),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "eval.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def h(text: Any) -> str:
        return html.escape(str(text or ""))

    head = "".join(f"<th>{n}</th>" for n in names)
    metric_rows = "".join(
        f"<tr><td>{h(label)}</td>" + "".join(f"<td>{v}</td>" for v in values) + "</tr>"
        for label, values in summary_rows(summary)
    )
    body = "".join(
        f"<tr><td>{i}</td><td>{h(row['source'])}</td><td>{h(row['instruction'])}"
        + (f"<br><br><i>{h(row['input'])}</i>" if row["input"] else "")
        + "</td>"
        + "".join(f"<td>{h(row[k])}</td>" for k, _ in responses)
        + f"<td>{h(row['reference'])}</td>"
        + f"<td>{' / '.join(_check_cell(row, n) for n in names)}</td></tr>"
        for i, row in enumerate(rows, 1)
    )
    (out / "eval.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>instruct evaluation</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;white-space:pre-wrap}"
        "</style>"
        f"<h1>Evaluation of {h(summary['checkpoint'])}</h1>"
        f"<table><tr><th>metric</th>{head}</tr>{metric_rows}</table><h2>Replies</h2>"
        "<table><tr><th>#</th><th>source</th><th>instruction</th>"
        + "".join(f"<th>{n}</th>" for _, n in responses)
        + f"<th>reference</th><th>checks {' / '.join(names)}</th></tr>{body}</table>",
        encoding="utf-8",
    )


def log_to_wandb(cfg: DictConfig, run_cfg: DictConfig, out: Path, rows, summary) -> None:
    logger = cfg.logger
    logger.group = logger.group or run_cfg.logger.get("group")
    logger.name = logger.name or f"eval-{Path(cfg.checkpoint).resolve().parent.parent.name}"
    tracker = start_tracking(
        logger, out, {"eval": to_container(cfg), "run": to_container(run_cfg)}, job_type="eval"
    )
    flat = {f"eval/{n}/{k}": v for n in MODELS if n in summary for k, v in summary[n].items()}
    tracker.log(flat, step=0)
    columns = ["source", "id", "instruction", "base_response", "response", "reference"]
    tracker.table(
        "eval/samples", columns, [[r.get(c) or "" for c in columns] for r in rows], step=0
    )
    tracker.summary(flat)
    tracker.finish()


@hydra.main(
    config_path=f"pkg://{CONFIG_MODULE}", config_name="evaluate", version_base=HYDRA_VERSION_BASE
)
def main(cfg: DictConfig) -> None:
    summary = run_evaluation(cfg)
    for label, values in summary_rows(summary):
        print(f"{label:32s} " + "  ".join(f"{v:>10s}" for v in values))


if __name__ == "__main__":
    register_schemas()
    main()
