"""Record, then check, the results of a fixed set of runs: a refactor must not change them.

    python scripts/golden_runs.py record bench/golden/runs.json   # before the change
    python scripts/golden_runs.py check bench/golden/runs.json    # after it: every number equal
    python scripts/golden_runs.py check bench/golden/runs.json --only tiny-lora,resumed

Each run trains in a fresh temporary folder, launched as a user launches it (``python -m
instruct.run``, ``torchrun``, ``accelerate launch``). What is kept of it: the loss histories
and every number ``results.json`` holds that is not a timing or a path, each line of
``metrics.jsonl`` without its speeds, the SHA-256 of every tensor of the best checkpoint and of
the last resumable one (by name), and for the sweep the report's table without its timing
columns. ``check`` reruns the runs and lists each difference; floats are compared exactly, so
run both on the same kind of machine, torch and thread count (bitwise equality on the CPU is
what the project keeps).

The set: the tiny model and SmolLM2-135M, each with LoRA and full fine-tuning; the tiny model
with LoRA under 2-process DDP, FSDP and DeepSpeed ZeRO-2 on the CPU; a run resumed from its
middle checkpoint; a 2-job sweep with its report. About 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

TINY = ["model=tiny", "data=manual", "trainer.max_steps=6", "trainer.eval_every=3",
        "trainer.samples=1", "trainer.sample_max_new_tokens=8", "logger=none"]  # fmt: skip
SMOL = ["trainer.max_steps=2", "trainer.eval_every=2",
        "trainer.samples=1", "trainer.sample_max_new_tokens=16", "logger=none"]  # fmt: skip
LORA = ["lora=default", "lora.dropout=0.1"]
FULL = ["lora=none", "optimizer.lr=1e-4"]
# Several processes split the batch: 2 x 4 rows is one process's 8.
TWO = ["trainer.batch_size=4", "lora.dropout=0.0"]

# Numbers that measure the machine, not the run; paths; what the run ran on (environment:
# versions, commit, CPU) and the config it was given (an input, holding paths).
VOLATILE = {"train_seconds", "eval_seconds", "total_seconds", "seconds", "checkpoint",
            "tokens_per_s", "supervised_tokens_per_s", "train/tokens_per_s",
            "train/supervised_tokens_per_s", "path", "run_dir", "versions", "environment",
            "config", "time_split", "memory"}  # fmt: skip


@dataclass
class Run:
    name: str
    args: list[str]
    launcher: list[str] = field(default_factory=list)  # before "-m instruct.run"
    after: Callable[[Path], None] | None = None  # run again after this change to the folder


def accelerate(config: str) -> list[str]:
    return ["-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
            str(REPO / "conf" / "accelerate" / config), "--num_processes", "2",
            "--main_process_port", "0"]  # fmt: skip


def back_to_the_middle(run_dir: Path) -> None:
    """Leave only the first resumable checkpoint, as a crash after it would."""
    steps = sorted((run_dir / "checkpoints").glob("step-*"))
    for later in steps[1:]:
        shutil.rmtree(later)
    shutil.rmtree(run_dir / "checkpoints" / "best", ignore_errors=True)
    for name in ("results.json", "metrics.jsonl", "samples.jsonl"):
        (run_dir / name).unlink(missing_ok=True)


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
RUNS = [
    Run("tiny-full", [*TINY, "lora=none", "optimizer.lr=1e-3"]),
    Run("tiny-lora", [*TINY, *LORA]),
    Run("smollm2-lora", [*SMOL, *LORA]),
    Run("smollm2-full", [*SMOL, *FULL]),
    Run("tiny-lora-ddp", [*TINY, *LORA, *TWO], TORCHRUN),
    Run("tiny-lora-fsdp", [*TINY, *LORA, *TWO], accelerate("fsdp.yaml")),
    Run("tiny-lora-zero2", [*TINY, *LORA, *TWO], accelerate("deepspeed_zero2.yaml")),
    Run(
        "resumed",
        [*TINY, *LORA, "trainer.checkpoint_every=3", "trainer.keep_checkpoints=2"],
        after=back_to_the_middle,
    ),  # fmt: skip
]
SWEEP = ["-m", *TINY, "optimizer.lr=1e-3,1e-2", "eval=quick", "eval.ifeval.subset=12",
         "eval.max_new_tokens=16"]  # fmt: skip


def launch(cwd: Path, launcher: list[str], args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if launcher:
        env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    cmd = [sys.executable, *launcher, "-m", "instruct.run", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{(done.stdout + done.stderr)[-4000:]}")


def tensor_digests(folder: Path) -> dict[str, str]:
    """Each tensor's SHA-256 (its bytes, any dtype), by file and name."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, t in sorted(load_file(file).items()):
            data = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            out[f"{file.name}:{name}"] = hashlib.sha256(data).hexdigest()[:16]
    return out


def stable(value: Any) -> Any:
    """``value`` without what measures the machine (timings, paths)."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def fingerprint_run(run_dir: Path) -> dict[str, Any]:
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    steps = sorted((run_dir / "checkpoints").glob("step-*"))
    return {
        "results": stable(results),
        "metrics": [stable(json.loads(line)) for line in lines],
        "best": tensor_digests(run_dir / "checkpoints" / "best"),
        "last_step": {"name": steps[-1].name, **tensor_digests(steps[-1])} if steps else None,
    }


def run_one(run: Run, tmp: Path) -> dict[str, Any]:
    cwd = tmp / run.name
    cwd.mkdir()
    run_dir = cwd / "run"
    launch(cwd, run.launcher, [*run.args, f"hydra.run.dir={run_dir}"])
    if run.after is not None:
        run.after(run_dir)
        launch(cwd, run.launcher, [*run.args, f"hydra.run.dir={run_dir}", "trainer.resume=auto"])
    return fingerprint_run(run_dir)


def run_sweep(tmp: Path) -> dict[str, Any]:
    cwd = tmp / "sweep"
    cwd.mkdir()
    root = cwd / "multirun"
    launch(cwd, [], [*SWEEP, f"hydra.sweep.dir={root}"])
    subprocess.run([sys.executable, "-m", "instruct.report", str(root)], cwd=cwd, check=True,
                   capture_output=True)  # fmt: skip
    with open(root / "report.csv", newline="", encoding="utf-8") as f:
        table = [stable(row) for row in csv.DictReader(f)]
    jobs = {p.name: fingerprint_run(p) for p in sorted(root.iterdir()) if p.name.isdigit()}
    return {"report": table, "jobs": jobs}


def record_all(only: set[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="golden-") as name:
        tmp = Path(name)
        for run in RUNS:
            if only is None or run.name in only:
                print(f"{run.name} ...", file=sys.stderr, flush=True)
                out[run.name] = run_one(run, tmp)
        if only is None or "sweep" in only:
            print("sweep ...", file=sys.stderr, flush=True)
            out["sweep"] = run_sweep(tmp)
    return out


def differences(want: Any, got: Any, where: str = "") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}/{k}: missing" for k in want.keys() - got.keys()]
        out += [f"{where}/{k}: new" for k in got.keys() - want.keys()]
        for k in sorted(want.keys() & got.keys()):
            out += differences(want[k], got[k], f"{where}/{k}")
        return out
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (a, b) in enumerate(zip(want, got, strict=True))
                for d in differences(a, b, f"{where}[{i}]")]  # fmt: skip
    return [] if want == got else [f"{where}: {want!r} -> {got!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["record", "check"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--only", help="comma-separated run names (sweep included)")
    parser.add_argument("--got", type=Path, help="check: also write what the runs gave here")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    known = {r.name for r in RUNS} | {"sweep"}
    if only and only - known:
        sys.exit(f"--only: unknown runs {sorted(only - known)}; known: {sorted(known)}")
    got = record_all(only)
    if args.action == "record":
        args.file.parent.mkdir(parents=True, exist_ok=True)
        args.file.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"recorded {len(got)} runs in {args.file}")
        return
    if args.got:
        args.got.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    want = json.loads(args.file.read_text(encoding="utf-8"))
    want = {k: v for k, v in want.items() if k in got}
    found = differences(want, got)
    for line in found[:200]:
        print(line)
    for name in sorted(got):  # every run's count, as the list above stops at 200
        count = sum(line.startswith(f"/{name}/") for line in found)
        print(f"{name}: {'identical' if not count else f'{count} differences'}")
    print(f"{len(got)} runs checked: {'identical' if not found else f'{len(found)} differences'}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
