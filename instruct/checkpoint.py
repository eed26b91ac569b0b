"""Checkpoints: the best model for use, and resumable training state.

``checkpoints/best``: weights (safetensors; the adapter alone for LoRA), tokenizer, resolved
config (YAML) and template; :func:`load_checkpoint` rebuilds the model from it.

``checkpoints/step-N``: everything an exact resume needs (see :func:`save_state`): the trained
weights, optimizer, scheduler and grad-scaler state, every RNG, and the loop's own state
(step, best so far, loss history, W&B run id).

Every checkpoint is written into a temporary sibling folder, fsynced, then renamed into place,
and holds a completeness marker written last. A reader never sees a half-written folder, and a
folder without the marker (a copy cut short) is never resumed from.

A backend that shards the weights or the optimizer state (FSDP, DeepSpeed ZeRO) gathers and
scatters them through its strategy (:mod:`instruct.parallel`). Every process then calls the
save functions: each sharded tensor is gathered whole, one at a time, the ``writer`` writes,
and the files are the ones a single process writes. Loading gives each process its own part
of the whole tensors it reads.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from instruct.engine import Engine
from instruct.errors import ModelNotFound
from instruct.parallel import Strategy

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
TEMPLATE_FILE = "template.yaml"
STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "COMPLETE"  # the completeness marker, written last
WEIGHTS_FILE = "trainable.safetensors"  # resumable: the trained parameters, by name
OPTIMIZER_FILE = "optimizer.pt"  # tensors and primitives only: read with weights_only=True
STEP_PREFIX = "step-"
BEST_DIR = "best"

# (folder, cfg) -> None: writes the resolved config and the template beside the weights.
ConfigWriter = Callable[[Path, DictConfig], None]


def _fsync_tree(path: Path) -> None:
    for item in sorted(path.rglob("*"), reverse=True):  # files, then the folders holding them
        if item.is_dir():
            _fsync_dir(item)
            continue
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some systems (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE_FILE).is_file()


def recover(path: Path) -> None:
    """Put back ``path`` if a replacement was cut off between its two renames."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and is_complete(old):
        old.rename(path)
        log.warning("%s: restored the previous checkpoint (a save was interrupted)", path)


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(folder)`` on a temporary sibling of ``path``, then put it in place.

    The marker is written last and everything is fsynced before the rename, so ``path`` is
    either the previous complete folder or the new complete one, whatever stops the process.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    recover(path)
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / COMPLETE_FILE).write_text("complete\n", encoding="utf-8")
    _fsync_tree(tmp)
    if path.exists():
        path.rename(old)  # a crash from here to the next rename: recover() puts it back
    tmp.rename(path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_config(folder: Path, cfg: DictConfig) -> None:
    (folder / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    (folder / TEMPLATE_FILE).write_text(OmegaConf.to_yaml(cfg.template), encoding="utf-8")


def save_checkpoint(
    path: Path,
    model: Any,
    tokenizer: Any,
    cfg: DictConfig,
    state: dict[str, Any],
    writer: bool,
    strategy: Strategy,
    config_writer: ConfigWriter = write_config,
) -> None:
    """Write a usable model checkpoint to ``path``, replacing any previous one atomically.

    A sharded model (``strategy.collective``): every process calls this, and only the
    ``writer`` writes. ``config_writer`` writes the config (:func:`write_config`).
    """
    weights = strategy.model_weights(model, writer)
    if not writer:
        return

    def write(folder: Path) -> None:
        # LoRA: adapter weights only; full fine-tuning: every weight. Both as safetensors.
        if weights is None:
            model.save_pretrained(folder, safe_serialization=True)
        else:  # the gathered tensors, as the unsharded model would have given them
            model.save_pretrained(folder, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(folder)
        config_writer(folder, cfg)
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")

    write_atomically(path, write)


# ---------------------------------------------------------------- resumable state


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors and plain values (no pickled objects)."""
    import numpy as np

    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng(accelerator: Any) -> list[dict[str, Any]]:
    """Every process's RNG states, in process order (on every process)."""
    state = rng_state()
    if accelerator is None or accelerator.num_processes == 1:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(states, state)
    return states


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def save_state(
    path: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    cfg: DictConfig,
    loop: dict[str, Any],
    rng: list[dict[str, Any]] | None,
    writer: bool,
    strategy: Strategy,
    keep: int | None = None,
    config_writer: ConfigWriter = write_config,
) -> None:
    """A resumable checkpoint at ``path``: trained weights (safetensors), optimizer, scheduler
    and grad-scaler state plus every RNG (``optimizer.pt``: tensors and plain values only),
    the loop's state (``trainer_state.json``) and the resolved config (YAML).

    A sharded model (``strategy.collective``): every process calls this, and only the
    ``writer`` writes; the weights and optimizer state are whole, so one process (or any
    number) can resume them. ``config_writer`` writes the config (:func:`write_config`).
    """
    from safetensors.torch import save_file

    trained = strategy.trained_weights(model, writer)
    optimizer_saved = strategy.optimizer_state(model, optimizer, writer)
    if not writer:
        return

    def write(folder: Path) -> None:
        save_file(trained, str(folder / WEIGHTS_FILE))
        torch.save(
            {
                "optimizer": optimizer_saved,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng if rng is not None else [rng_state()],  # one per process
            },
            folder / OPTIMIZER_FILE,
        )
        (folder / STATE_FILE).write_text(json.dumps(loop, indent=2), encoding="utf-8")
        config_writer(folder, cfg)

    write_atomically(path, write)
    if keep is not None:  # then all but the newest ``keep`` beside it rotate out
        rotate(path.parent, keep)


def load_state(
    path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any, strategy: Strategy
) -> dict:
    """Load a checkpoint written by :func:`save_state` into live objects; the loop's state.

    RNG states (a list, one per process) are not set here: the caller sets its own right
    before the next step, after anything else that draws random numbers has run.
    """
    from safetensors.torch import load_file

    path = Path(path)
    check_resumable(path)
    trained = load_file(str(path / WEIGHTS_FILE))
    params = strategy.trained_parameters(model)
    if set(trained) != set(params):
        missing, extra = sorted(set(params) - set(trained)), sorted(set(trained) - set(params))
        raise ValueError(
            f"{path / WEIGHTS_FILE}: its weights do not fit this model's trained parameters "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    strategy.load_weights(model, params, trained)
    extra = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    where = path / OPTIMIZER_FILE
    strategy.load_optimizer(model, optimizer, extra["optimizer"], params, trained, where)
    scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None and extra["scaler"] is not None:
        scaler.load_state_dict(extra["scaler"])
    loop = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    loop["rng"] = extra["rng"]
    return loop


def check_resumable(path: Path) -> None:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"trainer.resume: {path} is not a folder")
    wanted = [WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE]
    missing = [name for name in wanted if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"trainer.resume: {path} is not a resumable checkpoint (no {', '.join(missing)}); "
            f"those are the {STEP_PREFIX}N folders under a run's checkpoints/"
        )
    if not is_complete(path):
        raise ValueError(
            f"trainer.resume: {path} is incomplete (no {COMPLETE_FILE} marker: its save was "
            "cut off); resume from an earlier one, or trainer.resume=auto"
        )


def step_checkpoints(folder: Path) -> list[Path]:
    """``step-N`` folders under ``folder``, oldest first (complete or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(STEP_PREFIX)))


def latest_complete(folder: Path) -> Path | None:
    """The newest complete resumable checkpoint in ``folder``; incomplete ones are skipped
    with a warning."""
    for path in reversed(step_checkpoints(folder)):
        recover(path)
        if is_complete(path):
            return path
        log.warning("%s: incomplete checkpoint (its save was cut off), skipped", path)
    return None


def rotate(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and any incomplete ones older
    than the newest complete one. Called only after a new checkpoint is complete."""
    found = step_checkpoints(folder)
    complete = [p for p in found if is_complete(p)]
    if not complete:
        return
    newest = int(complete[-1].name.removeprefix(STEP_PREFIX))
    for path in found:
        stale = not is_complete(path) and int(path.name.removeprefix(STEP_PREFIX)) < newest
        if stale or (path in complete[:-keep]):
            shutil.rmtree(path, ignore_errors=True)
    for leftover in Path(folder).glob(f".{STEP_PREFIX}*.tmp"):  # saves cut off earlier
        shutil.rmtree(leftover, ignore_errors=True)


@dataclass
class Checkpoints:
    """A run's ``checkpoints/`` folder: ``best``, the model of the lowest validation loss so
    far, and the resumable ``step-N`` states, of which the newest ``keep`` stay.

    Every process calls the saves: a sharded backend gathers each tensor from all of them,
    and the main process alone writes.
    """

    folder: Path
    cfg: DictConfig  # the run's resolved config, saved beside every checkpoint
    keep: int | None = None  # resumable checkpoints kept (None: every one)
    save_best: bool = True  # False: ``best`` is tracked, never written
    config_writer: ConfigWriter = write_config

    @property
    def best(self) -> Path:
        return self.folder / BEST_DIR

    def save_resumable(self, step: int, engine: Engine, loop: dict[str, Any]) -> Path:
        """A resumable checkpoint of the state after ``step`` (``loop``: the loop's own state);
        older ones rotate out."""
        path = self.folder / step_name(step)
        accelerator = engine.accelerator
        rng = gather_rng(accelerator)  # every process's, as each draws its own masks
        # Every process: a sharded backend holds a share of the weights and optimizer state.
        save_state(path, engine.unwrapped(), engine.optimizer, engine.scheduler,
                   accelerator.scaler, self.cfg, loop, rng, engine.main, engine.strategy,
                   keep=self.keep, config_writer=self.config_writer)  # fmt: skip
        accelerator.wait_for_everyone()
        return path

    def write_best(self, engine: Engine, state: dict[str, Any]) -> None:
        """The model now, as the new ``best`` (``state``: its step and val loss)."""
        main = engine.main
        if self.save_best and (main or engine.strategy.collective):  # each gathers its share
            save_checkpoint(self.best, engine.unwrapped(), engine.tokenizer, self.cfg, state,
                            main, engine.strategy, self.config_writer)  # fmt: skip


def load_checkpoint(path: str | Path) -> tuple[Any, Any, DictConfig]:
    """Rebuild ``(model, tokenizer, cfg)`` from a checkpoint folder written by this module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instruct.config import SCHEMAS, RunConfig
    from instruct.model import base_model_of, resolve_dtype, stop_at_end_of_turn

    path = Path(path)
    recover(path)
    if not path.is_dir():
        raise ModelNotFound(f"{path}: no such checkpoint folder")
    if (path / WEIGHTS_FILE).is_file():
        raise ModelNotFound(
            f"{path}: a resumable training state (trainer.resume=...), not a model; load the "
            "run's checkpoints/best, or export it"
        )
    if not (path / CONFIG_FILE).is_file():
        raise ModelNotFound(f"{path}: not a checkpoint (no {CONFIG_FILE})")
    saved = OmegaConf.load(path / CONFIG_FILE)
    data_schema = SCHEMAS.get(f"data/{saved.data.source}")
    schema = OmegaConf.structured(RunConfig)
    if data_schema is not None:  # the data group's own schema, as Hydra composed it
        schema.data = OmegaConf.structured(data_schema)
    cfg = OmegaConf.merge(schema, saved)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base, _ = base_model_of(cfg.model, tokenizer)
        model = PeftModel.from_pretrained(base, path)
        stop_at_end_of_turn(model, tokenizer, cfg.template)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(cfg.model.dtype))
    return model, tokenizer, cfg
