"""The training loop: response-only loss, periodic validation, best-checkpoint keeping.

Everything runs on an Accelerate ``Accelerator``, which owns device placement and mixed
precision. The loss of an optimizer step is the mean over all supervised tokens of its
(accumulated) batch: each micro-batch contributes ``sum of token losses / tokens in the step``.
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
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm.auto import tqdm

from instruct.checkpoint import save_checkpoint
from instruct.config import check, to_container
from instruct.data import Example, load_splits, prompt_and_reference, provenance
from instruct.generate import generate
from instruct.model import apply_lora, build_model, count_parameters, fit_tokenizer
from instruct.optim import build_optimizer, build_scheduler
from instruct.templates import render_many, to_messages
from instruct.tokenize import IGNORE_INDEX, Feature, PrepareStats, collate, prepare
from instruct.tracking import Tracker, start_tracking

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The decoder stack and output layer of a causal LM, when calling them apart is exact.

    Not for models whose forward changes the logits after the output layer (Gemma's
    soft-capping, Cohere's logit scale), nor for a wrapper such as DDP whose own forward must
    run for gradients to synchronise; those take the full forward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None):
        return None
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if get_decoder else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised positions, and how many there were.

    The output layer runs only where a label is supervised: with a 49k vocabulary the full
    logits of a batch take gigabytes, and prompt positions would be computed to be dropped.
    """
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    parts = decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        picked = logits.logits[:, :-1][mask]
    else:
        decoder, head = parts
        hidden = decoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        picked = head(hidden[:, :-1][mask])
    return F.cross_entropy(picked.float(), labels[mask], reduction="sum"), int(mask.sum())


@torch.no_grad()
def evaluate(
    model: Any, features: Sequence[Feature], batch_size: int, pad_id: int, device: Any
) -> float:
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
    conversations = [to_messages(e, cfg.template) for e in examples]
    return prepare(render_many(conversations, cfg.template, tokenizer), tokenizer,
                   cfg.trainer.max_length)  # fmt: skip


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


def setup(cfg: DictConfig) -> Run:
    """Build everything a run needs, in data-flow order; nothing trains yet."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if not cfg.run_dir:
        raise ValueError("run_dir: set it (the CLI takes it from Hydra's run folder)")
    check(cfg)
    t = cfg.trainer
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    accelerator = Accelerator(mixed_precision=PRECISIONS[t.precision])

    model, tokenizer = build_model(cfg.model)
    new_token_ids = fit_tokenizer(model, tokenizer, cfg.template)
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
               train_set, val_set, steps, info, samples)  # fmt: skip


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
        val_loss = evaluate(
            self.model,
            self.val_set,
            t.eval_batch_size or t.batch_size,
            self.tokenizer.pad_token_id,
            self.accelerator.device,
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
            batch = {key: v.to(device) for key, v in collate(mb, pad_id).items()}
            last = k == len(micro_batches) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                loss, _ = loss_sum(self.model, batch)
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
        train_seconds = time.perf_counter() - start
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
            "train_seconds": train_seconds,
            "checkpoint": str(self.best_dir) if t.save_best else None,
            **self.info,
        }
