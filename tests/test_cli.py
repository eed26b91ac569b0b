"""The real command line, in subprocesses, from a directory outside the repository."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from instruct.tracking import read_offline_run
from tests.conftest import run_module

FAST = ["model=tiny", "trainer.max_steps=2", "trainer.eval_every=1", "data.domains=[math]"]


def run_cli(args: list[str], cwd: Path):
    return run_module("instruct.run", *args, cwd=cwd)


@pytest.mark.slow
def test_multirun_makes_one_folder_and_one_wandb_run_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    # eval=none: a sweep's default eval=quick is tested in test_sweep.py.
    args = ["-m", *FAST, "lora.rank=4,8", "eval=none", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = []
    for job, rank in (("0", 4), ("1", 8)):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["best_val_loss"] <= results["initial_val_loss"]
        (run_file,) = (sweep / job / "wandb").glob("offline-run-*/run-*.wandb")
        recorded = read_offline_run(run_file)
        assert recorded["config"]["lora"]["rank"] == rank
        assert any("val/loss" in row for row in recorded["history"])
        runs.append(recorded["run"])
    assert runs[0]["id"] != runs[1]["id"]
    assert runs[0]["group"] == runs[1]["group"] != ""
    assert "lora.rank=4" in runs[0]["name"] and "lora.rank=8" in runs[1]["name"]


@pytest.mark.slow
def test_single_run_lands_in_the_hydra_run_folder(tmp_path):
    proc = run_cli([*FAST, "template=chatml", "lora.rank=16"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = (tmp_path / "outputs").glob("*/*/results.json")
    run_dir = results.parent
    assert (run_dir / "checkpoints" / "best" / "adapter_model.safetensors").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert re.search(r"data: \d+ train / \d+ validation examples", proc.stdout)
    assert "trainable" in proc.stdout


@pytest.mark.slow
def test_bad_override_fails_before_any_model_loads(tmp_path):
    proc = run_cli(["lora.rnak=8"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Could not override 'lora.rnak'" in proc.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.json"))


@pytest.mark.slow
def test_the_wheel_ships_configs_and_data(tmp_path):
    """A regular (non-editable) install gets conf/ as instruct/conf and the manual set."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("instruct-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for option in (
        "config.yaml",
        "template/alpaca.yaml",
        "template/zephyr.yaml",
        "model/tiny.yaml",
        "lora/none.yaml",
        "data/file.yaml",
        "experiment/template_comparison.yaml",
        "hydra/sweeper/optuna_lr.yaml",
    ):
        assert f"instruct/conf/{option}" in names
    assert "instruct/data/manual.jsonl" in names
