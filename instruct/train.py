"""The training loop: response-only loss, periodic validation, best-checkpoint keeping.

Everything runs on an Accelerate ``Accelerator``, which owns device placement and mixed
precision. The loss of an optimizer step is the mean over all supervised tokens of its
(accumulated) batch: each micro-batch contributes ``sum of token losses / tokens in the step``.

Speed comes from doing only the work that changes the result: a micro-batch is one packed row
(no padding; attention per example), and the output layer runs only at supervised positions.
Each of these is switchable and leaves the loss unchanged to float precision.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from instruct.checkpoint import save_checkpoint
from instruct.config import check, to_container
from instruct.data import Example, load_splits, prompt_and_reference, provenance
from instruct.generate import generate
from instruct.loss import hidden_or_logits, loss_sum
from instruct.model import (
    apply_lora,
    build_model,
    cache_root,
    cast_frozen,
    count_parameters,
    fit_tokenizer,
    use_packed_attention,
)
from instruct.optim import build_optimizer, build_scheduler
from instruct.templates import plain_template, render_many, to_messages
from instruct.tokenize import Feature, PrepareStats, batch, collate, prepare_cached
from instruct.tracking import Tracker, start_tracking

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: Any,
    features: Sequence[Feature],
    batch_size: int,
    pad_id: int,
    device: Any,
    packed: bool = False,
    autocast: Any = nullcontext,
    fused: bool = True,
) -> float:
    """Mean loss over every supervised token of ``features`` (token-weighted, not per batch)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(features, key=lambda f: len(f.input_ids))  # less padding, same sum
    for i in range(0, len(ordered), batch_size):
        inputs = to_device(batch(ordered[i : i + batch_size], pad_id, packed), device)
        with autocast():
            loss, n = loss_sum(model, inputs, fused)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def packing_error(
    model: Any, features: Sequence[Feature], pad_id: int, device: Any, length: int = 24
) -> float:
    """Largest difference between a packed row and the same examples padded, in fp32,
    relative to the largest output (or 1).

    A model whose attention ignored the example boundaries would let the second example see
    the first; that shows here as a large difference, so packing is never trusted blindly.
    """
    short = [Feature(f.input_ids[:length], f.labels[:length]) for f in features[:3]]
    was_training = model.training
    model.eval()
    try:
        padded, _ = hidden_or_logits(model, to_device(collate(short, pad_id), device))
        packed, _ = hidden_or_logits(model, to_device(batch(short, pad_id, True), device))
    finally:
        model.train(was_training)
    start, worst, scale = 0, 0.0, 1.0
    for row, f in enumerate(short):
        n = len(f.input_ids)
        expected = padded[row, :n].float()
        diff = (expected - packed[0, start : start + n].float()).abs().max()
        worst, start = max(worst, float(diff)), start + n
        scale = max(scale, float(expected.abs().max()))
    return worst / scale


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
    template = plain_template(cfg.template)
    conversations = [to_messages(e, template) for e in examples]
    rendered = render_many(conversations, template, tokenizer)
    cache = cache_root() / "tokenized" if cfg.trainer.tokenized_cache else None
    return prepare_cached(rendered, tokenizer, cfg.trainer.max_length, cache)


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
    run = setup(cfg)
    try:
        results = run.loop()
    except BaseException:
        run.tracker.finish(exit_code=1)
        raise
    (run.run_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    run.tracker.finish()
    log.info(
        "best val loss %.4f at step %d (initial %.4f); checkpoint %s",
        results["best_val_loss"],
        results["best_step"],
        results["initial_val_loss"],
        results["checkpoint"],
    )
    return results


def new_accelerator(mixed_precision: str) -> Any:
    """An Accelerator for this run, even when an earlier run in the process chose another
    precision (Hydra multirun jobs and Optuna trials share one process). Accelerate keeps its
    state process-wide and refuses a change; the distributed part (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision)


def setup(cfg: DictConfig) -> Run:
    """Build everything a run needs, in data-flow order; nothing trains yet."""
    from accelerate.utils import set_seed

    if not cfg.run_dir:
        raise ValueError("run_dir: set it (the CLI takes it from Hydra's run folder)")
    check(cfg)
    t = cfg.trainer
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    accelerator = new_accelerator(PRECISIONS[t.precision])

    model, tokenizer = build_model(cfg.model)
    new_token_ids = fit_tokenizer(model, tokenizer, cfg.template)
    attention = use_packed_attention(model) if t.packing else None
    train_examples, val_examples = load_splits(cfg.data, cfg.seed)
    log.info(
        "data: %d train / %d validation examples (seed %d)",
        len(train_examples),
        len(val_examples),
        cfg.seed,
    )
    train_set, train_stats = tokenize_split(train_examples, cfg, tokenizer)
    val_set, val_stats = tokenize_split(val_examples, cfg, tokenizer)
    log.info(describe("train", train_stats))
    log.info(describe("validation", val_stats))
    if not train_set or not val_set:
        raise ValueError(
            "no example left to train or validate on after truncation; raise trainer.max_length"
        )

    model = apply_lora(model, cfg.lora, new_token_ids)
    trainable, total = count_parameters(model)
    log.info(
        "parameters: %s trainable / %s total (%.2f%%)",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    steps = total_steps(cfg, len(train_set))
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    packed = t.packing and trust_packing(
        accelerator.unwrap_model(model), train_set, tokenizer.pad_token_id, accelerator.device,
        attention,
    )  # fmt: skip
    if t.precision == "bf16":  # after the fp32 packing check; autocast reads them in bf16 anyway
        cast_frozen(accelerator.unwrap_model(model), torch.bfloat16)
    tracker = start_tracking(cfg.logger, Path(cfg.run_dir), to_container(cfg))
    info = {
        "data": {
            "train": vars(train_stats),
            "validation": vars(val_stats),
            "provenance": provenance(cfg.data),
        },
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
    tracker.summary(info)
    samples = [prompt_and_reference(e) for e in val_examples[: t.samples]]
    return Run(cfg, accelerator, model, tokenizer, optimizer, scheduler, tracker,
               train_set, val_set, steps, info, samples, packed)  # fmt: skip


def trust_packing(model: Any, features: list[Feature], pad_id: int, device: Any, attention) -> bool:
    """Whether packed rows give this model the same outputs as padded batches."""
    error = packing_error(model, features, pad_id, device)
    if error <= 1e-3:
        log.info("packing on (attention: %s; packed vs padded differ by %.1e)", attention, error)
        return True
    log.warning(
        "trainer.packing: packed rows differ from padded batches by %.3g on this model "
        "(attention %s), so examples would see each other; training with padding instead",
        error,
        attention,
    )
    return False


@dataclass
class Run:
    """One training run's live objects and the state of its loop."""

    cfg: DictConfig
    accelerator: Any
    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tracker: Tracker
    train_set: list[Feature]
    val_set: list[Feature]
    steps: int
    info: dict[str, Any]
    samples: list[tuple[Example, str]]  # validation prompts shown with replies at each eval
    packed: bool = False  # micro-batches as packed rows (see instruct.tokenize.pack)
    eval_seconds: float = 0.0  # validation, samples and checkpoints: not training time
    history: dict[str, list[list[float]]] = field(default_factory=lambda: {"train": [], "val": []})
    best_val_loss: float = math.inf
    best_step: int = -1

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def best_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "best"

    def validate(self, step: int) -> float:
        """Val loss now; a new best replaces ``checkpoints/best``. NaN never becomes best."""
        t = self.cfg.trainer
        start = time.perf_counter()
        val_loss = evaluate(
            self.model,
            self.val_set,
            t.eval_batch_size or t.batch_size,
            self.tokenizer.pad_token_id,
            self.accelerator.device,
            self.packed,
            self.accelerator.autocast,
            t.fused_loss,
        )
        self.history["val"].append([step, val_loss])
        self.tracker.log(
            {"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50))}, step
        )
        if self.samples:
            self.log_samples(step)
        if math.isfinite(val_loss) and val_loss < self.best_val_loss:
            self.best_val_loss, self.best_step = val_loss, step
            if t.save_best:
                model = self.accelerator.unwrap_model(self.model)
                state = {"step": step, "val_loss": val_loss}
                save_checkpoint(self.best_dir, model, self.tokenizer, self.cfg, state)
        self.eval_seconds += time.perf_counter() - start
        return val_loss

    def log_samples(self, step: int) -> None:
        """Greedy replies to a few validation prompts, as a table (W&B and samples.jsonl)."""
        template = self.cfg.template
        greedy = SimpleNamespace(
            max_new_tokens=self.cfg.trainer.sample_max_new_tokens,
            do_sample=False,
            repetition_penalty=1.0,
        )
        prompts = [to_messages(example, template) for example, _ in self.samples]
        model = self.accelerator.unwrap_model(self.model)
        with self.accelerator.autocast():
            replies = generate(model, self.tokenizer, template, prompts, greedy)
        rows = [
            [step, prompt[-1]["content"], reference, reply]
            for prompt, (_, reference), reply in zip(prompts, self.samples, replies, strict=True)
        ]
        self.tracker.table("samples", ["step", "prompt", "reference", "response"], rows, step)

    def step(self, micro_batches: list[list[Feature]]) -> tuple[float, int, float]:
        """One optimizer step over ``micro_batches``: (mean token loss, supervised, grad norm).

        Each micro-batch's summed loss is divided by the supervised tokens of the whole step,
        so the gradient is that of the mean over all of them, however the step is split.
        """
        n_sup = sum(f.supervised for mb in micro_batches for f in mb)
        pad_id, device = self.tokenizer.pad_token_id, self.accelerator.device
        total = 0.0
        for k, mb in enumerate(micro_batches):
            inputs = to_device(batch(mb, pad_id, self.packed), device)
            last = k == len(micro_batches) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                with self.accelerator.autocast():
                    loss, _ = loss_sum(self.model, inputs, self.cfg.trainer.fused_loss)
                self.accelerator.backward(loss / n_sup)
            total += loss.item()
        max_norm = self.cfg.optimizer.max_grad_norm or math.inf
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / n_sup, n_sup, float(grad_norm)

    def loop(self) -> dict[str, Any]:
        t = self.cfg.trainer
        initial_val = self.validate(0)
        initial_eval_seconds = self.eval_seconds
        supervised_total = 0
        schedule = step_batches(len(self.train_set), t.batch_size, t.grad_accum, self.cfg.seed)
        self.model.train()
        start = time.perf_counter()
        recent: deque[float] = deque(maxlen=10)  # the bar shows the running mean of these
        bar = tqdm(range(1, self.steps + 1), desc="train", unit="step", dynamic_ncols=True)
        for step in bar:
            step_start = time.perf_counter()
            epoch, indices = next(schedule)
            micro_batches = [[self.train_set[i] for i in mb] for mb in indices]
            train_loss, n_sup, grad_norm = self.step(micro_batches)
            if not math.isfinite(train_loss):
                raise FloatingPointError(
                    f"step {step}: training loss is {train_loss}; the best checkpoint so far "
                    f"(step {self.best_step}) is kept in {self.best_dir}. Lower optimizer.lr?"
                )
            seconds = time.perf_counter() - step_start
            n_tok = sum(len(f.input_ids) for mb in micro_batches for f in mb)
            supervised_total += n_sup
            self.history["train"].append([step, train_loss])
            recent.append(train_loss)
            if step % t.log_every == 0 or step == self.steps:
                self.tracker.log(
                    {
                        "train/loss": train_loss,
                        "train/lr": self.scheduler.get_last_lr()[0],
                        "train/grad_norm": grad_norm,
                        "train/epoch": epoch,
                        "train/tokens_per_s": n_tok / seconds,
                        "train/supervised_tokens_per_s": n_sup / seconds,
                    },
                    step,
                )
            if step % t.eval_every == 0 or step == self.steps:
                self.validate(step)
            bar.set_postfix(
                loss=f"{sum(recent) / len(recent):.3f}", val=f"{self.history['val'][-1][1]:.3f}"
            )
        bar.close()
        eval_seconds = self.eval_seconds - initial_eval_seconds
        train_seconds = time.perf_counter() - start - eval_seconds
        summary = {"best_val_loss": self.best_val_loss, "best_step": self.best_step}
        self.tracker.summary(summary)
        return {
            **summary,
            "initial_val_loss": initial_val,
            "final_val_loss": self.history["val"][-1][1],
            "final_train_loss": self.history["train"][-1][1] if self.history["train"] else None,
            "train_loss_history": self.history["train"],
            "val_loss_history": self.history["val"],
            "supervised_tokens": supervised_total,
            "steps": self.steps,
            "train_seconds": train_seconds,  # optimizer steps only
            "eval_seconds": self.eval_seconds,  # validations, samples and best checkpoints
            "packing": self.packed,
            "checkpoint": str(self.best_dir) if t.save_best else None,
            **self.info,
        }
