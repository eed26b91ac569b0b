"""The training loop: response-only loss, periodic validation, best-checkpoint keeping.

Everything runs on an Accelerate ``Accelerator``, which owns device placement and mixed
precision. The loss of an optimizer step is the mean over all supervised tokens of its
(accumulated) batch: each micro-batch contributes ``sum of token losses / tokens in the step``.
With per-turn loss weights (``data.train_on=per_message``) it is the weighted mean:
``sum of weight x token loss / sum of weights in the step``; validation takes the same
weighted mean over the validation split, so both curves measure one objective.

Speed comes from doing only the work that changes the result: a micro-batch is one packed row
(no padding; attention per example), and the output layer runs only at supervised positions.
Each of these is switchable and leaves the loss unchanged to float precision.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from instruct.checkpoint import (
    CONFIG_FILE,
    Checkpoints,
    ConfigWriter,
    check_resumable,
    latest_complete,
    load_state,
    recover,
    set_rng_state,
    write_config,
)
from instruct.config import Precision, check, to_container
from instruct.data import Example, load_splits, provenance
from instruct.data.batching import batch
from instruct.data.features import describe, tokenize_by_source
from instruct.data.tokenize import Feature
from instruct.engine import Engine, LossFn
from instruct.environment import environment
from instruct.eval.runner import check_eval, eval_enabled
from instruct.hardware import choose_precision
from instruct.kernels.memory import keep_freed_memory
from instruct.kernels.packed_attention import trust_packing, use_packed_attention
from instruct.loss import loss_sum
from instruct.model import apply_lora, base_model_of, count_parameters, fit_tokenizer
from instruct.optim import build_optimizer, build_scheduler
from instruct.parallel import strategy_for
from instruct.parallel.base import all_ranks_sum
from instruct.parallel.launch import new_accelerator
from instruct.samples import Samples
from instruct.summary import end_summary, peak_memory
from instruct.timing import Clock
from instruct.tracking import Tracker, start_tracking
from instruct.validation import evaluate, to_device

log = logging.getLogger(__name__)

# Accelerate's mixed_precision of each trainer.precision.
PRECISIONS = {Precision.fp32: "no", Precision.bf16: "bf16", Precision.fp16: "fp16"}


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


def total_steps(cfg: DictConfig, n_train: int, processes: int = 1) -> int:
    """Optimizer steps of the run; each takes batch_size x processes x grad_accum examples."""
    t = cfg.trainer
    if t.max_steps is not None:
        return t.max_steps
    batches = math.ceil(n_train / (t.batch_size * processes))
    return t.epochs * math.ceil(batches / t.grad_accum)


def train(
    cfg: DictConfig,
    command: Sequence[str] | None = None,
    loss_fn: LossFn = loss_sum,
    config_writer: ConfigWriter = write_config,
) -> dict[str, Any]:
    """Train as ``cfg`` says; write the best checkpoint and ``results.json`` in ``cfg.run_dir``.

    ``command`` is how the run was started (for the resume command printed when a signal
    stops it); by default ``python -m instruct.run`` with no overrides. ``loss_fn`` takes the
    training micro-batches' loss (:func:`instruct.loss.loss_sum`, or a test's stand-in);
    ``config_writer`` writes the config beside each checkpoint (or a test's failing one).
    """
    finished = finished_results(cfg)
    if finished is not None:
        if not needs_evaluation(cfg, finished):
            log.info("%s: this run already finished (results.json); nothing to do", cfg.run_dir)
            return finished
        # Trained but not evaluated with this eval config (killed while it evaluated, or
        # continued with another eval): evaluate its best checkpoint now.
        log.info("%s: this run already trained (results.json); evaluating it", cfg.run_dir)
        finished["eval"] = evaluate_best(cfg, finished, tracker=None)
        write_results(Path(cfg.run_dir), finished)
        return finished
    start = time.perf_counter()
    run, run_dir = setup(cfg, loss_fn, config_writer), Path(cfg.run_dir)
    try:
        results = run.loop()
        # What it ran on (versions, commit, machine) and the config it resolved to.
        results["environment"] = environment()
        results["config"] = to_container(cfg)
    except Interrupted as stop:
        run.tracker.finish(exit_code=1)
        if run.engine.main:
            tell_how_to_resume(stop, resume_command(command, run_dir))
        raise SystemExit(128 + stop.signum) from None
    except BaseException:
        run.tracker.finish(exit_code=1)
        raise
    summary = finish_main(cfg, run, results, start) if run.engine.main else None
    run.tracker.finish()
    if summary:
        print(summary, flush=True)  # last, after W&B's own closing lines
    return results


def finish_main(cfg: DictConfig, run: Run, results: dict[str, Any], start: float) -> str:
    """On the main process: the eval suites (when configured), ``results.json`` with the time
    split and peak memory, and the loss plot; the end-of-run summary to print."""
    run_dir, clock = Path(cfg.run_dir), run.state.clock
    if eval_enabled(cfg.eval):
        try:
            with clock.phase("eval"):
                results["eval"] = evaluate_best(cfg, results, run.tracker, run.engine.model,
                                                run.engine.tokenizer)  # fmt: skip
        except BaseException:
            write_results(run_dir, results)  # training's results are not lost
            run.tracker.finish(exit_code=1)
            raise
    results["time_split"] = clock.state()["time_split"]
    results["total_seconds"] = time.perf_counter() - start  # this process's wall time
    results["memory"] = peak_memory()
    write_results(run_dir, results)
    plot = run_dir / "loss.png"
    write_loss_plot(results, plot)
    summary = end_summary(results, str(plot) if plot.is_file() else None, run.tracker.where())
    log.info("best val loss %.4f at step %d (initial %.4f); checkpoint %s",
             results["best_val_loss"], results["best_step"], results["initial_val_loss"],
             results["checkpoint"])  # fmt: skip
    return summary


def tell_how_to_resume(stop: Interrupted, resume: str) -> None:
    """Log where a stopped run's state is, and print the command that resumes it."""
    log.warning(
        "stopped by %s after step %d; its state is saved in %s. Resume with:\n  %s",
        stop.signal_name, stop.step, stop.checkpoint, resume,
    )  # fmt: skip
    print(f"resume with: {resume}", file=sys.stderr, flush=True)


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    """``results.json``, through a temporary file: a kill never leaves half of it."""
    tmp = run_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2), encoding="utf-8")
    os.replace(tmp, run_dir / "results.json")


def needs_evaluation(cfg: DictConfig, results: dict[str, Any]) -> bool:
    """A finished run whose results lack this eval config's suites."""
    done = results.get("eval") or {}
    return eval_enabled(cfg.eval) and done.get("suites") != list(cfg.eval.suites)


def evaluate_best(
    cfg: DictConfig, results: dict[str, Any], tracker: Any, model: Any = None,
    tokenizer: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """The eval suites on the best checkpoint, loaded as ``python -m instruct.evaluate``
    loads it, so both give the same numbers; without a saved checkpoint
    (``trainer.save_best=false``), on the model as training left it."""
    from instruct.decoding import load_for_inference
    from instruct.eval.runner import evaluate_model

    start = time.perf_counter()
    if results.get("checkpoint"):
        model, tokenizer, run_cfg = load_for_inference(results["checkpoint"])
    elif model is not None and tokenizer is not None:
        from accelerate.utils import extract_model_from_parallel

        model, run_cfg = extract_model_from_parallel(model), cfg
    else:
        raise ValueError("eval: the run saved no checkpoint (trainer.save_best=false)")
    log.info("evaluating %s with eval=%s", results.get("checkpoint") or "the final model",
             cfg.eval.name)  # fmt: skip
    summary = evaluate_model(cfg.eval, model, tokenizer, run_cfg, Path(cfg.run_dir) / "eval",
                             tracker, step=int(results.get("steps") or 0))  # fmt: skip
    summary["total_seconds"] = time.perf_counter() - start
    return summary


def write_loss_plot(results: dict[str, Any], path: Path) -> None:
    """``loss.png``: the run's train and validation curves, for a user without W&B. A plot
    that fails costs a warning, never the finished run."""
    from instruct.reporting import plot_run

    try:
        plot_run(results, path)
    except Exception as e:  # noqa: BLE001 - matplotlib's errors are many and none matter here
        log.warning("%s: the loss plot could not be drawn (%s: %s)", path, type(e).__name__, e)


def resume_command(command: Sequence[str] | None, run_dir: Path) -> str:
    """``command`` with the run folder pinned and ``trainer.resume=auto`` (under torchrun
    when this was one of several processes; on several nodes, run it on each as before)."""
    args = list(command) if command else ["python", "-m", "instruct.run"]
    pinned = ("hydra.run.dir=", "trainer.resume=", "run_dir=")
    args = [a for a in args if not a.lstrip("+~").startswith(pinned)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args[:2] == ["python", "-m"]:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
        args = ["torchrun", f"--nproc_per_node={per_node}", *args[1:]]
    return shlex.join([*args, f"hydra.run.dir={run_dir}", "trainer.resume=auto"])


def finished_results(cfg: DictConfig) -> dict[str, Any] | None:
    """With ``trainer.resume=auto``, the results of a run folder that already trained every
    step this config asks for; else None. A folder trained with another config (its last
    checkpoint's) is refused, as a resume would be: its results are not this config's."""
    if cfg.trainer.resume != "auto" or not cfg.run_dir:
        return None
    path = Path(cfg.run_dir) / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    length = {"max_steps": cfg.trainer.max_steps, "epochs": cfg.trainer.epochs}
    if not isinstance(results, dict) or results.get("length") != length:
        return None
    last = latest_complete(Path(cfg.run_dir) / "checkpoints")
    if last is not None:
        check_resume_config(cfg, last)
    return results


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the step in progress finished and a checkpoint was saved."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by signal {signum} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.signal_name = signal.Signals(signum).name


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """While active, SIGINT and SIGTERM only ask the loop to stop after the current step (the
    list they are appended to); a second SIGINT stops at once, as usual."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # signal handlers can only be installed from the main thread
        return

    def ask(signum: int, frame: Any) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
        log.warning(
            "%s: finishing the current step, then saving a resumable checkpoint "
            "(Ctrl-C again to stop at once)",
            signal.Signals(signum).name,
        )

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# Keys a resumed run may change: how long it trains, how often it evaluates, checkpoints and
# logs. Any other change (model, data, template, batch, optimizer, seed, ...) is refused.
RESUMABLE_CHANGES = (
    "run_dir",
    "logger.",
    "trainer.max_steps",
    "trainer.epochs",
    "trainer.eval_every",
    "trainer.eval_batch_size",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.resume",
    "trainer.log_every",
    "trainer.samples",
    "trainer.sample_max_new_tokens",
    "trainer.save_best",
    "trainer.tokenized_cache",
    "trainer.keep_freed_memory",
    "eval.",  # what is measured after training, not how it trains
    "report.",
)


# Keys added after checkpoints were already being saved, with the value that behaves as a
# config without them did: a checkpoint whose config lacks one was trained that way.
ADDED_SINCE = {
    "data.train_on": "all_assistant",
    "data.train_on_prompt": False,
    "data.exclude_ids": None,
}


def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two configs and that a resume may not change."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix.rstrip("."): d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    a, b = {**ADDED_SINCE, **flat(saved)}, {**ADDED_SINCE, **flat(current)}
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    return [k for k in keys if not k.startswith(RESUMABLE_CHANGES)]


def resume_point(cfg: DictConfig) -> Path | None:
    """The checkpoint this run continues (None: a fresh run), after checking it may.

    ``auto`` picks the newest complete ``step-N`` of the run folder. A fresh run refuses a
    run folder that already holds one, so nothing trained there is overwritten.
    """
    t, run_dir = cfg.trainer, Path(cfg.run_dir)
    checkpoints = run_dir / "checkpoints"
    if t.resume is None:
        taken = [p.name for p in (checkpoints, run_dir / "results.json") if p.exists()]
        if taken:
            raise FileExistsError(
                f"{run_dir} already holds a run ({', '.join(taken)}); continue it with "
                "trainer.resume=auto, or choose another hydra.run.dir. Nothing was changed."
            )
        return None
    if t.resume == "auto":
        point = latest_complete(checkpoints)
        if point is None:
            log.info("trainer.resume=auto: no complete checkpoint in %s; starting afresh", run_dir)
        return point
    point = Path(t.resume)
    if (point / "checkpoints").is_dir():  # a run folder: its newest complete checkpoint
        found = latest_complete(point / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"trainer.resume: {point} holds no complete checkpoint")
        point = found
    recover(point)
    return point


def check_resume_config(cfg: DictConfig, point: Path) -> None:
    check_resumable(point)
    saved_path = point / CONFIG_FILE
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False)
    changed = changed_keys(saved, to_container(cfg))  # type: ignore[arg-type]
    if changed:
        raise ValueError(
            f"trainer.resume: the config differs from the checkpoint's ({saved_path}) in "
            f"{', '.join(changed)}; an exact resume needs them unchanged. Set them back, or "
            "start a new run."
        )


def data_fingerprint(*splits: Sequence[Feature]) -> str:
    """sha256 of every token id and label of the splits: what a resume must train on."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update(len(split).to_bytes(8, "little"))
        for f in split:
            digest.update(len(f.input_ids).to_bytes(4, "little"))
            digest.update(f.input_ids.tobytes())
            digest.update(f.labels.tobytes())
            if f.weights is not None:  # only then, so unweighted data keep their fingerprint
                digest.update(f.weights.tobytes())
    return digest.hexdigest()


def prepare_data(
    cfg: DictConfig, tokenizer: Any, accelerator: Any
) -> tuple[list[Feature], list[Feature], dict[str, Any], list[Example]]:
    """The tokenised train and validation splits, their counts for ``results.json`` (per
    mixture source too), and the validation examples (whose prompts are the samples)."""
    t = cfg.trainer
    train_examples, val_examples = load_splits(cfg.data, cfg.seed)
    log.info(
        "data: %d train / %d validation examples (seed %d)",
        len(train_examples),
        len(val_examples),
        cfg.seed,
    )
    with accelerator.local_main_process_first():  # tokenised cache: the others then read it
        train_set, train_stats, train_sources = tokenize_by_source(train_examples, cfg, tokenizer)
        val_set, val_stats, val_sources = tokenize_by_source(val_examples, cfg, tokenizer)
    log.info(describe("train", train_stats))
    log.info(describe("validation", val_stats))
    sources: dict[str, dict[str, Any]] = {}  # a mixture's counts per source (data=mixture)
    for name, per in (("train", train_sources), ("validation", val_sources)):
        for label, stats in per.items():
            log.info(describe(f"{name} [{label}]", stats))
            sources.setdefault(label, {})[name] = vars(stats)
    for name, kept, stats in (
        ("train", train_set, train_stats),
        ("validation", val_set, val_stats),
    ):
        if not kept:
            raise ValueError(
                f"no example left to train or validate on after truncation: all {stats.dropped} "
                f"{name} examples have no response token within trainer.max_length="
                f"{t.max_length}; raise trainer.max_length"
            )
    data_info = {
        "train": vars(train_stats),
        "validation": vars(val_stats),
        "provenance": provenance(cfg.data),
        **({"sources": sources} if sources else {}),
    }
    return train_set, val_set, data_info, val_examples


def resumed_state(point: Path | None, engine: Engine, fingerprint: str) -> dict[str, Any]:
    """The loop state of the checkpoint at ``point``, its weights and optimizer state loaded
    into the engine's; empty for a fresh run."""
    if point is None:
        return {}
    state = load_state(point, engine.unwrapped(), engine.optimizer, engine.scheduler,
                       engine.accelerator.scaler, engine.strategy)  # fmt: skip
    if state["data_fingerprint"] != fingerprint:
        raise ValueError(
            f"trainer.resume: the tokenised data differ from those {point} was trained on "
            "(a data file or the tokenizer changed); an exact resume needs the same data"
        )
    return state


def run_tracker(cfg: DictConfig, accelerator: Any, run_id: str | None, step: int | None) -> Any:
    """W&B and the local metrics on the main process (one writer), continuing run ``run_id``
    from ``step`` on resume; a silent tracker on the others."""
    if not accelerator.is_main_process:
        return Tracker.silent()
    config = {**to_container(cfg), "environment": environment()}
    tracker = start_tracking(cfg.logger, Path(cfg.run_dir), config, run_id=run_id)
    if step is not None:
        tracker.rewind(step)
    return tracker


def checked_start(cfg: DictConfig) -> Path | None:
    """Check the config (and the eval suites, so a bad name fails before training) and find
    the checkpoint to resume from, checked against the config; None for a fresh run."""
    if not cfg.run_dir:
        raise ValueError("run_dir: set it (the CLI takes it from Hydra's run folder)")
    check(cfg)
    if eval_enabled(cfg.eval):
        check_eval(cfg.eval)
    point = resume_point(cfg)
    if point is not None:
        check_resume_config(cfg, point)
    return point


def setup(
    cfg: DictConfig, loss_fn: LossFn = loss_sum, config_writer: ConfigWriter = write_config
) -> Run:
    """Build everything a run needs, in data-flow order; nothing trains yet."""
    from accelerate.utils import set_seed

    t = cfg.trainer
    point = checked_start(cfg)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    if t.keep_freed_memory and keep_freed_memory():
        log.info("trainer.keep_freed_memory: freed memory is reused, not returned to the OS")
    precision = training_precision(t.precision)
    accelerator = new_accelerator(PRECISIONS[precision])
    clock = Clock()  # this session's load and prepare; a resume adds what came before

    with clock.phase("load"), accelerator.local_main_process_first():  # one cache writer
        model, tokenizer = base_model_of(cfg.model)
        new_token_ids = fit_tokenizer(model, tokenizer, cfg.template)
        attention = use_packed_attention(model) if t.packing else None
    with clock.phase("prepare"):
        train_set, val_set, data_info, val_examples = prepare_data(cfg, tokenizer, accelerator)
    with clock.phase("load"):
        model = apply_lora(model, cfg.lora, new_token_ids)
        trainable, total = count_parameters(model)
        log.info("parameters: %s trainable / %s total (%.2f%%)", f"{trainable:,}",
                 f"{total:,}", 100 * trainable / total)  # fmt: skip
        steps = total_steps(cfg, len(train_set), accelerator.num_processes)

        def fits_packing(model: Any, device: Any) -> bool:
            return trust_packing(model, train_set, tokenizer.pad_token_id, device, attention)

        engine, packed, held = prepared(cfg, accelerator, model, tokenizer, steps,
                                        fits_packing, loss_fn)  # fmt: skip
        data = Splits(train_set, val_set, packed)
        state = resumed_state(point, engine, data.fingerprint)
    if state:
        log.info("resuming from %s (step %d of %d)", point, state["step"], steps)
    tracker = run_tracker(cfg, accelerator, state.get("wandb_run_id"), state.get("step"))
    info = {
        "data": data_info,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "world_size": accelerator.num_processes,
        "distributed_type": engine.strategy.name,
        "parameters_on_main_process": held,  # sharded: its shards only
        "precision": precision.value,  # trainer.precision=auto: the one it chose
    }
    tracker.summary(info)
    checkpoints = Checkpoints(Path(cfg.run_dir) / "checkpoints", cfg, t.keep_checkpoints,
                              t.save_best, config_writer)  # fmt: skip
    samples = Samples.of(val_examples, cfg, tracker)
    loop = LoopState.resumed(state, accelerator, clock) if state else LoopState(clock=clock)
    return Run(cfg, engine, data, tracker, checkpoints, samples, steps, info, loop)


def training_precision(requested: Precision) -> Precision:
    """``trainer.precision`` for this machine: ``auto`` resolved, and a warning where bf16 is
    slower than fp32 (see :mod:`instruct.hardware`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and torch.backends.mps.is_available():
        device = "mps"
    chosen, warning = choose_precision(Precision(requested), torch.device(device))
    if warning:
        log.warning(warning)
    return chosen


def prepared(
    cfg: DictConfig,
    accelerator: Any,
    model: Any,
    tokenizer: Any,
    steps: int,
    fits_packing: Callable[[Any, Any], bool],
    loss_fn: LossFn = loss_sum,
) -> tuple[Engine, bool, int]:
    """The model prepared by its backend's strategy, with its optimizer and scheduler; whether
    micro-batches are packed, and the parameters this process holds."""
    strategy = strategy_for(accelerator)  # the one place the backend is asked for

    def build(model: Any) -> tuple[Any, Any]:
        optimizer = build_optimizer(model, cfg.optimizer)
        return optimizer, build_scheduler(optimizer, cfg.optimizer, steps)

    model, optimizer, scheduler, packed, held = strategy.prepare(
        model, cfg.trainer, cfg.optimizer.max_grad_norm, build, fits_packing
    )
    engine = Engine(accelerator, strategy, model, tokenizer, optimizer, scheduler, loss_fn)
    return engine, packed, held


@dataclass
class Splits:
    """The tokenised data a run trains and validates on."""

    train: list[Feature]
    val: list[Feature]
    packed: bool = False  # micro-batches as packed rows (see instruct.data.batching.pack)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Of both splits (see :func:`data_fingerprint`): what a resume must train on."""
        return data_fingerprint(self.train, self.val)


@dataclass
class LoopState:
    """Where the loop is: all of it is saved in each resumable checkpoint."""

    step: int = 0  # optimizer steps done
    clock: Clock = field(default_factory=Clock)
    supervised_total: int = 0
    initial_val_loss: float | None = None
    history: dict[str, list[list[float]]] = field(default_factory=lambda: {"train": [], "val": []})
    best_val_loss: float = math.inf
    best_step: int = -1
    rng: dict[str, Any] | None = None  # RNG states to set before the next step (on resume)

    @classmethod
    def resumed(cls, state: dict[str, Any], accelerator: Any, clock: Clock) -> LoopState:
        """The state a checkpoint saved (see :func:`instruct.checkpoint.load_state`), with this
        process's random states; ``clock`` (this session's so far) goes on from its times."""
        clock.restore(state)
        ranks = state["rng"]
        if len(ranks) != accelerator.num_processes:
            log.warning(
                "the checkpoint was saved by %d processes and this run has %d: random states "
                "(dropout masks) continue from process 0's, so the resume is not exact",
                len(ranks), accelerator.num_processes,
            )  # fmt: skip
        best = state["best_val_loss"]
        return cls(
            step=state["step"],
            clock=clock,
            supervised_total=state["supervised_tokens"],
            initial_val_loss=state["initial_val_loss"],
            history=state["history"],
            best_val_loss=best if best is not None else math.inf,
            best_step=state["best_step"],
            rng=ranks[accelerator.process_index % len(ranks)],
        )


@dataclass
class Run:
    """One training run: what trains, on what data, where the loop is, and what it writes."""

    cfg: DictConfig
    engine: Engine  # model, tokenizer, optimizer and scheduler on their backend
    data: Splits
    tracker: Tracker
    checkpoints: Checkpoints  # best and resumable, under the run folder
    samples: Samples  # validation prompts shown with replies at each validation
    steps: int  # optimizer steps of the whole run
    info: dict[str, Any]  # what results.json reports of the set-up
    state: LoopState = field(default_factory=LoopState)

    def loop(self) -> dict[str, Any]:
        with stop_signals() as stop:
            return self.train_steps(stop)

    def train_steps(self, stop: list[int]) -> dict[str, Any]:
        """Validate, then train from the loop's step to the end. A signal in ``stop`` ends the
        loop after the step in progress, with a checkpoint."""
        t, state, clock = self.cfg.trainer, self.state, self.state.clock
        if state.initial_val_loss is None:  # not on a resume: its history has step 0
            with clock.not_training():
                state.initial_val_loss = self.validate(0)
        if stop:
            with clock.not_training():
                checkpoint = self.save()
            raise Interrupted(stop[0], state.step, checkpoint)
        schedule = self.remaining_batches()
        every = t.checkpoint_every or t.eval_every
        self.engine.model.train()
        recent = deque((loss for _, loss in state.history["train"][-10:]), maxlen=10)
        bar = tqdm(range(state.step + 1, self.steps + 1), desc="train", unit="step",
                   initial=state.step, total=self.steps, dynamic_ncols=True)  # fmt: skip
        for step in bar:
            with clock.training() as elapsed:
                epoch, indices = next(schedule)
                micro_batches = [[self.data.train[i] for i in mb] for mb in indices]
                train_loss, n_sup, grad_norm = self.step_once(micro_batches)
                self.check_finite(step, train_loss)
                seconds = elapsed()
                state.supervised_total += n_sup
                state.history["train"].append([step, train_loss])
                recent.append(train_loss)
                if step % t.log_every == 0 or step == self.steps:
                    n_tok = sum(len(f.input_ids) for mb in micro_batches for f in mb)
                    self.log_step(step, epoch, train_loss, grad_norm, n_tok / seconds,
                                  n_sup / seconds)  # fmt: skip
            if step % t.eval_every == 0 or step == self.steps:
                with clock.not_training():
                    self.validate(step)
            state.step = step
            self.agree_to_stop(stop)
            if step % every == 0 or step == self.steps or stop:
                with clock.not_training():
                    checkpoint = self.save()
                if stop:
                    raise Interrupted(stop[0], step, checkpoint)
            bar.set_postfix(
                loss=f"{sum(recent) / len(recent):.3f}", val=f"{state.history['val'][-1][1]:.3f}"
            )
        bar.close()
        return self.results()

    def step_once(self, micro_batches: list[list[Feature]]) -> tuple[float, int, float]:
        """One optimizer step over ``micro_batches``: (mean token loss, supervised, grad norm).

        The micro-batches are those of every process: each takes every world-size-th example.

        Each micro-batch's summed loss is divided by the supervised tokens of the whole step,
        so the gradient is that of the mean over all of them, however the step is split. With
        loss weights, by the sum of their weights: the weighted mean.
        """
        e = self.engine
        n_sup = sum(f.supervised for mb in micro_batches for f in mb)  # of every process
        denominator: float = n_sup
        if any(f.weights is not None for mb in micro_batches for f in mb):
            denominator = sum(f.supervised_weight for mb in micro_batches for f in mb)
        pad_id, device = e.tokenizer.pad_token_id, e.accelerator.device
        world, rank = e.accelerator.num_processes, e.accelerator.process_index
        total = 0.0
        for k, mb in enumerate(micro_batches):
            mine, weight = mb[rank::world], 1.0
            if not mine:  # fewer examples than processes: run one for nothing, to stay in step
                mine, weight = mb[:1], 0.0
            inputs = to_device(batch(mine, pad_id, self.data.packed), device)
            last = k == len(micro_batches) - 1
            with e.strategy.accumulating(e.model, last):
                with e.accelerator.autocast():
                    loss, _ = e.loss_fn(e.scorer, inputs, self.cfg.trainer.fused_loss)
                # Every multi-process backend averages gradients over processes; times
                # world, they add up.
                scaled = loss * (weight * world / denominator)
                e.strategy.backward(e.model, scaled, last)
            total += loss.item() * weight
        (total,) = all_ranks_sum(e.accelerator, total)
        max_norm = self.cfg.optimizer.max_grad_norm
        grad_norm = e.strategy.optimizer_step(e.model, e.optimizer, max_norm)
        e.scheduler.step()
        return total / denominator, n_sup, grad_norm

    def validate(self, step: int) -> float:
        """Val loss now, and the samples' replies; a new best is kept (``checkpoints/best``).
        NaN never becomes best."""
        e, state, clock = self.engine, self.state, self.state.clock
        with clock.phase("validate"):
            val_loss = self.val_loss()
        state.history["val"].append([step, val_loss])
        self.tracker.log(
            {"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50))}, step
        )
        with clock.phase("samples"):
            self.samples.log(step, e)
        if math.isfinite(val_loss) and val_loss < state.best_val_loss:
            state.best_val_loss, state.best_step = val_loss, step
            with clock.phase("checkpoints"):
                self.checkpoints.write_best(e, {"step": step, "val_loss": val_loss})
        return val_loss

    def val_loss(self) -> float:
        """The mean loss over the validation split's supervised tokens."""
        t, e = self.cfg.trainer, self.engine
        return evaluate(
            e.strategy.evaluated(e.model, e.scorer),
            self.data.val,
            t.eval_batch_size or t.batch_size,
            e.tokenizer.pad_token_id,
            e.accelerator.device,
            self.data.packed,
            e.accelerator.autocast,
            t.fused_loss,
            e.accelerator,
            e.strategy.lockstep,
        )

    def save(self) -> Path:
        """A resumable checkpoint of the state after the loop's step."""
        with self.state.clock.phase("checkpoints"):
            return self.checkpoints.save_resumable(self.state.step, self.engine, self.loop_state())

    def loop_state(self) -> dict[str, Any]:
        """What each resumable checkpoint saves of the loop (see :meth:`LoopState.resumed`)."""
        s = self.state
        best = s.best_val_loss if math.isfinite(s.best_val_loss) else None
        return {
            "step": s.step,
            "steps": self.steps,
            "best_val_loss": best,
            "best_step": s.best_step,
            "best_checkpoint": str(self.checkpoints.best) if s.best_step >= 0 else None,
            "initial_val_loss": s.initial_val_loss,
            "history": s.history,
            "supervised_tokens": s.supervised_total,
            **s.clock.state(),
            "wandb_run_id": self.tracker.run_id,
            "data_fingerprint": self.data.fingerprint,
        }

    def check_finite(self, step: int, train_loss: float) -> None:
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"step {step}: training loss is {train_loss}; the best checkpoint so far "
                f"(step {self.state.best_step}) is kept in {self.checkpoints.best}. "
                "Lower optimizer.lr?"
            )

    def agree_to_stop(self, stop: list[int]) -> None:
        """On several processes, a signal to any stops every one at the same step."""
        accelerator = self.engine.accelerator
        if accelerator.num_processes > 1 and any(all_ranks_sum(accelerator, float(bool(stop)))):
            stop[:] = stop or [signal.SIGTERM]

    def remaining_batches(self) -> Iterator[tuple[int, list[list[int]]]]:
        """The step schedule from the loop's step on; on a resume, the random generators as
        they were right after the checkpoint's step."""
        t, world = self.cfg.trainer, self.engine.accelerator.num_processes
        schedule = step_batches(
            len(self.data.train), t.batch_size * world, t.grad_accum, self.cfg.seed
        )
        for _ in range(self.state.step):  # the batches a resumed run already trained on
            next(schedule)
        if self.state.rng is not None:
            set_rng_state(self.state.rng)
            self.state.rng = None
        return schedule

    def log_step(
        self,
        step: int,
        epoch: int,
        train_loss: float,
        grad_norm: float,
        tokens_per_s: float,
        supervised_per_s: float,
    ) -> None:
        self.tracker.log(
            {
                "train/loss": train_loss,
                "train/lr": self.engine.scheduler.get_last_lr()[0],
                "train/grad_norm": grad_norm,
                "train/epoch": epoch,
                "train/tokens_per_s": tokens_per_s,
                "train/supervised_tokens_per_s": supervised_per_s,
            },
            step,
        )

    def results(self) -> dict[str, Any]:
        """What ``results.json`` holds of the loop (the W&B summary gets the best)."""
        t, s = self.cfg.trainer, self.state
        summary = {"best_val_loss": s.best_val_loss, "best_step": s.best_step}
        self.tracker.summary(summary)
        best = self.checkpoints.best
        return {
            **summary,
            "initial_val_loss": s.initial_val_loss,
            "final_val_loss": s.history["val"][-1][1],
            "final_train_loss": s.history["train"][-1][1] if s.history["train"] else None,
            "train_loss_history": s.history["train"],
            "val_loss_history": s.history["val"],
            "supervised_tokens": s.supervised_total,
            "steps": self.steps,
            "length": {"max_steps": t.max_steps, "epochs": t.epochs},
            **s.clock.state(),  # optimizer steps; validations, samples and checkpoints
            "packing": self.data.packed,
            # What the validation loss was measured on: runs whose fingerprints differ
            # (another template or data set) have losses that cannot be compared.
            "val_fingerprint": data_fingerprint(self.data.val),
            "checkpoint": str(best) if self.checkpoints.save_best else None,
            **self.info,
        }
