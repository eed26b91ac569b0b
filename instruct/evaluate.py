"""``python -m instruct.evaluate checkpoint=<dir> [eval=full]``: the run's yardstick on any
checkpoint.

The same ``eval`` config group and the same function as the end of a training run
(:func:`instruct.eval.runner.evaluate_model`), so a run evaluated with ``eval=quick`` and this
command with ``eval=quick`` give the same numbers. Beside the suites, the validation loss of
the tuned and the base model on the run's validation split. Written to the output folder:
``summary.json`` (every figure with its interval), per-suite files under ``tuned/`` and
``base/`` and ``evaluation.json`` (all of it, with the validation losses); the same go to W&B.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from instruct.config import to_container
from instruct.data import load_splits
from instruct.data.features import tokenize_split
from instruct.decoding import load_for_inference
from instruct.entry import hydra_main
from instruct.eval.runner import (
    LABELS,
    check_eval,
    eval_enabled,
    evaluate_model,
    untuned_model,
    write_json,
)
from instruct.tracking import start_tracking
from instruct.validation import evaluate as val_loss_of

log = logging.getLogger(__name__)


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint``; write the reports and return what was measured."""
    if eval_enabled(cfg.eval):
        check_eval(cfg.eval)  # before the model loads
    if cfg.max_val_examples is not None and cfg.max_val_examples < 0:
        raise ValueError(f"max_val_examples must be null or at least 0, got {cfg.max_val_examples}")
    model, tokenizer, run_cfg = load_for_inference(cfg.checkpoint)
    out = output_dir(cfg)
    summary: dict[str, Any] = {"checkpoint": str(cfg.checkpoint), "skipped": []}
    summary["val_loss"] = validation_losses(cfg, model, tokenizer, run_cfg, summary["skipped"])
    tracker = start_tracker(cfg, run_cfg, out)
    try:
        if eval_enabled(cfg.eval):
            summary["eval"] = evaluate_model(cfg.eval, model, tokenizer, run_cfg, out, tracker)
        else:
            summary["skipped"].append("eval suites: eval=none names no suite")
        losses = {f"eval/{n}/val_loss": v for n, v in summary["val_loss"].items()}
        if losses:
            tracker.log(losses, step=0)
            tracker.summary(losses)
    finally:
        tracker.finish()
    write_json(out / "evaluation.json", summary)
    for reason in summary["skipped"]:
        log.warning("skipped: %s", reason)
    log.info("wrote %s", out)
    return summary


def validation_losses(
    cfg: DictConfig, model: Any, tokenizer: Any, run_cfg: Any, skipped: list[str]
) -> dict[str, float]:
    """Loss on the run's validation replies, tuned and base; an empty split is skipped."""
    if cfg.max_val_examples == 0:
        skipped.append("validation loss: max_val_examples=0")
        return {}
    _, examples = load_splits(run_cfg.data, run_cfg.seed)
    examples = examples[: cfg.max_val_examples] if cfg.max_val_examples else examples
    features, _ = tokenize_split(examples, run_cfg, tokenizer)
    if not features:
        skipped.append(f"validation loss: no validation example left of {len(examples)}")
        return {}
    device = next(model.parameters()).device
    batch = run_cfg.trainer.eval_batch_size or run_cfg.trainer.batch_size
    losses = {"tuned": val_loss_of(model, features, batch, tokenizer.pad_token_id, device)}
    use_base = cfg.eval.base if eval_enabled(cfg.eval) else True
    if use_base:
        with untuned_model(model, run_cfg, tokenizer) as base:
            losses["base"] = val_loss_of(base, features, batch, tokenizer.pad_token_id, device)
    return losses


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.out``, or ``<run dir>/eval-<eval name>``; an earlier one is never overwritten."""
    if cfg.out:
        out = Path(cfg.out)
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"out={out} already exists and is not empty")
    else:
        checkpoint = Path(cfg.checkpoint).resolve()
        root = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
        stem = f"eval-{cfg.eval.name}"
        out, n = root / stem, 1
        while out.exists():
            n += 1
            out = root / f"{stem}-{n}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def start_tracker(cfg: DictConfig, run_cfg: DictConfig, out: Path) -> Any:
    logger = cfg.logger
    logger.group = logger.group or run_cfg.logger.get("group")
    logger.name = logger.name or f"eval-{Path(cfg.checkpoint).resolve().parent.parent.name}"
    config = {"eval": to_container(cfg), "run": to_container(run_cfg)}
    return start_tracking(logger, out, config, job_type="eval")


def lines(summary: dict[str, Any]) -> list[str]:
    """The figures as aligned text lines: value and interval, tuned then base."""
    out = [f"{'validation loss (' + n + ')':40s} {v:.4f}" for n, v in summary["val_loss"].items()]
    evaluation = summary.get("eval") or {}
    for label in LABELS:
        for suite, part in evaluation.get(label, {}).items():
            for key, score in part["scores"].items():
                lo, hi = score["ci"]
                value = score["value"]
                text = "n/a" if math.isnan(value) else f"{value:.4f} [{lo:.4f}, {hi:.4f}]"
                name = f"{suite}/{key} ({label}, {part['prompts']} prompts)"
                out.append(f"{name:40s} {text}")
    return out


@hydra_main("evaluate")
def main(cfg: DictConfig) -> None:
    summary = run_evaluation(cfg)
    print("\n".join(lines(summary)))
    for reason in summary["skipped"]:
        print(f"skipped: {reason}")


if __name__ == "__main__":
    main()
