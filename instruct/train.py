"""The training loop: response-only loss, periodic validation, best-checkpoint keeping.

Everything runs on an Accelerate ``Accelerator``, which owns device placement and mixed
precision. The loss of an optimizer step is the mean over all supervised tokens of its
(accumulated) batch: each micro-batch contributes ``sum of token losses / tokens in the step``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm.auto import tqdm

from instruct.checkpoint import save_checkpoint
from instruct.config import to_container
from instruct.data import load_splits
from instruct.model import apply_lora, build_model, count_parameters, fit_tokenizer
from instruct.optim import build_optimizer, build_scheduler
from instruct.templates import render, to_messages
from instruct.tokenize import IGNORE_INDEX, Feature, PrepareStats, collate, prepare
from instruct.tracking import start_tracking

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised positions, and how many there were."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    picked = logits[:, :-1][mask].float()
    return F.cross_entropy(picked, labels[mask], reduction="sum"), int(mask.sum())


@torch.no_grad()
def evaluate(model: Any, features: Sequence[Feature], batch_size: int, pad_id: int, device) -> float:
    """Mean loss over every supervised token of ``features`` (token-weighted, not per batch)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(features, key=lambda f: len(f.input_ids))  # less padding, same sum
    for i in range(0, len(ordered), batch_size):
        batch = {k: v.to(device) for k, v in collate(ordered[i : i + batch_size], pad_id).items()}
        loss, n = loss_sum(model, batch)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def step_batches(
    n: int, batch_size: int, grad_accum: int, seed: int
) -> Iterator[tuple[int, list[list[int]]]]:
    """Endless ``(epoch, micro-batches of indices)`` per optimizer step, reshuffled per epoch."""
    epoch = 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        for i in range(0, len(batches), grad_accum):
            yield epoch, batches[i : i + grad_accum]
        epoch += 1


def tokenize_split(examples, cfg: DictConfig, tokenizer) -> tuple[list[Feature], PrepareStats]:
    rendered = [render(to_messages(e, cfg.template), cfg.template, tokenizer) for e in examples]
    return prepare(rendered, tokenizer, cfg.trainer.max_length)


def describe(name: str, stats: PrepareStats) -> str:
    text = (
        f"{name}: {stats.kept} examples, {stats.tokens} tokens, "
        f"{stats.supervised_tokens} supervised"
    )
    if stats.truncated or stats.dropped:
        text += (
            f" ({stats.truncated} truncated to trainer.max_length, {stats.dropped} dropped "
            "with no response tokens left)"
        )
    if stats.boundary_merges:
        text += f"; {stats.boundary_merges} tokens merge prompt and reply text"
    return text


def total_steps(cfg: DictConfig, n_train: int) -> int:
    t = cfg.trainer
    if t.max_steps is not None:
        return t.max_steps
    batches = math.ceil(n_train / t.batch_size)
    return t.epochs * math.ceil(batches / t.grad_accum)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; write the best checkpoint and ``results.json`` in ``cfg.run_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if not cfg.run_dir:
        raise ValueError("run_dir: set it (the CLI takes it from Hydra's run folder)")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.trainer
    if t.precision not in PRECISIONS:
        raise ValueError(f"trainer.precision: expected one of {list(PRECISIONS)}, got {t.precision}")
    set_seed(cfg.seed)
    accelerator = Accelerator(mixed_precision=PRECISIONS[t.precision])

    model, tokenizer = build_model(cfg.model)
    new_token_ids = fit_tokenizer(model, tokenizer, cfg.template)
    train_examples, val_examples = load_splits(cfg.data, cfg.seed)
    print(f"data: {len(train_examples)} train / {len(val_examples)} validation examples "
          f"(seed {cfg.seed})")
    train_set, train_stats = tokenize_split(train_examples, cfg, tokenizer)
    val_set, val_stats = tokenize_split(val_examples, cfg, tokenizer)
    print(describe("train", train_stats))
    print(describe("validation", val_stats))
    if not train_set or not val_set:
        raise ValueError("no example left to train or validate on after truncation; "
                         "raise trainer.max_length")

    model = apply_lora(model, cfg.lora, new_token_ids)
    trainable, total = count_parameters(model)
    print(f"parameters: {trainable:,} trainable / {total:,} total "
          f"({100 * trainable / total:.2f}%)")
    steps = total_steps(cfg, len(train_set))
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    device, pad_id = accelerator.device, tokenizer.pad_token_id
    eval_bs = t.eval_batch_size or t.batch_size

    tracker = start_tracking(cfg.logger, run_dir, to_container(cfg))
    results: dict[str, Any] = {}
    try:
        results = _loop(cfg, accelerator, model, tokenizer, optimizer, scheduler, tracker,
                        train_set, val_set, steps, device, pad_id, eval_bs)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    results["data"] = {"train": vars(train_stats), "validation": vars(val_stats)}
    results["trainable_parameters"], results["total_parameters"] = trainable, total
    (run_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    tracker.finish()
    print(f"best val loss {results['best_val_loss']:.4f} at step {results['best_step']}; "
          f"checkpoint {results['checkpoint']}")
    return results


def _loop(cfg, accelerator, model, tokenizer, optimizer, scheduler, tracker,
          train_set, val_set, steps, device, pad_id, eval_bs) -> dict[str, Any]:
    t = cfg.trainer
    run_dir = Path(cfg.run_dir)
    best_dir = run_dir / "checkpoints" / "best"
    max_norm = cfg.optimizer.max_grad_norm
    history: dict[str, list[list[float]]] = {"train": [], "val": []}
    best = {"val_loss": math.inf, "step": -1}

    def validate(step: int) -> float:
        val_loss = evaluate(model, val_set, eval_bs, pad_id, device)
        history["val"].append([step, val_loss])
        tracker.log({"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50))}, step)
        if math.isfinite(val_loss) and val_loss < best["val_loss"]:
            best.update(val_loss=val_loss, step=step)
            if t.save_best:
                state = {"step": step, "val_loss": val_loss}
                save_checkpoint(best_dir, accelerator.unwrap_model(model), tokenizer, cfg, state)
        return val_loss

    initial_val = validate(0)
    supervised_total = 0
    schedule = step_batches(len(train_set), t.batch_size, t.grad_accum, cfg.seed)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        step_start = time.perf_counter()
        epoch, micro_batches = next(schedule)
        features = [[train_set[i] for i in mb] for mb in micro_batches]
        n_sup = sum(f.supervised for mb in features for f in mb)
        n_tok = sum(len(f.input_ids) for mb in features for f in mb)
        step_loss = 0.0
        for k, mb in enumerate(features):
            batch = {key: v.to(device) for key, v in collate(mb, pad_id).items()}
            last = k == len(features) - 1
            with nullcontext() if last else accelerator.no_sync(model):
                loss, _ = loss_sum(model, batch)
                accelerator.backward(loss / n_sup)
            step_loss += loss.item()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = step_loss / n_sup
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"step {step}: training loss is {train_loss}; the best checkpoint so far "
                f"(step {best['step']}) is kept in {best_dir}. Lower optimizer.lr?"
            )
        supervised_total += n_sup
        seconds = time.perf_counter() - step_start
        history["train"].append([step, train_loss])
        if step % t.log_every == 0 or step == steps:
            tracker.log({
                "train/loss": train_loss,
                "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": float(grad_norm),
                "train/epoch": epoch,
                "train/tokens_per_s": n_tok / seconds,
                "train/supervised_tokens_per_s": n_sup / seconds,
            }, step)
        if step % t.eval_every == 0 or step == steps:
            validate(step)
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{history['val'][-1][1]:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - start
    summary = {"best_val_loss": best["val_loss"], "best_step": best["step"]}
    tracker.summary(summary)
    return {
        **summary,
        "initial_val_loss": initial_val,
        "final_val_loss": history["val"][-1][1],
        "final_train_loss": history["train"][-1][1] if history["train"] else None,
        "train_loss_history": history["train"],
        "val_loss_history": history["val"],
        "supervised_tokens": supervised_total,
        "steps": steps,
        "train_seconds": train_seconds,
        "checkpoint": str(best_dir) if t.save_best else None,
    }
