"""Self-Instruct against a real chat-completions server on 127.0.0.1, through the openai SDK."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instruct.config import compose
from instruct.data import load_records, manual_path
from instruct.self_instruct.dataset import seed_path
from instruct.self_instruct.generate import GenerationError, ensure_dataset
from instruct.self_instruct.parse import tasks_schema
from instruct.tracking import read_offline_run
from instruct.train import train
from tests.conftest import files_holding
from tests.fake_openai import FakeOpenAI, Reply

SECRET = "sk-test-PLANTED-SECRET-4f9c2a"


def vocabulary() -> list[str]:
    """Plain words from the manual set, so random instructions rarely overlap."""
    text = " ".join(" ".join(str(v) for v in r.values()) for r in load_records([manual_path()]))
    banned = set(compose(["data=self_instruct"]).data.blacklist)
    words = {w for w in text.lower().split() if w.isalpha() and w.isascii() and len(w) > 3}
    return sorted(words - banned)


class Tasks:
    """Distinct, filter-passing tasks: random words from a large vocabulary."""

    def __init__(self, seed: int = 0) -> None:
        self.rng, self.words = random.Random(seed), vocabulary()

    def one(self) -> dict[str, str]:
        picked = " ".join(self.rng.sample(self.words, 7))
        return {
            "instruction": f"Describe {picked} in plain words.",
            "input": "",
            "output": f"Here is a short description of {picked}: it is fine.",
        }

    def reply(self, n: int, **kwargs) -> Reply:
        """``n`` tasks in the shape the schema asks for: ``{"tasks": [...]}``."""
        return Reply(json.dumps({"tasks": [self.one() for _ in range(n)]}), **kwargs)


def si_config(tmp_path: Path, server: FakeOpenAI, *overrides: str):
    return compose(
        [
            "data=self_instruct",
            f"data.base_url={server.base_url}",
            "data.model=scripted",
            f"data.out_dir={tmp_path / 'si'}",
            "data.concurrency=1",
            "data.request_timeout=1",
            "data.max_retries=2",
            "data.api_key_env=INSTRUCT_TEST_KEY",
            *overrides,
        ]
    )


@pytest.fixture
def secret_key(monkeypatch):
    monkeypatch.setenv("INSTRUCT_TEST_KEY", SECRET)


@pytest.mark.slow
def test_every_filter_and_failure_is_counted(tmp_path, secret_key):
    tasks = Tasks()
    seeds = [
        r["instruction"] for r in load_records([seed_path(compose(["data=self_instruct"]).data)])
    ]
    good = [tasks.one() for _ in range(8)]
    near_seed = [
        {
            "instruction": seeds[0].rstrip(".?!") + " please.",
            "input": "",
            "output": "A fine answer to the seed task.",
        }
    ]
    blacklisted = [
        {
            "instruction": "Draw a diagram of the water cycle for a class.",
            "input": "",
            "output": "I would draw clouds and rain.",
        }
    ]
    cut = json.dumps(good[3:5] + [tasks.one()])
    cut = cut[: cut.rindex('"output"') + 12]  # the third item is cut mid-string
    with FakeOpenAI() as server:
        server.script(
            Reply(json.dumps(good[:3])),
            Reply("Here you go:\n```json\n" + json.dumps(near_seed + blacklisted) + "\n```"),
            Reply("Sorry, I can only answer in prose today."),
            Reply(cut, finish_reason="length"),
            Reply(json.dumps([good[0]] + [good[5]])),  # an exact duplicate, one new
            Reply.rate_limited(retry_after=0.2),
            Reply(json.dumps([good[6]])),
            Reply.server_error(),
            Reply(json.dumps([good[7]])),
            Reply.hang(3),
            Reply(json.dumps([tasks.one()])),
        )
        cfg = si_config(tmp_path, server, "data.num_instructions=9").data
        folder = ensure_dataset(cfg)
        seen = server.requests
    meta = json.loads((folder / "meta.json").read_text())
    stats, client = meta["stats"], meta["client"]
    assert stats["accepted"] == 9
    assert stats["rejected"] == {
        "similar": 1,
        "blacklist": 1,
        "unparseable": 1,
        "cut_off": 1,
        "duplicate": 1,
    }
    # Every HTTP attempt counts: 8 answered, the 429, the 500 and the timeout retried.
    assert stats["requests"] == 11 == len(seen)
    assert (client["ok"], client["failed"], client["timeouts"]) == (8, 2, 1)
    assert client["rate_limited"] == 1 and client["gave_up"] == 0
    assert client["parsed"] == 7 and client["unparsed"] == {"unparseable": 1}
    assert client["structured_output"] == "json_schema" and meta["exit_reason"] == "completed"
    assert stats["prompt_tokens"] == 80 and stats["completion_tokens"] == 160
    accepted = [json.loads(line) for line in (folder / "tasks.jsonl").read_text().splitlines()]
    assert len(accepted) == 9 == len({a["instruction"] for a in accepted})
    rejected = [json.loads(line) for line in (folder / "rejected.jsonl").read_text().splitlines()]
    similar = next(r for r in rejected if r["reason"] == "similar")
    assert similar["most_similar"] == seeds[0] and similar["rouge_l"] >= 0.7
    # Parse failures keep their raw text, pointing at their row of responses.jsonl.
    prose = next(r for r in rejected if r["reason"] == "unparseable")
    assert prose["raw"] == "Sorry, I can only answer in prose today."
    cut_row = next(r for r in rejected if r["reason"] == "cut_off")
    assert cut_row["raw"] == cut and cut_row["finish_reason"] == "length"
    responses = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 11 and [r["seq"] for r in responses] == list(range(1, 12))
    assert [r["status"] for r in responses].count("timeout") == 1
    by_seq = {r["seq"]: r for r in responses}
    assert by_seq[prose["response_seq"]]["outcome"] == "unparseable"
    timed_out = next(r for r in responses if r["status"] == "timeout")
    retry = next(r for r in responses if r["request"] == timed_out["request"] and r["attempt"])
    assert retry["timeout"] == 2 * timed_out["timeout"] == 2.0  # never the same timeout again
    # Each request shows 3 example tasks and asks for a JSON batch matching the schema.
    prompt = seen[0].body["messages"][0]["content"]
    assert prompt.count('{"instruction"') == 3 and '{"tasks": [...]}' in prompt
    assert seen[0].body["response_format"]["type"] == "json_schema"
    assert seen[0].body["response_format"]["json_schema"]["schema"] == tasks_schema(8)
    assert seen[0].headers["authorization"] == f"Bearer {SECRET}"
    assert files_holding(tmp_path, SECRET) == []


@pytest.mark.slow
def test_a_bad_key_stops_at_once_and_is_redacted_where_echoed(tmp_path, secret_key):
    with FakeOpenAI() as server:
        # Servers echo (part of) a wrong key in the message; it must reach no file.
        echo = {"error": {"message": f"Incorrect API key provided: {SECRET}.", "code": "k"}}
        server.script(Reply(status=401, body=echo))
        server.default(Reply("[]"))
        with pytest.raises(GenerationError, match="401") as caught:
            ensure_dataset(si_config(tmp_path, server, "data.num_instructions=5").data)
        assert len(server.requests) == 1
    assert SECRET not in str(caught.value) and server.base_url in str(caught.value)
    (meta_file,) = (tmp_path / "si").glob("*/meta.json")
    meta = json.loads(meta_file.read_text())
    assert meta["exit_reason"] == "error" and "401" in meta["client"]["last_error"]
    assert files_holding(tmp_path, SECRET) == []


@pytest.mark.slow
def test_a_server_refusing_json_schema_gets_json_object_with_the_schema(tmp_path, secret_key):
    tasks = Tasks(seed=4)
    with FakeOpenAI() as server:
        server.accept_formats("json_object+schema", "json_object", "none")  # llama-cpp-python
        server.script(*(tasks.reply(4) for _ in range(3)))
        folder = ensure_dataset(si_config(tmp_path, server, "data.num_instructions=12").data)
        seen = server.requests
    kinds = [r.body["response_format"]["type"] for r in seen]
    assert kinds == ["json_schema", "json_object", "json_object", "json_object"]
    assert seen[1].body["response_format"]["schema"] == tasks_schema(8)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["client"]["structured_output"] == "json_object+schema"
    assert meta["stats"]["accepted"] == 12
    rows = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines()]
    assert [(r["http_status"], r["form"]) for r in rows][:2] == [
        (422, "json_schema"),
        (200, "json_object+schema"),
    ]


@pytest.mark.slow
def test_a_model_that_never_follows_the_format_stops_with_a_diagnosis(tmp_path, secret_key):
    with FakeOpenAI() as server:
        server.default(Reply("Here are some great tasks: write, read, think."))
        cfg = si_config(tmp_path, server, "data.num_instructions=5", "data.concurrency=4").data
        with pytest.raises(GenerationError, match="0 of 40 responses parsed") as caught:
            ensure_dataset(cfg)
        assert server.chat_count < 48  # stopped at 40, give or take the requests in flight
    assert "does not follow the output format" in str(caught.value)
    (folder,) = (tmp_path / "si").iterdir()
    assert str(folder / "responses.jsonl") in str(caught.value)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["exit_reason"] == "error" and "0 of 40" in meta["error"]
    assert meta["stats"]["rejected"]["unparseable"] >= 40
    rejected = (folder / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) >= 40 and "great tasks" in json.loads(rejected[0])["raw"]


@pytest.mark.slow
def test_parsed_but_never_accepted_stops_with_the_rejection_reasons(tmp_path, secret_key):
    drawing = {"instruction": "Draw a map of the town.", "input": "", "output": "A map."}
    with FakeOpenAI() as server:
        server.default(Reply(json.dumps({"tasks": [drawing]})))
        cfg = si_config(tmp_path, server, "data.num_instructions=5").data
        with pytest.raises(GenerationError, match="0 tasks accepted from 40 responses") as caught:
            ensure_dataset(cfg)
    assert "40 blacklist" in str(caught.value) and "rejected.jsonl" in str(caught.value)


@pytest.mark.slow
def test_sigterm_leaves_meta_json_with_the_reason(tmp_path, secret_key):
    tasks = Tasks(seed=5)
    with FakeOpenAI() as server:
        server.default(Reply("[]", delay=0.5))  # slow enough to be stopped mid-run
        server.script(tasks.reply(1))
        cmd = [
            sys.executable,
            "-m",
            "instruct.self_instruct",
            f"data.base_url={server.base_url}",
            "data.model=scripted",
            f"data.out_dir={tmp_path / 'si'}",
            "data.api_key_env=INSTRUCT_TEST_KEY",
            "data.num_instructions=30",
        ]
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy()
        )
        deadline = time.time() + 120
        while time.time() < deadline and server.chat_count < 3:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    (meta_file,) = (tmp_path / "si").glob("*/meta.json")
    meta = json.loads(meta_file.read_text())
    assert meta["exit_reason"] == "SIGTERM"
    assert meta["stats"]["accepted"] == 1 and meta["client"]["requests"] >= 3
    assert files_holding(tmp_path, SECRET) == []


def test_a_missing_key_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = compose(["data=self_instruct", f"data.out_dir={tmp_path}"]).data
    with pytest.raises(GenerationError, match="OPENAI_API_KEY"):
        ensure_dataset(cfg)


@pytest.mark.slow
def test_killed_generation_resumes_without_duplicates(tmp_path, secret_key):
    tasks = Tasks(seed=1)
    with FakeOpenAI() as server:
        server.script(*(tasks.reply(2, delay=0.15) for _ in range(40)))
        args = [
            f"data.base_url={server.base_url}",
            "data.model=scripted",
            f"data.out_dir={tmp_path / 'si'}",
            "data.concurrency=1",
            "data.api_key_env=INSTRUCT_TEST_KEY",
            "data.num_instructions=30",
        ]
        cmd = [sys.executable, "-m", "instruct.self_instruct", *args]
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy()
        )
        deadline = time.time() + 120
        files = []
        while time.time() < deadline:
            files = list((tmp_path / "si").glob("*/tasks.jsonl"))
            if files and files[0].read_text().count("\n") >= 6:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        (tasks_file,) = files
        before = tasks_file.read_text().count("\n")
        assert 6 <= before < 30
        with open(tasks_file, "a") as f:  # as if killed mid-write
            f.write('{"id": "si-999", "instruction": "Half a li')
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "torn last line" in done.stderr + done.stdout
    lines = tasks_file.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 30 == len({r["instruction"] for r in records})
    assert [r["id"] for r in records] == [f"si-{i:06d}" for i in range(1, 31)]


@pytest.mark.slow
def test_generated_data_trains_tiny_end_to_end_and_no_secret_leaks(tmp_path, secret_key):
    tasks = Tasks(seed=2)
    with FakeOpenAI() as server:
        server.script(*(tasks.reply(4) for _ in range(5)))
        overrides = [
            "model=tiny",
            "trainer.max_steps=3",
            "trainer.eval_every=3",
            f"run_dir={tmp_path / 'run'}",
        ]
        first = train(si_config(tmp_path, server, "data.num_instructions=16", *overrides))
        n_requests = len(server.requests)
        # Same settings again: the data set is reused, no request is made.
        train(
            si_config(
                tmp_path,
                server,
                "data.num_instructions=16",
                *overrides[:-1],
                f"run_dir={tmp_path / 'run2'}",
            )
        )
        assert len(server.requests) == n_requests
    assert first["best_val_loss"] < first["initial_val_loss"]
    assert first["data"]["provenance"]["stats"]["accepted"] == 16
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    summary = read_offline_run(run_file)["summary"]
    assert summary["data"]["provenance"]["stats"]["accepted"] == 16
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
