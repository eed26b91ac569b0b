"""Bad input gives a clear error naming the file, record or key, or a counted skip; never a
traceback into library internals, and never a silently smaller data set.

Malformed JSON lines, non-UTF-8 bytes and a missing file are in tests/data/test_data.py; composition
errors (wrong type, unknown key) in test_config.py and test_cli.py.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from instruct.config import check, compose, option_names
from instruct.data import DataError, load_records, load_splits
from instruct.model import build_model
from instruct.tracking import read_offline_run
from instruct.train import train
from tests.conftest import files_holding, run_module, toy_config

# A made-up key of W&B's 40-character form: W&B accepts its shape, no server ever would.
FAKE_WANDB_KEY = "fake0wandb0key0for0tests0" + "0" * 15


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    return path


def tiny_cli_run(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    """Overrides for a 3-step tiny run on ``data`` in the Hydra run folder ``run_dir``."""
    return [
        "model=tiny",
        "data=file",
        f"data.paths=[{data}]",
        "data.val_fraction=0.25",
        "lora=none",
        "trainer.max_steps=3",
        "trainer.eval_every=3",
        "trainer.batch_size=6",
        "trainer.samples=1",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]


# ---------------------------------------------------------------- data files


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("empty.jsonl", "", r"empty\.jsonl: the file is empty"),
        ("blank.jsonl", "\n  \n\n", r"blank\.jsonl: the file is empty"),
        ("empty.json", "", r"empty\.json: the file is empty"),
        ("list.json", "[]", r"list\.json: the JSON list is empty"),
    ],
)
def test_an_empty_file_is_an_error_naming_it(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, "utf-8")
    with pytest.raises(DataError, match=message):
        load_records([path])


def test_an_empty_validation_file_is_named(tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a", "output": "b"}] * 3)
    (tmp_path / "val.jsonl").write_text("", "utf-8")
    cfg = compose(
        ["data=file", f"data.paths=[{train_file}]", f"data.val_paths=[{tmp_path / 'val.jsonl'}]"]
    )
    with pytest.raises(DataError, match=r"val\.jsonl: the file is empty"):
        load_splits(cfg.data, seed=0)


def test_too_few_examples_after_filtering_names_the_files_and_keys(tmp_path):
    rows = [{"instruction": f"q{i}", "output": "a", "domain": "math"} for i in range(3)]
    path = write_jsonl(tmp_path / "few.jsonl", rows)
    cfg = compose(["data=file", f"data.paths=[{path}]", "data.max_examples=1"])
    with pytest.raises(DataError) as error:
        load_splits(cfg.data, seed=0)
    assert str(error.value) == (
        f"data.paths [{path}]: 1 example(s) left after data.domains and data.max_examples; "
        "need at least 2 to split train and validation"
    )


def test_a_domain_missing_from_the_validation_file_names_that_file(tmp_path):
    train_rows = [{"instruction": f"q{i}", "output": "a", "domain": "math"} for i in range(3)]
    train_file = write_jsonl(tmp_path / "train.jsonl", train_rows)
    val_file = write_jsonl(
        tmp_path / "val.jsonl", [{"instruction": "v", "output": "a", "domain": "code"}]
    )
    cfg = compose(
        [
            "data=file",
            f"data.paths=[{train_file}]",
            f"data.val_paths=[{val_file}]",
            "data.domains=[math]",
        ]
    )
    with pytest.raises(DataError) as error:
        load_splits(cfg.data, seed=0)
    assert str(error.value) == (
        f"data.domains: unknown domain(s) ['math']; data.val_paths [{val_file}] has ['code']"
    )


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"instruction": "x", "output": ["a"]},
            r"field 'output' must be a string, got list",
        ),
        ({"instruction": "x"}, r"record has keys \['instruction'\]; expected instruction"),
        (
            {"instruction": "x", "input": 5, "output": "y"},
            r"field 'input' must be a string, got int",
        ),
        ({"instruction": 7, "output": "y"}, r"field 'instruction' must be a string, got int"),
        ({"instruction": " ", "output": "y"}, r"instruction and output must not be empty"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]},
            r"message 1 \(assistant\): content must be a string",
        ),
        ({"messages": "hello"}, r"field 'messages' must be a non-empty list"),
    ],
)
def test_a_missing_or_wrongly_typed_field_names_the_field_and_the_record(tmp_path, record, message):
    """In a .json list the record is named by its index (JSONL lines: tests/data/test_data.py)."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "ok", "output": "fine"}, record]), "utf-8")
    with pytest.raises(DataError, match=r"data\.json\[1\]: " + message):
        load_records([path])


def test_examples_all_too_long_are_counted_then_an_error(toy_data, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    # 2 tokens hold no ChatML prompt, let alone a reply: every example is dropped.
    cfg = toy_config(toy_data, tmp_path, "trainer.max_length=2", "logger=none")
    with pytest.raises(ValueError, match="no example left to train or validate on"):
        train(cfg)
    lines = [r.getMessage() for r in caplog.records if "dropped with no response" in r.message]
    counts = [line.split("; dropped: ")[0] for line in lines]
    assert counts == [
        "train: 0 examples, 0 tokens, 0 supervised (18 truncated to trainer.max_length, "
        "18 dropped with no response tokens left)",
        "validation: 0 examples, 0 tokens, 0 supervised (6 truncated to trainer.max_length, "
        "6 dropped with no response tokens left)",
    ]
    # ... then the first few dropped examples by name, and how many more.
    assert [line.rsplit(" and ", 1)[-1] for line in lines] == ["13 more", "1 more"]
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------- config


@pytest.mark.slow
@pytest.mark.parametrize("group", ["template", "model", "data"])
def test_an_unknown_option_lists_the_valid_ones(tmp_path, group):
    proc = run_module("instruct.run", f"{group}=nope", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"Could not find '{group}/nope'" in proc.stderr
    for name in option_names(group):
        assert f"\t{name}\n" in proc.stderr, (name, proc.stderr)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_out_of_range_values_fail_before_the_model_loads(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_module(
        "instruct.run",
        "lora.rank=0",
        "optimizer.lr=-1",
        "data.val_fraction=1.5",
        # A model that cannot load: were it built first, its error would come instead.
        "model=hf",
        "model.path=/nonexistent/model",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "error: invalid config: optimizer.lr must be positive and finite, got -1.0; "
        "lora.rank must be at least 1, got 0; data.val_fraction must be in (0, 1), got 1.5"
    ) in proc.stderr
    assert "does not exist" not in proc.stderr  # the model path was never looked at
    assert {p.name for p in run_dir.iterdir()} <= {".hydra", "run.log"}


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=inf", "optimizer.lr must be positive and finite, got inf"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay must be at least 0, got -0.1"),
        ("optimizer.betas=[0.9,1.5]", r"optimizer.betas must be 2 numbers in \[0, 1\)"),
        ("optimizer.max_grad_norm=0", "optimizer.max_grad_norm must be null .* or positive"),
        ("lora.alpha=0", r"lora.alpha must be null \(2 x rank\) or positive, got 0.0"),
        ("data.max_examples=0", "data.max_examples must be null or at least 1, got 0"),
        ("logger.init_timeout=0", "logger.init_timeout must be positive"),
    ],
)
def test_more_out_of_range_values_name_key_rule_and_value(override, message):
    with pytest.raises(ValueError, match=message):
        check(compose([override]))


# ---------------------------------------------------------------- models and checkpoints


def test_a_missing_model_path_is_named():
    cfg = compose(["model=hf", "model.path=/nonexistent/model"]).model
    with pytest.raises(FileNotFoundError) as error:
        build_model(cfg)
    assert str(error.value).startswith("model.path: /nonexistent/model does not exist; expected")


def test_a_folder_that_is_no_model_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model", "utf-8")
    cfg = compose(["model=hf", f"model.path={tmp_path}"]).model
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        build_model(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("exists", [False, True])
def test_a_folder_that_is_not_a_checkpoint_is_named(tmp_path, exists):
    folder = tmp_path / "not-a-checkpoint"
    if exists:
        folder.mkdir()
        (folder / "notes.txt").write_text("hello", "utf-8")
    proc = run_module("instruct.generate", f"checkpoint={folder}", "prompt=Hi", cwd=tmp_path)
    assert proc.returncode != 0
    expected = "not a checkpoint" if exists else "no such checkpoint folder"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {folder}: {expected}" in proc.stderr


# ---------------------------------------------------------------- W&B online, server down


class Reject(BaseHTTPRequestHandler):
    """Answers every request 401, as W&B does for a bad API key."""

    def _reject(self) -> None:
        body = b'{"errors": [{"message": "invalid api key"}]}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _reject

    def log_message(self, *args) -> None:  # quiet
        pass


@contextmanager
def wandb_server(kind: str) -> Iterator[str]:
    """The base URL of a W&B server on 127.0.0.1 that is ``kind``:

    - ``down``: nothing listens on the port (connection refused);
    - ``silent``: it accepts connections and never answers;
    - ``rejecting``: it answers every request with 401.
    """
    if kind == "rejecting":
        server = ThreadingHTTPServer(("127.0.0.1", 0), Reject)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_port}"
        finally:
            server.shutdown()
            server.server_close()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        if kind == "silent":
            s.listen(16)  # the kernel completes connections; nobody reads them
            yield url
            return
    yield url  # the port was bound once, then released: nothing listens


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, reason",
    [
        ("down", "Connection refused"),
        ("silent", "timed out"),
        ("rejecting", "CommError: invalid api key"),
    ],
)
def test_wandb_unavailable_in_online_mode_warns_and_logs_offline(
    toy_data, tmp_path, monkeypatch, kind, reason
):
    run_dir = tmp_path / "run"
    with wandb_server(kind) as url:
        monkeypatch.setenv("WANDB_BASE_URL", url)
        monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)  # from the environment only
        start = time.monotonic()
        args = tiny_cli_run(toy_data, run_dir, "logger.mode=online", "logger.init_timeout=3")
        proc = run_module("instruct.run", *args, cwd=tmp_path)
        seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    (warning,) = [line for line in proc.stdout.splitlines() if "W&B online logging" in line]
    assert "is unavailable" in warning and reason in warning
    assert f"logging offline in {run_dir}/wandb instead" in warning
    # W&B's own init timeout (90 s) was not waited out: the whole tiny run takes about 15 s on
    # an idle 2-core machine and 45-60 s on one running other jobs, well under 90.
    assert seconds < 85
    results = json.loads((run_dir / "results.json").read_text())
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    recorded = read_offline_run(run_file, wait_seconds=60)
    assert recorded["complete"]
    losses = [[r["_step"], r["train/loss"]] for r in recorded["history"] if "train/loss" in r]
    assert losses == results["train_loss_history"] and len(losses) == 3
    assert recorded["summary"]["best_val_loss"] == pytest.approx(results["best_val_loss"])
    # The rejected online attempt read the key: it is in none of its files or logs.
    assert files_holding(run_dir, FAKE_WANDB_KEY) == []
