"""``python -m instruct.run [overrides]``: compose the config with Hydra and train."""

from __future__ import annotations

import os
import sys
import time

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from instruct.entry import hydra_main
from instruct.eval.metric import resolve, sweeper_value
from instruct.parallel.launch import join_launch
from instruct.sweep import NEW_SWEEP_FLAG, continue_sweep, override_values, sweep_folder
from instruct.train import train


@hydra_main("config")
def main(cfg: DictConfig) -> float:
    """Train one job; return its ``report.metric`` for Hydra sweepers: the eval headline
    score (to maximise) when the job is evaluated, else the best validation loss (to
    minimise). :func:`metric_direction` gives sweepers the matching direction."""
    hydra_cfg = HydraConfig.get()
    cfg.run_dir = hydra_cfg.runtime.output_dir
    if cfg.logger.name is None:
        cfg.logger.name = hydra_cfg.job.override_dirname or None
    cfg.logger.overrides = override_values(hydra_cfg.overrides.task, cfg, hydra_cfg.runtime.choices)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        if cfg.logger.group is None:
            cfg.logger.group = "sweep-" + "_".join(hydra_cfg.sweep.dir.split("/")[-2:])
        if cfg.trainer.resume is None:  # the sweep run again: finished jobs skip, killed resume
            cfg.trainer.resume = "auto"
    command = ["python", "-m", "instruct.run", *hydra_cfg.overrides.task]
    results = train(cfg, command)
    return sweeper_value(resolve(cfg.report.metric, results), results)


def with_sweep_eval(argv: list[str]) -> list[str]:
    """``argv`` with ``eval=quick`` added to a sweep that names no eval config: every job of
    a sweep ends with the same evaluation, so the sweep can be ranked by it."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    named = any(a.lstrip("+~").startswith("eval=") for a in argv)
    return [*argv, "eval=quick"] if multirun and not named else argv


def agree_on_run_folder(argv: list[str]) -> list[str]:
    """``argv`` with one run folder for every process of a multi-process launch.

    Under ``torchrun`` or ``accelerate launch`` each process composes the config itself, and
    Hydra's timestamped folder could differ by a second between them. The main process's
    folder is sent to the others (unless the folder is given): its time, or the unfinished
    sweep it continues (see ``instruct.sweep``). The others write no ``.hydra`` copy and log
    to the console only, so only one process writes the run folder.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return continue_sweep(argv)
    import torch.distributed as dist

    new_sweep = NEW_SWEEP_FLAG in argv
    argv = [a for a in argv if a != NEW_SWEEP_FLAG]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key, base = (
        ("hydra.sweep.dir", "outputs/multirun") if multirun else ("hydra.run.dir", "outputs")
    )
    main_process = int(os.environ.get("RANK", "0")) == 0
    given = any(a.startswith(f"{key}=") for a in argv)
    extra = []
    if not given or multirun:
        join_launch()  # the launcher's process group
        # (folder, refusal): the main process decides, every process follows
        choice = [(None if given else f"{base}/{time.strftime('%Y-%m-%d/%H-%M-%S')}", None)]
        if multirun and main_process and not new_sweep:
            try:  # a failure here must reach the others too, or they would wait forever
                choice = [(sweep_folder(argv) or choice[0][0], None)]
            except (SystemExit, Exception) as refused:  # noqa: BLE001
                why = str(refused) if isinstance(refused, SystemExit) else repr(refused)
                choice = [(None, why)]
        dist.broadcast_object_list(choice, src=0)
        folder, refusal = choice[0]
        if refusal is not None:
            raise SystemExit(refusal)
        if not given:
            extra.append(f"{key}={folder}")
    if not main_process:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return argv + extra


def leave_process_group() -> None:
    """End this process's part in a multi-process run, whatever ended it. Left to the
    interpreter's exit, gloo sometimes aborts after the work is done (exit code 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.argv = agree_on_run_folder(with_sweep_eval(sys.argv))
    try:
        main()
    finally:
        leave_process_group()
