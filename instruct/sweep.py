"""Sweeps that survive a lost machine: the same multirun command continues its sweep.

Hydra names a sweep folder by the time it started (``outputs/multirun/<date>/<time>``), so
the same command run again would start over in a new folder. Before Hydra starts,
:func:`continue_sweep` looks for the newest sweep folder whose ``multirun.yaml`` records the
same overrides. If some of its jobs have no ``results.json``, the command runs in that folder
again: Hydra's basic sweeper numbers jobs in the order of the overrides, so job ``N`` is the
same job both times, and every job of a sweep runs with ``trainer.resume=auto`` (see
``instruct.run``): a finished job returns its results without training, a killed one resumes
from its last checkpoint, one that never started starts. ``--new-sweep`` starts a new folder.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterable, Mapping
from contextlib import redirect_stderr
from dataclasses import dataclass
from functools import cached_property
from math import prod
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from instruct.compat.hydra import args_parser, sweeper_target

# Where conf/config.yaml's hydra.sweep.dir puts sweeps (relative to the working directory):
# outputs/multirun/<date>/<time>.
SWEEP_ROOT = Path("outputs/multirun")
NEW_SWEEP_FLAG = "--new-sweep"
# Hydra overrides that may differ between two runs of one sweep without changing its jobs:
# where it runs, and how it logs (under torchrun, every process but the main one adds
# hydra.output_subdir=null and hydra/job_logging=stdout, and may write multirun.yaml last).
UNRECORDED = (
    "hydra.sweep.dir=",
    "hydra.mode=",
    "hydra.output_subdir=",
    "hydra/job_logging=",
    "hydra/hydra_logging=",
    "hydra.verbose=",
)


@dataclass
class Command:
    """What a multirun command line asks for, as Hydra records it in ``multirun.yaml``."""

    task: list[str]  # overrides of the run config, in order (the order numbers the jobs)
    hydra: list[str]  # overrides of Hydra's own config (hydra/sweeper=..., hydra.sweeper.x=...)
    config_name: str
    sweep_dir: str | None  # hydra.sweep.dir=..., when given


@dataclass
class Sweep:
    """A sweep folder as found on disk."""

    path: Path
    command: Command
    sweeper: str  # hydra.sweeper._target_
    jobs: int | None  # how many jobs the sweeper launches; None when it cannot be told

    @cached_property
    def finished(self) -> list[int]:
        """Numbers of the jobs with a results.json (read only for a sweep that matches)."""
        return finished_jobs(self.path)

    @property
    def continuable(self) -> bool:
        """Only the basic sweeper gives job N the same overrides every time (an Optuna
        study samples new values)."""
        return self.sweeper == sweeper_target("basic")

    @property
    def complete(self) -> bool:
        started = sorted(int(p.name) for p in self.path.iterdir() if p.name.isdigit())
        if self.jobs is None:  # unknown total: complete when every job started has finished
            return bool(started) and started == self.finished
        return len(self.finished) == self.jobs

    def progress(self) -> str:
        total = "?" if self.jobs is None else str(self.jobs)
        return f"{len(self.finished)} of {total} jobs finished"


def parse_command(argv: list[str]) -> Command | None:
    """The multirun that ``argv`` (``sys.argv``) starts; None when it starts none (no ``-m``,
    ``--cfg``, ``--info``, ``--help``, or arguments Hydra will reject and report itself)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        with redirect_stderr(io.StringIO()):  # Hydra reports a bad command line itself
            args, unknown = args_parser().parse_known_args(argv[1:])
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except (Exception, SystemExit):  # noqa: BLE001 - the parser's errors are Hydra's to report
        return None
    if unknown:
        return None
    if not args.multirun or args.cfg or args.info or args.help or args.hydra_help:
        return None
    if args.shell_completion or args.experimental_rerun:
        return None
    task = [o.input_line for o in overrides if not o.is_hydra_override()]
    hydra = [o.input_line for o in overrides if o.is_hydra_override()]
    given = [line.split("=", 1)[1] for line in hydra if line.startswith("hydra.sweep.dir=")]
    return Command(
        task=task,
        hydra=[line for line in hydra if not line.startswith(UNRECORDED)],
        config_name=args.config_name or "config",
        sweep_dir=given[-1] if given else None,
    )


def read_sweep(path: Path) -> Sweep | None:
    """The sweep recorded in ``path/multirun.yaml``; None if there is none or it is unreadable."""
    try:
        recorded = yaml.safe_load((path / "multirun.yaml").read_text(encoding="utf-8"))
        hydra = recorded["hydra"]
        hydra_overrides = [str(o) for o in hydra["overrides"]["hydra"]]
        command = Command(
            task=[str(o) for o in hydra["overrides"]["task"]],
            hydra=[o for o in hydra_overrides if not o.startswith(UNRECORDED)],
            config_name=str(hydra["job"]["config_name"]),
            sweep_dir=str(path),
        )
        sweeper = hydra["sweeper"]
        target = str(sweeper["_target_"])
        params = sweeper.get("params") or {}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None
    jobs = count_jobs([f"{k}={v}" for k, v in params.items()] + command.task)
    return Sweep(path, command, target, jobs)


def count_jobs(overrides: list[str]) -> int | None:
    """How many jobs Hydra's basic sweeper makes of ``overrides`` (its ``hydra.sweeper.params``
    first, then the command line's, a later value of a key replacing an earlier one): the
    product of the sweeps' lengths. None when that cannot be told without composing the
    config (a ``glob(...)`` over a config group)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        lengths: dict[str, int] = {}
        for o in OverridesParser.create().parse_overrides(overrides):
            key = o.get_key_element()
            if not o.is_sweep_override():
                lengths[key] = 1
            elif o.is_discrete_sweep():
                lengths[key] = len(list(o.sweep_string_iterator()))
            else:  # interval/range without a step: only a search sweeper takes these
                return None
    except Exception:  # noqa: BLE001 - Hydra's parser raises several types; any means "unknown"
        return None
    return prod(lengths.values())


def finished_jobs(path: Path) -> list[int]:
    """Job numbers under ``path`` whose ``results.json`` holds a result."""
    done = []
    for job in path.iterdir():
        if not job.name.isdigit():
            continue
        try:
            results = json.loads((job / "results.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(results, dict) and "best_val_loss" in results:
            done.append(int(job.name))
    return sorted(done)


def same_command(a: Command, b: Command) -> bool:
    return (a.task, a.hydra, a.config_name) == (b.task, b.hydra, b.config_name)


def latest_sweep(command: Command, root: Path = SWEEP_ROOT) -> Sweep | None:
    """The newest sweep under ``root/<date>/<time>`` that ``command`` started before."""
    folders = sorted(root.glob("*/*/multirun.yaml"), key=lambda p: p.parent.as_posix())
    for marker in reversed(folders):
        sweep = read_sweep(marker.parent)
        if sweep is not None and same_command(sweep.command, command):
            return sweep
    return None


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def sweep_folder(argv: list[str], root: Path = SWEEP_ROOT) -> str | None:
    """The unfinished sweep folder that ``argv`` continues, if any (saying so on stderr);
    None for a new sweep. A folder given as ``hydra.sweep.dir`` that holds a sweep of other
    overrides, or one that cannot be continued, is refused with ``SystemExit``."""
    command = parse_command(argv)
    if command is None:
        return None
    if command.sweep_dir is not None:
        check_given_folder(command, Path(command.sweep_dir))
        return None
    sweep = latest_sweep(command, root)
    if sweep is None:
        return None
    if not sweep.continuable:
        say(
            f"the last sweep of these overrides, {sweep.path}, ran {sweep.sweeper}, which "
            "cannot be continued; starting a new sweep"
        )
        return None
    if sweep.complete:
        say(f"the last sweep of these overrides, {sweep.path}, is complete "
            f"({sweep.progress()}); starting a new sweep")  # fmt: skip
        return None
    say(
        f"continuing sweep {sweep.path}: {sweep.progress()}, skipping them; killed jobs resume "
        f"from their last checkpoint ({NEW_SWEEP_FLAG} starts a new sweep instead)"
    )
    return str(sweep.path)


def check_given_folder(command: Command, path: Path) -> None:
    """A ``hydra.sweep.dir`` that already holds a sweep is continued only if it is the same."""
    if not (path / "multirun.yaml").is_file():
        if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
            raise SystemExit(
                f"error: hydra.sweep.dir={path} holds job folders but no multirun.yaml (Hydra's "
                "basic sweeper writes one; an Optuna sweep does not), so its jobs cannot be "
                "matched to this command's; choose another hydra.sweep.dir"
            )
        return
    sweep = read_sweep(path)
    if sweep is None:
        raise SystemExit(
            f"error: hydra.sweep.dir={path}: its multirun.yaml cannot be read; choose another "
            "hydra.sweep.dir, or leave it out for a new timestamped folder"
        )
    if not same_command(sweep.command, command):
        raise SystemExit(
            f"error: hydra.sweep.dir={path} holds a sweep of other overrides "
            f"({' '.join(sweep.command.task + sweep.command.hydra)}), not "
            f"({' '.join(command.task + command.hydra)}); its job folders would mix the two. "
            "Choose another hydra.sweep.dir, or leave it out for a new timestamped folder"
        )
    if not sweep.continuable:
        raise SystemExit(
            f"error: hydra.sweep.dir={path} holds a sweep run by {sweep.sweeper}, which cannot "
            "be continued (its trials would get other values under the same job numbers); "
            "choose another hydra.sweep.dir"
        )
    say(f"continuing sweep {path}: {sweep.progress()}, skipping them")


def continue_sweep(argv: list[str], root: Path = SWEEP_ROOT) -> list[str]:
    """``argv`` without ``--new-sweep``, pinned to the unfinished sweep it continues, if any."""
    if NEW_SWEEP_FLAG in argv:
        return [a for a in argv if a != NEW_SWEEP_FLAG]
    folder = sweep_folder(argv, root)
    return argv if folder is None else [*argv, f"hydra.sweep.dir={folder}"]


def override_values(
    overrides: Iterable[str], cfg: DictConfig, choices: Mapping[str, Any]
) -> dict[str, Any]:
    """A job's overrides as key -> value, the value as the config holds it (``lora.rank=16``
    -> 16, ``template=vicuna`` -> "vicuna"): W&B's config gets them as one flat dict, so
    runs can be grouped and compared by exactly the keys that were set."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values: dict[str, Any] = {}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.is_delete():
            continue
        key = o.key_or_group
        if key in choices:  # a config group: the option chosen
            values[key] = choices[key]
            continue
        value = OmegaConf.select(cfg, key, default=o.get_value_element_as_str())
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        values[key] = value
    return values
