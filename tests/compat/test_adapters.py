"""The private APIs behind instruct/compat/: each is still there, and does what it is used for.

A failure names the library, its installed version and the private name, so that a new
release that drops one is found here and not in the middle of a run.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from instruct.compat import Private, installed_versions, missing

ADAPTERS = ["accelerate", "transformers", "deepspeed", "torch", "hydra", "wandb", "peft"]
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "library",
    [
        # DeepSpeed is optional; importing it takes a few seconds.
        pytest.param(name, marks=pytest.mark.slow) if name == "deepspeed" else name
        for name in ADAPTERS
    ],
)
def test_every_private_name_an_adapter_needs_is_there(library):
    if library == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (setup.sh installs it)")
    adapter = importlib.import_module(f"instruct.compat.{library}")
    assert adapter.REQUIRES, f"instruct.compat.{library} lists no private name"
    problems = adapter.check()
    assert not problems, "\n".join(problems)


def test_a_missing_private_name_is_named_with_its_library_and_version():
    gone = (
        Private("torch", "torch.optim.optimizer", "_no_such_function"),
        Private("torch", "torch.no_such_module", "anything"),
        Private("torch", "torch.optim.optimizer", "Optimizer.step", "_no_such_attribute"),
    )
    messages = missing(gone)
    assert len(messages) == 3
    for message, req in zip(messages, gone, strict=True):
        assert message.startswith(f"torch {version('torch')}: private {req.module}.")
        assert req.attribute in message and "instruct.compat.torch" in message
    assert "_no_such_attribute" in messages[2]
    assert missing((Private("torch", "torch.optim.optimizer", "Optimizer.step"),)) == []


def test_installed_versions_leave_out_what_is_not_installed():
    versions = installed_versions(("torch", "no-such-distribution-here", "instruct"))
    assert versions == {"torch": version("torch"), "instruct": version("instruct")}


def test_transformers_generates_in_step_on_a_marked_module():
    from transformers.generation.utils import is_fsdp_managed_module

    from instruct.compat.transformers import mark_fsdp_managed

    module = torch.nn.Linear(2, 2)
    assert not is_fsdp_managed_module(module)
    mark_fsdp_managed(module)
    assert is_fsdp_managed_module(module)


def test_torch_fused_kernels_cover_cpu_and_cuda():
    from instruct.compat.torch import fused_kernel_devices

    assert {"cpu", "cuda"} <= fused_kernel_devices()


def test_hydra_command_line_and_basic_sweeper():
    from instruct.compat.hydra import args_parser, sweeper_target

    args = args_parser().parse_args(["-m", "--config-name", "x", "a=1", "b=2,3"])
    assert args.multirun and args.config_name == "x" and args.overrides == ["a=1", "b=2,3"]
    target = sweeper_target("basic")
    assert target.rsplit(".", 1)[-1] == "BasicSweeper"
    assert importlib.import_module(target.rsplit(".", 1)[0])  # the class Hydra instantiates


ACCELERATE_SCRIPT = """
from accelerate import Accelerator, PartialState
from accelerate.state import is_initialized
from instruct.compat.accelerate import forget_accelerator, precision_differs

assert not precision_differs("bf16")  # no Accelerator yet
Accelerator(mixed_precision="no", cpu=True)
assert is_initialized() and not precision_differs("no") and precision_differs("bf16")
forget_accelerator()
assert not is_initialized() and PartialState().initialized  # the process group is kept
Accelerator(mixed_precision="bf16", cpu=True)  # Accelerate would refuse it otherwise
assert not precision_differs("bf16")
print("ok")
"""


@pytest.mark.slow
def test_accelerate_takes_another_precision_after_forgetting_its_state():
    # In a process of its own: Accelerate's state is process-wide.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", ACCELERATE_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


WANDB_SCRIPT = """
import sys
import wandb
run = wandb.init(mode="offline", dir=sys.argv[1], project="compat", config={"lr": 0.5},
                 settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
run.log({"train/loss": 2.5, "nested": {"a": 1}}, step=1)
run.log({"train/loss": 1.25}, step=2)
run.summary["best"] = 1.25
run.finish()
"""


@pytest.mark.slow
def test_wandb_offline_file_reads_back(tmp_path):
    from instruct.compat.wandb import read_run_file
    from instruct.tracking import read_offline_run

    env = {**os.environ, "WANDB_SILENT": "true"}
    done = subprocess.run(
        [sys.executable, "-c", WANDB_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    recorded = read_offline_run(run_file, wait_seconds=30)
    where = f"wandb {version('wandb')}: {run_file.name} read by instruct.compat.wandb"
    assert recorded["complete"], f"{where}: no exit record"
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in recorded["history"]]
    assert rows == [{"train/loss": 2.5, "nested/a": 1}, {"train/loss": 1.25}], where
    assert recorded["summary"]["best"] == 1.25, where
    assert recorded["config"]["lr"] == 0.5, where
    assert recorded["run"]["project"] == "compat", where
    assert read_run_file(run_file.parent) == recorded  # a run folder reads as its file
    assert json.dumps(recorded)  # plain values
