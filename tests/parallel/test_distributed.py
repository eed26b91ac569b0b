"""Several processes (torchrun, accelerate launch; gloo on the CPU) give the results of one.

Real launches in a subprocess: ``python -m torch.distributed.run --nproc_per_node 2 -m
instruct.run ...`` and ``accelerate launch --config_file conf/accelerate/<file>.yaml
--num_processes 2 -m instruct.run ...`` (the ``accelerate`` command's own entry point). Each
run records the world size and the distributed type it trained with, and how many parameter
elements its main process held, so a launcher that silently starts one process, or FSDP that
silently falls back to data parallel, cannot pass for the real thing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instruct.tracking import read_offline_run
from tests.conftest import assert_best_reloads

REPO = Path(__file__).parents[2]


def launch(
    tmp: Path, name: str, processes: int, *overrides: str, config: str | None = None
) -> tuple[Path, dict]:
    """Train the toy set in ``tmp/name`` (the working folder); (run folder, results).
    ``config``: launched with ``accelerate launch --config_file conf/accelerate/<config>``."""
    cwd = tmp / name
    cwd.mkdir()
    cmd, env = command(tmp, processes, *overrides, config=config)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (results_file,) = (cwd / "outputs").glob("*/*/results.json")  # one run folder, not one each
    return results_file.parent, json.loads(results_file.read_text())


def command(
    tmp: Path, processes: int, *overrides: str, config: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command line (torchrun for several processes, or ``accelerate launch`` with
    ``config``) and its environment."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    if config is not None:  # what the `accelerate` command runs; port 0: a free one
        launcher = ["-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
                    str(REPO / "conf" / "accelerate" / config), "--num_processes",
                    str(processes), "--main_process_port", "0"]  # fmt: skip
    args = [
        "model=tiny",
        "lora=none",
        "template=chatml",
        "data=file",
        f"data.paths=[{tmp / 'toy.jsonl'}]",
        "data.val_fraction=0.3",  # 9 validation examples: an uneven split over 2 processes
        "optimizer.lr=1e-2",
        "trainer.max_steps=6",
        "trainer.eval_every=3",
        "trainer.samples=1",
        "trainer.sample_max_new_tokens=4",
        "logger.mode=offline",
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SERVICE",)}
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    several = processes > 1 or config is not None
    cmd = [sys.executable, *(launcher if several else []), "-m", "instruct.run", *args]
    return cmd, env


@pytest.fixture(scope="module")
def toy_tmp(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    rows = [
        {"instruction": f"Greet person number {i}.", "output": f"Hello, person {i}! Nice day."}
        for i in range(30)
    ]
    (tmp / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return tmp


def close(a: list[list[float]], b: list[list[float]], rel: float = 1e-5) -> bool:
    return [s for s, _ in a] == [s for s, _ in b] and all(
        abs(x - y) <= rel * abs(x) for (_, x), (_, y) in zip(a, b, strict=True)
    )


@pytest.mark.slow
def test_two_processes_equal_one_with_the_global_batch_and_accumulation(toy_tmp):
    _, one = launch(toy_tmp, "one", 1, "trainer.batch_size=4")
    two_dir, two = launch(toy_tmp, "two", 2, "trainer.batch_size=2")
    _, accum = launch(toy_tmp, "accum", 1, "trainer.batch_size=2", "trainer.grad_accum=2")
    assert (one["world_size"], two["world_size"], accum["world_size"]) == (1, 2, 1)
    for run in (two, accum):
        assert close(run["train_loss_history"], one["train_loss_history"])
        # Every validation example counted once over both processes: the same mean.
        assert close(run["val_loss_history"], one["val_loss_history"])
        assert run["supervised_tokens"] == one["supervised_tokens"]
    assert one["train_loss_history"][-1][1] < one["train_loss_history"][0][1]

    # One writer: one W&B run, each step logged once, one .hydra copy.
    (run_file,) = (two_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = read_offline_run(run_file, wait_seconds=30)["history"]
    steps = [row["_step"] for row in history if "train/loss" in row]
    assert steps == list(range(1, 7))
    lines = (two_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "train/loss" in x] == list(range(1, 7))
    assert (two_dir / ".hydra" / "config.yaml").is_file()
    assert (two_dir / "checkpoints" / "best").is_dir()


@pytest.mark.slow
def test_a_stopped_two_process_run_resumes_under_the_launcher(toy_tmp):
    """SIGTERM to torchrun: both processes stop after the same step and save one checkpoint;
    relaunched with trainer.resume=auto, the run ends as an uninterrupted one does (LoRA
    dropout on, so each process's own RNG state must come back)."""
    import signal
    import time

    steps = ["trainer.batch_size=2", "trainer.max_steps=300", "trainer.eval_every=100",
             "trainer.checkpoint_every=1000", "lora=default", "lora.dropout=0.1"]  # fmt: skip
    _, whole = launch(toy_tmp, "whole", 2, *steps)
    run_dir = toy_tmp / "stopped-run"
    cmd, env = command(toy_tmp, 2, *steps, f"hydra.run.dir={run_dir}")
    proc = subprocess.Popen(cmd, cwd=toy_tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    while not metrics.exists() or metrics.read_text().count("train/loss") < 5:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out[-3000:]
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 1, (saved, out[-3000:])
    stopped = int(saved[0].name.removeprefix("step-"))
    assert 5 <= stopped < 300 and f"after step {stopped}" in out, out[-3000:]
    assert "resume with: torchrun --nproc_per_node=2 -m instruct.run" in out, out[-3000:]

    cmd, env = command(toy_tmp, 2, *steps, f"hydra.run.dir={run_dir}", "trainer.resume=auto")
    done = subprocess.run(cmd, cwd=toy_tmp, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["world_size"] == 2
    assert close(resumed["train_loss_history"], whole["train_loss_history"], rel=1e-6)
    assert close(resumed["val_loss_history"], whole["val_loss_history"], rel=1e-6)


def test_steps_count_the_examples_every_process_takes():
    from instruct.config import compose
    from instruct.train import total_steps

    cfg = compose(["trainer.batch_size=2", "trainer.epochs=1"])
    assert total_steps(cfg, 30, 1) == 15 and total_steps(cfg, 30, 2) == 8


def test_deepspeed_zero3_is_refused_with_the_reason_and_our_settings_are_handed_over():
    from types import SimpleNamespace

    from instruct.parallel.deepspeed import hand_over_to_deepspeed

    def accelerator(stage):
        plugin = SimpleNamespace(zero_stage=stage, deepspeed_config={"train_batch_size": "auto"})
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=4)

    t = SimpleNamespace(batch_size=3, grad_accum=2)
    with pytest.raises(NotImplementedError, match="ZeRO stage 3.*fsdp.yaml"):
        hand_over_to_deepspeed(accelerator(3), t, 1.0)
    two = accelerator(2)
    assert hand_over_to_deepspeed(two, t, None) == 2
    assert two.state.deepspeed_plugin.deepspeed_config == {
        "train_batch_size": 24,
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.0,  # no optimizer.max_grad_norm: DeepSpeed must not clip
    }


def fsdp_unavailable() -> str | None:
    """Why FSDP cannot run on this machine's CPUs, or None."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return f"torch {torch.__version__} has no torch.distributed with gloo"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    return None


# LoRA, the case FSDP is for; no dropout, as each process draws its own masks.
LORA = ("lora=default", "lora.dropout=0.0")


@pytest.fixture(scope="module")
def one_lora(toy_tmp) -> tuple[Path, dict]:
    """One process, batch 4, LoRA: what 2 processes of batch 2 must give."""
    return launch(toy_tmp, "one-lora", 1, *LORA, "trainer.batch_size=4")


@pytest.mark.slow
def test_accelerate_launch_starts_two_processes_on_the_cpu(toy_tmp, one_lora):
    """The shipped multi_cpu.yaml through `accelerate launch`: two processes in one gloo
    group (data parallel), with one process's losses."""
    _, one = one_lora
    _, two = launch(toy_tmp, "accelerate-ddp", 2, *LORA, "trainer.batch_size=2",
                    config="multi_cpu.yaml")  # fmt: skip
    assert (two["world_size"], two["distributed_type"]) == (2, "MULTI_CPU")
    assert two["parameters_on_main_process"] == two["total_parameters"]  # a whole copy each
    assert close(two["train_loss_history"], one["train_loss_history"])
    assert close(two["val_loss_history"], one["val_loss_history"])


@pytest.mark.slow
@pytest.mark.skipif(fsdp_unavailable() is not None, reason=str(fsdp_unavailable()))
def test_fsdp_shards_lora_training_and_saves_whole_checkpoints(toy_tmp, one_lora):
    """conf/accelerate/fsdp.yaml through `accelerate launch`, 2 processes on the CPU: the
    weights are sharded (each process holds half of them), the losses are one process's, and
    the checkpoints hold whole tensors that one process loads."""
    import torch
    from safetensors.torch import load_file

    one_dir, one = one_lora
    two_dir, two = launch(toy_tmp, "fsdp", 2, *LORA, "trainer.batch_size=2",
                          config="fsdp.yaml")  # fmt: skip
    assert (two["world_size"], two["distributed_type"]) == (2, "FSDP")
    # Sharded: the main process holds half of every weight (DTensor shards), not a copy.
    assert one["parameters_on_main_process"] == one["total_parameters"]
    assert two["parameters_on_main_process"] * 2 == two["total_parameters"]
    assert close(two["train_loss_history"], one["train_loss_history"])
    assert close(two["val_loss_history"], one["val_loss_history"])
    assert one["train_loss_history"][-1][1] < one["train_loss_history"][0][1]
    # Every process took part in generating the samples (or the run would have hung).
    samples = (two_dir / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in samples] == [0, 3, 6]

    # Whole tensors in both checkpoints, as one process wrote them.
    for name in ("best/adapter_model.safetensors", "step-00000006/trainable.safetensors"):
        mine, theirs = (load_file(d / "checkpoints" / name) for d in (two_dir, one_dir))
        assert mine.keys() == theirs.keys() and mine
        for key, tensor in mine.items():
            assert tensor.shape == theirs[key].shape, key
            torch.testing.assert_close(tensor, theirs[key], rtol=0, atol=1e-4)
    saved = torch.load(two_dir / "checkpoints/step-00000006/optimizer.pt", weights_only=True)
    reference = torch.load(one_dir / "checkpoints/step-00000006/optimizer.pt", weights_only=True)
    moments, expected = saved["optimizer"]["state"], reference["optimizer"]["state"]
    assert moments.keys() == expected.keys()
    for index, state in moments.items():
        for key, value in state.items():
            assert type(value) is torch.Tensor and value.shape == expected[index][key].shape

    assert two["best_step"] == 6
    assert_best_reloads(two_dir, two["best_val_loss"])


def deepspeed_unavailable() -> str | None:
    """Why DeepSpeed cannot run here, or None."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (pip install --no-build-isolation deepspeed)"
    return fsdp_unavailable()  # gloo, as for FSDP


@pytest.mark.slow
@pytest.mark.skipif(deepspeed_unavailable() is not None, reason=str(deepspeed_unavailable()))
def test_deepspeed_zero2_equals_one_process_and_saves_whole_checkpoints(toy_tmp, one_lora):
    """conf/accelerate/deepspeed_zero2.yaml through `accelerate launch`, 2 processes on the
    CPU: DeepSpeed's engine trains (and steps the optimizer itself) with one process's
    losses, also with accumulation; the checkpoints hold whole tensors, in the layout one
    process writes, and one process loads them."""
    import torch
    from safetensors.torch import load_file

    one_dir, one = one_lora
    two_dir, two = launch(toy_tmp, "zero2", 2, *LORA, "trainer.batch_size=2",
                          config="deepspeed_zero2.yaml")  # fmt: skip
    _, accum = launch(toy_tmp, "zero2-accum", 2, *LORA, "trainer.batch_size=1",
                      "trainer.grad_accum=2", config="deepspeed_zero2.yaml")  # fmt: skip
    # Full fine-tuning: two parameter groups (no weight decay on norms), tied embeddings.
    full_one_dir, full_one = launch(toy_tmp, "zero2-full-one", 1, "trainer.batch_size=4")
    full_dir, full = launch(toy_tmp, "zero2-full", 2, "trainer.batch_size=2",
                            config="deepspeed_zero2.yaml")  # fmt: skip
    for run, reference in ((two, one), (accum, one), (full, full_one)):
        assert (run["world_size"], run["distributed_type"]) == (2, "DEEPSPEED")
        assert close(run["train_loss_history"], reference["train_loss_history"])
        assert close(run["val_loss_history"], reference["val_loss_history"])
        assert reference["train_loss_history"][-1][1] < reference["train_loss_history"][0][1]
    samples = (two_dir / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in samples] == [0, 3, 6]

    for mine_dir, their_dir in ((two_dir, one_dir), (full_dir, full_one_dir)):
        (best,) = (mine_dir / "checkpoints/best").glob("*.safetensors")
        for name in (f"best/{best.name}", "step-00000006/trainable.safetensors"):
            mine, theirs = (load_file(d / "checkpoints" / name) for d in (mine_dir, their_dir))
            assert mine.keys() == theirs.keys() and mine
            for key, tensor in mine.items():
                torch.testing.assert_close(tensor, theirs[key], rtol=0, atol=1e-4)
        step = "checkpoints/step-00000006/optimizer.pt"
        saved = torch.load(mine_dir / step, weights_only=True)["optimizer"]
        reference = torch.load(their_dir / step, weights_only=True)["optimizer"]
        assert [g["params"] for g in saved["param_groups"]] == [
            g["params"] for g in reference["param_groups"]
        ]
        moments, expected = saved["state"], reference["state"]
        assert moments.keys() == expected.keys() and moments
        for index, state in moments.items():
            assert state.keys() == expected[index].keys()
            for key, value in state.items():
                torch.testing.assert_close(value, expected[index][key], rtol=1e-3, atol=1e-6)

    assert two["best_step"] == 6
    assert_best_reloads(two_dir, two["best_val_loss"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, kind",
    [
        pytest.param(
            "fsdp.yaml", "FSDP",
            marks=pytest.mark.skipif(fsdp_unavailable() is not None,
                                     reason=str(fsdp_unavailable())),
        ),
        pytest.param(
            "deepspeed_zero2.yaml", "DEEPSPEED",
            marks=pytest.mark.skipif(deepspeed_unavailable() is not None,
                                     reason=str(deepspeed_unavailable())),
        ),
    ],
)  # fmt: skip
def test_a_sharded_run_resumes_under_the_launcher(toy_tmp, config, kind):
    """A 2-process run cut off after its step-4 checkpoint (a copy of its folder without what
    came later), relaunched with trainer.resume=auto, ends as the whole run did: every
    process gets its share of the saved weights and optimizer state back (FSDP: its slices
    of them; DeepSpeed: its partitions of the fp32 masters and moments), and with LoRA
    dropout on, its own RNG state too."""
    import shutil

    from safetensors.torch import load_file

    steps = ["trainer.batch_size=2", "lora=default", "lora.dropout=0.1",
             "trainer.checkpoint_every=2"]  # fmt: skip
    whole_dir, whole = launch(toy_tmp, f"{kind}-whole", 2, *steps, config=config)
    cut = toy_tmp / f"{kind}-cut"
    shutil.copytree(whole_dir, cut)
    for later in ("checkpoints/step-00000006", "results.json"):
        shutil.rmtree(cut / later) if (cut / later).is_dir() else (cut / later).unlink()
    assert (cut / "checkpoints/step-00000004").is_dir()

    cmd, env = command(toy_tmp, 2, *steps, f"hydra.run.dir={cut}", "trainer.resume=auto",
                       config=config)  # fmt: skip
    done = subprocess.run(cmd, cwd=toy_tmp, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "resuming from" in done.stdout + done.stderr
    resumed = json.loads((cut / "results.json").read_text())
    assert (resumed["world_size"], resumed["distributed_type"]) == (2, kind)
    assert close(resumed["train_loss_history"], whole["train_loss_history"], rel=1e-6)
    assert close(resumed["val_loss_history"], whole["val_loss_history"], rel=1e-6)
    name = "checkpoints/step-00000006/trainable.safetensors"
    a, b = load_file(cut / name), load_file(whole_dir / name)
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
