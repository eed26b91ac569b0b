"""Checkpoints: the best model for use, and resumable training state.

``checkpoints/best``: weights (safetensors; the adapter alone for LoRA), tokenizer, resolved
config (YAML) and template; :func:`load_checkpoint` rebuilds the model from it.

``checkpoints/step-N``: everything an exact resume needs (see :func:`save_state`): the trained
weights, optimizer, scheduler and grad-scaler state, every RNG, and the loop's own state
(step, best so far, loss history, W&B run id).

Every checkpoint is written into a temporary sibling folder, fsynced, then renamed into place,
and holds a completeness marker written last. A reader never sees a half-written folder, and a
folder without the marker (a copy cut short) is never resumed from.

Under FSDP the weights and the optimizer state are sharded (DTensors, a slice on each process).
Every process then calls the save functions: each sharded tensor is gathered whole, one at a
time, the main process writes, and the files are the ones a single process writes. Loading
gives each process its own slice of the whole tensors it reads.

Under DeepSpeed ZeRO (stages 1 and 2) the fp32 master weights and the optimizer's moments
live in flat partitions, a part on each process. They are saved the same way: gathered whole
for each parameter (DeepSpeed's ``safe_get_full_*``), into the files and layout a single
process writes (torch's own optimizer state), and put back into the partitions on resume.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from instruct.compat.deepspeed import has_master, link_moments

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
TEMPLATE_FILE = "template.yaml"
STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "COMPLETE"  # the completeness marker, written last
WEIGHTS_FILE = "trainable.safetensors"  # resumable: the trained parameters, by name
OPTIMIZER_FILE = "optimizer.pt"  # tensors and primitives only: read with weights_only=True
STEP_PREFIX = "step-"


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


def save_checkpoint(
    path: Path,
    model: Any,
    tokenizer: Any,
    cfg: DictConfig,
    state: dict[str, Any],
    writer: bool = True,
) -> None:
    """Write a usable model checkpoint to ``path``, replacing any previous one atomically.

    A sharded (FSDP) model: every process calls this, and only the ``writer`` writes.
    """
    weights = whole_weights(model, writer) if is_sharded(model) or zero_managed(model) else None
    if not writer:
        return

    def write(folder: Path) -> None:
        # LoRA: adapter weights only; full fine-tuning: every weight. Both as safetensors.
        if weights is None:
            model.save_pretrained(folder, safe_serialization=True)
        else:  # the gathered tensors, as the unsharded model would have given them
            model.save_pretrained(folder, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(folder)
        write_config(folder, cfg)
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")

    write_atomically(path, write)


# ---------------------------------------------------------------- sharded (FSDP) tensors


def is_sharded(model: Any) -> bool:
    """Whether FSDP (``fully_shard``) manages some module of ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def reshard(model: Any) -> None:
    """Under FSDP, every module's weights back in their shards, registered as the module's
    parameters. A forward can leave some gathered (the root's, and those of units that
    keep them for the backward), and a parameter read or written then would be the gathered
    copy: in the compute dtype, and dropped at the next reshard."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def whole(tensor: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """``tensor`` whole, on the CPU, where ``keep`` (else None). A DTensor is gathered from
    every process: all of them must call this for it, in the same order."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu() if keep else None


def like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` as ``param`` holds it: this process's slice when ``param`` is sharded. Every
    process has the whole tensor (read from the checkpoint), so nothing is sent."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return full
    full = full.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def whole_weights(model: Any, keep: bool) -> dict[str, torch.Tensor]:
    """The state dict ``save_pretrained`` writes, gathered whole (on the CPU, where ``keep``).

    For LoRA, only the entries peft picks (adapters, and embeddings it decides to keep), so
    the frozen base is never gathered; otherwise every entry.
    """
    local = model.state_dict()  # DTensors: no communication yet
    names = list(local)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        picked = {id(t) for t in get_peft_model_state_dict(model, state_dict=local).values()}
        names = [name for name in names if id(local[name]) in picked]
    # A weight tied to another (the output layer to the embeddings) is gathered once, and
    # stays one tensor, which save_pretrained then writes once.
    params = dict(model.named_parameters(remove_duplicate=False))
    owner: dict[str, Any] = {n: id(p) for n, p in params.items()}
    gathered: dict[Any, torch.Tensor | None] = {}
    for name in names:
        key = owner.get(name, name)
        if key not in gathered:
            param = params.get(name)
            if param is not None and has_master(param):
                gathered[key] = master(param, keep)
            else:
                gathered[key] = whole(local[name], keep)
    return {name: gathered[owner.get(name, name)] for name in names} if keep else {}


def trainable_weights(model: Any, keep: bool) -> dict[str, torch.Tensor]:
    """Every trained parameter by name, whole (gathered under FSDP; on the CPU, where ``keep``)."""
    if is_sharded(model):
        reshard(model)
    trained = {
        name: master(p, keep) if has_master(p) else whole(p, keep)
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    return {name: t.contiguous() for name, t in trained.items()} if keep else {}


def optimizer_state(optimizer: Any, keep: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every tensor whole, as one process would have it (where
    ``keep``). Under FSDP each moment (``exp_avg``, ...) is a DTensor sliced like its
    parameter, gathered here in the state dict's order, the same on every process."""
    zero = zero_optimizer(optimizer)
    if zero is not None:
        return zero_optimizer_state(zero, keep)
    state = optimizer.state_dict()
    if not any(_has_dtensor(values) for values in state["state"].values()):
        return state if keep else {}
    moments = {
        index: {key: whole(v, keep) if torch.is_tensor(v) else v for key, v in values.items()}
        for index, values in state["state"].items()
    }  # fmt: skip
    return {"state": moments, "param_groups": state["param_groups"]} if keep else {}


def _has_dtensor(values: dict[str, Any]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(v, DTensor) for v in values.values())


def shard_optimizer_state(state: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """A whole optimizer state (as :func:`optimizer_state` saved it) with each parameter-shaped
    tensor sliced as its parameter is: what ``optimizer.load_state_dict`` needs under FSDP."""
    from torch.distributed.tensor import DTensor

    live = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in live):
        return state
    by_index = {
        index: param
        for saved, live in zip(state["param_groups"], optimizer.param_groups, strict=True)
        for index, param in zip(saved["params"], live["params"], strict=True)
    }  # fmt: skip
    moments = {}
    for index, values in state["state"].items():
        param = by_index[index]
        moments[index] = {
            key: like(v, param) if torch.is_tensor(v) and v.shape == param.shape else v
            for key, v in values.items()
        }  # the step count (a scalar) stays as it is
    return {**state, "state": moments}


# ---------------------------------------------------------------- DeepSpeed ZeRO stages 1-2


def zero_managed(model: Any) -> bool:
    return any(has_master(p) for p in model.parameters())


def master(param: Any, keep: bool) -> torch.Tensor | None:
    """``param``'s fp32 master weights, whole (on the CPU, where ``keep``). Every process must
    call this, in the same order: the parts are added up over all of them."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    return full.detach().cpu() if keep else None


def zero_optimizer(optimizer: Any) -> Any:
    """DeepSpeed's ZeRO (stage 1-2) or bf16 optimizer behind Accelerate's wrapper, or None."""
    inner = getattr(optimizer, "optimizer", None)
    if hasattr(inner, "bit16_groups") or hasattr(inner, "bf16_groups"):
        return inner
    return None


def zero_groups(zero: Any) -> list[list[Any]]:
    """The model's parameters in each group, in the order the optimizer was given them."""
    groups = getattr(zero, "bit16_groups", None)
    return groups if groups is not None else zero.bf16_groups


def zero_optimizer_state(zero: Any, keep: bool) -> dict[str, Any]:
    """The state ``torch.optim`` would give for the model's own parameters: each moment whole,
    by parameter index in group order. DeepSpeed's optimizer holds it for flat partitions of
    all the parameters; every process calls this (each moment is gathered from all)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = zero.optimizer  # torch's optimizer, over this process's flat fp32 partitions
    flats = [p for g in base.param_groups for p in g["params"]]
    sample = next((base.state[p] for p in flats if p in base.state), {})
    if sample:
        link_moments(zero)
    state: dict[int, dict[str, Any]] = {}
    groups, index = [], 0
    for group, params in zip(base.param_groups, zero_groups(zero), strict=True):
        indices = []
        for param in params:
            entry: dict[str, Any] = {}
            for key, value in sample.items():
                if torch.is_tensor(value) and value.dim() > 0:  # a moment, partitioned
                    full = safe_get_full_optimizer_state(param, key)
                    entry[key] = full.detach().cpu() if keep else None
                else:  # the step count, the same for every parameter
                    entry[key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
            if entry:
                state[index] = entry
            indices.append(index)
            index += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
    return {"state": state, "param_groups": groups} if keep else {}


def load_zero_state(
    zero: Any, saved: dict[str, Any], weights: dict[int, torch.Tensor], where: Path
) -> None:
    """Put a whole optimizer state (:func:`zero_optimizer_state`'s layout, or a single
    process's) and the trained weights (by parameter index) into DeepSpeed's partitions."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base, groups = zero.optimizer, zero_groups(zero)
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(g) for g in groups]:
        raise ValueError(
            f"{where}: its optimizer has parameter groups of {sizes} parameters; this run's has "
            f"{[len(g) for g in groups]}"
        )
    for group, saved_group in zip(base.param_groups, saved["param_groups"], strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    params = [p for g in groups for p in g]
    entries = saved["state"]
    if entries:
        # torch's optimizer makes its state at the first step: make it now, for the flat
        # partitions, so that DeepSpeed can point each parameter at its part of it.
        sample = next(iter(entries.values()))
        for group in base.param_groups:
            for flat in group["params"]:
                base.state[flat] = {
                    key: torch.zeros_like(flat)
                    if torch.is_tensor(v) and v.dim() > 0
                    else (v.clone().to(flat.device) if torch.is_tensor(v) else v)
                    for key, v in sample.items()
                }
        link_moments(zero)
        for index, param in enumerate(params):
            for key, value in entries.get(index, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    safe_set_full_optimizer_state(param, value, key)
    for index, param in enumerate(params):
        if index in weights:
            safe_set_full_fp32_param(param, weights[index].float())


def write_config(folder: Path, cfg: DictConfig) -> None:
    (folder / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    (folder / TEMPLATE_FILE).write_text(OmegaConf.to_yaml(cfg.template), encoding="utf-8")


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
    rng: list[dict[str, Any]] | None = None,
    writer: bool = True,
) -> None:
    """A resumable checkpoint at ``path``: trained weights (safetensors), optimizer, scheduler
    and grad-scaler state plus every RNG (``optimizer.pt``: tensors and plain values only),
    the loop's state (``trainer_state.json``) and the resolved config (YAML).

    A sharded (FSDP) model: every process calls this, and only the ``writer`` writes; the
    weights and optimizer state are whole, so one process (or any number) can resume them.
    """
    from safetensors.torch import save_file

    trained = trainable_weights(model, writer)
    optimizer_saved = optimizer_state(optimizer, writer)
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
        write_config(folder, cfg)

    write_atomically(path, write)


def load_state(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> dict:
    """Load a checkpoint written by :func:`save_state` into live objects; the loop's state.

    RNG states (a list, one per process) are not set here: the caller sets its own right
    before the next step, after anything else that draws random numbers has run.
    """
    from safetensors.torch import load_file

    path = Path(path)
    check_resumable(path)
    trained = load_file(str(path / WEIGHTS_FILE))
    if is_sharded(model):
        reshard(model)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(trained) != set(params):
        missing, extra = sorted(set(params) - set(trained)), sorted(set(trained) - set(params))
        raise ValueError(
            f"{path / WEIGHTS_FILE}: its weights do not fit this model's trained parameters "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(like(trained[name], p))
    extra = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    zero = zero_optimizer(optimizer)
    if zero is not None:  # the fp32 masters and moments live in DeepSpeed's partitions
        index = {id(p): i for i, p in enumerate(p for g in zero_groups(zero) for p in g)}
        weights = {index[id(p)]: trained[name] for name, p in params.items() if id(p) in index}
        load_zero_state(zero, extra["optimizer"], weights, path / OPTIMIZER_FILE)
    else:
        optimizer.load_state_dict(shard_optimizer_state(extra["optimizer"], optimizer))
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


def load_checkpoint(path: str | Path) -> tuple[Any, Any, DictConfig]:
    """Rebuild ``(model, tokenizer, cfg)`` from a checkpoint folder written by this module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instruct.config import SCHEMAS, RunConfig
    from instruct.model import base_model_of, resolve_dtype

    path = Path(path)
    recover(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    if (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{path}: a resumable training state (trainer.resume=...), not a model; load the "
            "run's checkpoints/best, or export it"
        )
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {CONFIG_FILE})")
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
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(cfg.model.dtype))
    return model, tokenizer, cfg
