"""Secrets stay in the environment; weights and configs are stored as data, never as pickles;
no code shipped with a model runs unless the user allows it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml

from instruct.config import compose, option_names
from instruct.model import build_model
from tests.conftest import files_holding, run_module
from tests.fake_openai import FakeOpenAI
from tests.self_instruct.test_self_instruct import Tasks

# Distinctive made-up keys: found anywhere on disk, they leaked.
OPENAI_KEY = "sk-planted-openai-key-5d1e9b7c3a"
WANDB_KEY = "planted0wandb0key0" + "7" * 22  # W&B's 40-character form
PACKAGE = Path(__file__).resolve().parents[1] / "instruct"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A full tiny run through the CLI on Self-Instruct data from a server on 127.0.0.1, with
    both keys in its environment; (folder holding everything it wrote, run folder, process,
    requests the server received)."""
    root = tmp_path_factory.mktemp("planted")
    run_dir = root / "run"
    tasks = Tasks(seed=3)
    with pytest.MonkeyPatch.context() as env, FakeOpenAI() as server:
        env.setenv("OPENAI_API_KEY", OPENAI_KEY)
        env.setenv("WANDB_API_KEY", WANDB_KEY)
        server.script(*(tasks.reply(4) for _ in range(8)))
        proc = run_module(
            "instruct.run",
            "model=tiny",
            "data=self_instruct",
            f"data.base_url={server.base_url}",
            "data.model=scripted",
            f"data.out_dir={root / 'si'}",
            "data.num_instructions=12",
            "data.concurrency=1",
            "trainer.max_steps=2",
            "trainer.eval_every=2",
            "trainer.samples=1",
            "logger.mode=offline",
            f"hydra.run.dir={run_dir}",
            cwd=root,
        )
        requests = server.requests
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, run_dir, proc, requests


@pytest.mark.slow
def test_planted_keys_are_written_nowhere(planted_run):
    root, run_dir, proc, requests = planted_run
    # The OpenAI key was really used, so finding it nowhere means something.
    assert requests and requests[0].headers["authorization"] == f"Bearer {OPENAI_KEY}"
    written = {p.relative_to(run_dir).parts[0] for p in run_dir.rglob("*") if p.is_file()}
    assert {".hydra", "wandb", "checkpoints", "results.json", "metrics.jsonl", "run.log"} <= written
    # W&B's run file (config, metadata, history), its console copy and its own logs
    for pattern in ("run-*.wandb", "files/output.log", "logs/debug.log", "logs/debug-internal.log"):
        assert list((run_dir / "wandb").glob(f"offline-run-*/{pattern}")), pattern
    for key in (OPENAI_KEY, WANDB_KEY):
        assert files_holding(root, key) == []
        assert key not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_weights_are_safetensors_and_other_state_loads_weights_only(planted_run):
    _, run_dir, _, _ = planted_run
    best = run_dir / "checkpoints" / "best"
    names = {p.name for p in best.iterdir()}
    assert "adapter_model.safetensors" in names
    assert not {p.suffix for p in best.iterdir()} & PICKLE_SUFFIXES, names
    everything = [p for p in run_dir.rglob("*") if p.is_file()]
    assert not [p for p in everything if p.suffix in {".pkl", ".pickle"}]
    for state in (p for p in everything if p.suffix in PICKLE_SUFFIXES):
        torch.load(state, map_location="cpu", weights_only=True)  # tensors and plain values


@pytest.mark.slow
def test_saved_configs_are_plain_yaml(planted_run):
    _, run_dir, _, _ = planted_run
    best = run_dir / "checkpoints" / "best"
    for path in (best / "config.yaml", best / "template.yaml", run_dir / ".hydra" / "config.yaml"):
        text = path.read_text("utf-8")
        assert "!!python" not in text
        assert isinstance(yaml.safe_load(text), dict)
    saved = yaml.safe_load((best / "config.yaml").read_text("utf-8"))
    assert saved["model"]["name"] == "tiny" and saved["model"]["trust_remote_code"] is False
    assert saved["data"]["api_key_env"] == "OPENAI_API_KEY"  # the variable's name, not its value


def calls(tree: ast.AST, owner: str, name: str) -> list[ast.Call]:
    """Calls ``owner.name(...)`` in ``tree``."""
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == name
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == owner
    ]


def keyword_is(call: ast.Call, key: str, value: object) -> bool:
    return any(
        k.arg == key and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


@pytest.mark.slow
def test_every_load_in_the_package_refuses_pickles():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 10
    bad = []
    for source in sources:
        tree = ast.parse(source.read_text("utf-8"), str(source))
        where = source.relative_to(PACKAGE.parent)
        for call in calls(tree, "torch", "load"):
            if not keyword_is(call, "weights_only", True):
                bad.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
        for call in calls(tree, "np", "load"):
            if not keyword_is(call, "allow_pickle", False):
                bad.append(f"{where}:{call.lineno}: np.load without allow_pickle=False")
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names):
                bad.append(f"{where}:{node.lineno}: imports a pickle module")
    assert bad == []


@pytest.mark.slow
def test_trust_remote_code_is_false_unless_set():
    for name in option_names("model"):
        assert compose([f"model={name}"]).model.trust_remote_code is False, name


def plant_code(folder: Path, marker: Path) -> None:
    """A module in ``folder`` that leaves ``marker`` behind if it is ever imported."""
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    (folder / "planted.py").write_text(code, "utf-8")


def update_json(path: Path, **values: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text("utf-8")), **values}), "utf-8")


@pytest.mark.slow
def test_code_shipped_beside_a_known_model_is_ignored(tmp_path):
    """A real model whose config and tokenizer also point at shipped code: the library's own
    classes load it, the shipped code is never imported."""
    folder, marker = tmp_path / "model", tmp_path / "code-ran"
    model, tokenizer = build_model(compose(["model=tiny"]).model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    plant_code(folder, marker)
    auto_map = {"AutoConfig": "planted.Config", "AutoModelForCausalLM": "planted.Model"}
    update_json(folder / "config.json", auto_map=auto_map)
    tokenizer_map = {"AutoTokenizer": ["planted.Tokenizer", "planted.Tokenizer"]}
    update_json(folder / "tokenizer_config.json", auto_map=tokenizer_map)
    loaded, _ = build_model(compose(["model=hf", f"model.path={folder}"]).model)
    assert type(loaded).__module__.startswith("transformers.")
    assert not marker.exists()


def test_a_model_that_needs_shipped_code_is_refused(tmp_path, tokenizer):
    folder, marker = tmp_path / "model", tmp_path / "code-ran"
    tokenizer.save_pretrained(folder)
    plant_code(folder, marker)
    auto_map = {"AutoConfig": "planted.Config", "AutoModelForCausalLM": "planted.Model"}
    (folder / "config.json").write_text(
        json.dumps({"model_type": "planted", "auto_map": auto_map}), "utf-8"
    )
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        build_model(compose(["model=hf", f"model.path={folder}"]).model)
    assert not marker.exists()
