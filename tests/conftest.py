"""Shared fixtures: the tiny model's real BPE tokenizer, composed configs, a toy data set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instruct.config import compose
from instruct.model import build_tiny_tokenizer

NO_CUDA = "needs a CUDA GPU: torch sees none here (bench/gpu.sh runs these on one)"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, for one reason, where torch sees no CUDA GPU."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture(autouse=True)
def own_wandb_service_per_process(monkeypatch):
    """Once a W&B run starts in the test process, W&B puts its service's address in
    WANDB_SERVICE, and every child process inherits it: the CLI runs a test starts would
    then log through the test process's service, not their own as a user's runs do (and a
    killed child's run would stay open in it)."""
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny model's tokenizer: byte-level BPE trained in-process, pad == eos."""
    return build_tiny_tokenizer(4096)


@pytest.fixture(scope="session")
def templates():
    """Every shipped template, by name, as composed by Hydra."""
    from instruct.config import option_names

    return {name: compose([f"template={name}"]).template for name in option_names("template")}


NAMES = [
    "Ada",
    "Bob",
    "Chen",
    "Dana",
    "Eve",
    "Femi",
    "Gus",
    "Hana",
    "Ivan",
    "Jo",
    "Kai",
    "Lena",
    "Mo",
    "Nia",
    "Omar",
    "Pia",
    "Quinn",
    "Rui",
    "Sara",
    "Tom",
    "Uma",
    "Vic",
    "Wen",
    "Yara",
]


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """A learnable toy set: greetings and farewells to different names."""
    path = tmp_path_factory.mktemp("data") / "greetings.jsonl"
    # Two reply classes picked by the instruction's first word: learnable by a 2-layer model
    # (copying the name would need induction heads it does not have).
    rows = [
        {"instruction": f"Greet {n}.", "output": "Hello! It is good to see you."}
        if i % 2 == 0
        else {"instruction": f"Say goodbye to {n}.", "output": "Goodbye, and see you soon."}
        for i, n in enumerate(NAMES)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def toy_config(data: Path, run_dir: Path, *overrides: str):
    return compose(
        [
            "model=tiny",
            "data=file",
            f"data.paths=[{data}]",
            "data.val_fraction=0.25",
            "lora=none",
            "optimizer.lr=1e-2",
            "trainer.max_steps=12",
            "trainer.eval_every=4",
            "trainer.batch_size=6",
            f"run_dir={run_dir}",
            *overrides,
        ]
    )


@pytest.fixture(scope="session")
def tuned_toy(toy_data, tmp_path_factory):
    """A tiny model fully fine-tuned until it reproduces the toy replies; (run dir, results)."""
    from instruct.train import train

    run_dir = tmp_path_factory.mktemp("tuned")
    cfg = toy_config(
        toy_data,
        run_dir,
        "trainer.max_steps=40",
        "trainer.eval_every=10",
        "logger=none",
        "template=chatml",
    )
    return run_dir, train(cfg)


@pytest.fixture(scope="session")
def lora_toy(toy_data, tmp_path_factory):
    """A tiny model tuned with LoRA adapters (ChatML); (run dir, results)."""
    from instruct.train import train

    run_dir = tmp_path_factory.mktemp("lora")
    cfg = toy_config(
        toy_data,
        run_dir,
        "lora=default",
        "lora.rank=8",
        "trainer.max_steps=20",
        "trainer.eval_every=10",
        "logger=none",
        "template=chatml",
    )
    return run_dir, train(cfg)


def files_holding(root: Path, secret: str) -> list[Path]:
    """Every file under ``root``, hidden ones included, whose bytes contain ``secret``."""
    needle = secret.encode()
    return [p for p in sorted(root.rglob("*")) if p.is_file() and needle in p.read_bytes()]


def run_module(module: str, *args: str, cwd: Path, input: str | None = None):
    """Run ``python -m <module> args...`` as a user would; the completed process."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_best_reloads(run_dir: Path, best_val_loss: float) -> None:
    """The best checkpoint, loaded by one process, gives the validation loss it was saved at."""
    from instruct.checkpoint import load_checkpoint
    from instruct.data import load_splits
    from instruct.data.features import tokenize_split
    from instruct.validation import evaluate

    model, tokenizer, cfg = load_checkpoint(run_dir / "checkpoints" / "best")
    _, val_examples = load_splits(cfg.data, cfg.seed)
    val_set, _ = tokenize_split(val_examples, cfg, tokenizer)
    val_loss = evaluate(model, val_set, 8, tokenizer.pad_token_id, "cpu")
    assert abs(val_loss - best_val_loss) <= 1e-5 * max(1.0, abs(best_val_loss))


def best_val_loss(run_dir: Path) -> float:
    """The validation loss the best checkpoint of ``run_dir`` was saved at."""
    state = json.loads((run_dir / "checkpoints" / "best" / "trainer_state.json").read_text())
    return float(state["val_loss"])
