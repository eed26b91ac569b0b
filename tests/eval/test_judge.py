"""The pairwise judge suite against the scripted server on 127.0.0.1; canned replies stand in
for the models, so no model is loaded."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from omegaconf import OmegaConf

from instruct.config import EvalConfig, compose
from instruct.eval.judge import (
    REPLIES_FILE,
    VERDICT_SCHEMA,
    JudgeError,
    JudgeSuite,
    parse_verdict,
    tuned_score,
)
from instruct.eval.suite import SUITES, EvalContext
from tests.conftest import files_holding
from tests.fake_openai import FakeOpenAI, Reply

SECRET = "sk-judge-PLANTED-93ab1f"
TEMPLATE = SimpleNamespace(input_format="{instruction}\n\n{input}", system_with_input=None)
N = 4


def verdict(winner: str, reason: str = "because") -> Reply:
    return Reply(json.dumps({"winner": winner, "reason": reason}))


def responses(body: dict[str, Any]) -> tuple[str, str]:
    """Replies A and B from a judge request."""
    text = body["messages"][-1]["content"]
    found = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\nWhich", text, re.S)
    assert found, text
    return found.group(1), found.group(2)


def prefers_tuned(body: dict[str, Any]) -> Reply:
    a, _ = responses(body)
    return verdict("A" if a.startswith("TUNED") else "B")


def tuned(conversations: Sequence[Sequence[dict[str, str]]]) -> list[str]:
    return [f"TUNED answer to {c[-1]['content']}" for c in conversations]


def base(conversations: Sequence[Sequence[dict[str, str]]]) -> list[str]:
    return [f"base answer to {c[-1]['content']}" for c in conversations]


@pytest.fixture(autouse=True)
def secret_key(monkeypatch):
    monkeypatch.setenv("INSTRUCT_TEST_KEY", SECRET)


@pytest.fixture
def server():
    with FakeOpenAI() as fake:
        yield fake


def prompts_file(folder: Path, n: int = N) -> Path:
    path = folder / "prompts.jsonl"
    rows = [
        {"id": f"q{i}", "instruction": f"Question number {i}?", "output": f"Gold answer {i}."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_config(tmp_path: Path, server: FakeOpenAI | None, **judge: Any) -> Any:
    values = {
        "base_url": server.base_url if server else None,
        "model": "judge-model",
        "api_key_env": "INSTRUCT_TEST_KEY",
        "cache_dir": str(tmp_path / "cache"),
        "prompts_path": str(prompts_file(tmp_path)),
        "concurrency": 2,
        "request_timeout": 5.0,
        "max_retries": 1,
        **judge,
    }
    cfg = OmegaConf.structured(EvalConfig)
    cfg.suites = ["judge"]
    cfg.judge = OmegaConf.merge(cfg.judge, values)
    return cfg


def context(tmp_path: Path, label: str = "tuned", generate=tuned, base_generate=base, **kw):
    return EvalContext(
        label=label,
        model=None,
        tokenizer=None,
        template=TEMPLATE,
        generate=generate,
        out_dir=tmp_path / "eval" / label,
        base_generate=base_generate,
        **kw,
    )


def judge(tmp_path: Path, server: FakeOpenAI | None, ctx: EvalContext | None = None, **kw):
    return JudgeSuite(eval_config(tmp_path, server, **kw)).run(ctx or context(tmp_path))


def test_registered_as_judge():
    assert SUITES["judge"] is JudgeSuite


def test_a_judge_always_choosing_a_is_cancelled_by_the_order_swap(tmp_path, server):
    server.default(verdict("A"))
    result = judge(tmp_path, server)
    assert result.headline == "win_rate" and result.scores["win_rate"].value == 0.5
    assert result.scores["win_rate"].den == [1.0] * N
    assert result.info["inconsistent"] == N and result.ids == [f"q{i}" for i in range(N)]
    assert server.chat_count == 2 * N
    # Each prompt is asked once with the tuned reply first and once with it second.
    pairs = [responses(r.body) for r in server.requests]
    assert sum(a.startswith("TUNED") for a, _ in pairs) == N
    assert sum(b.startswith("TUNED") for _, b in pairs) == N


def test_a_judge_preferring_the_tuned_text_gives_one(tmp_path, server):
    server.respond(prefers_tuned)
    result = judge(tmp_path, server)
    assert result.scores["win_rate"].value == 1.0 and result.info["inconsistent"] == 0
    body = server.requests[0].body
    assert body["response_format"]["json_schema"]["schema"] == VERDICT_SCHEMA
    assert body["temperature"] == 0 and body["model"] == "judge-model"


def test_ties_count_half_and_a_split_verdict_three_quarters(tmp_path, server):
    server.default(verdict("tie"))
    result = judge(tmp_path, server)
    assert result.scores["win_rate"].value == 0.5 and result.info["tie_verdicts"] == 2 * N
    assert result.info["inconsistent"] == 0

    def tie_when_tuned_is_b(body: dict[str, Any]) -> Reply:
        a, _ = responses(body)
        return verdict("A") if a.startswith("TUNED") else verdict("tie")

    server.respond(tie_when_tuned_is_b)
    server.default(None)
    result = judge(tmp_path, server, model="other-judge")  # another judge: no cache hits
    assert result.scores["win_rate"].num == [0.75] * N
    assert result.info["inconsistent"] == N


def test_a_second_identical_run_makes_no_request(tmp_path, server):
    server.respond(prefers_tuned)
    first = judge(tmp_path, server)
    sent = server.chat_count
    assert sent == 2 * N and first.info["requested"] == 2 * N
    again = judge(tmp_path, server)
    assert server.chat_count == sent  # counted at the server: nothing new arrived
    assert again.scores["win_rate"].num == first.scores["win_rate"].num
    assert again.info["cached"] == 2 * N and again.info["requested"] == 0
    # Another judge model, or other replies, are other judgements.
    judge(tmp_path, server, model="judge-2")
    assert server.chat_count == sent + 2 * N


@pytest.mark.slow
def test_a_server_failing_halfway_keeps_what_was_judged(tmp_path, server):
    server.respond(prefers_tuned)
    server.fail_after(3)
    with pytest.raises(JudgeError) as caught:
        judge(tmp_path, server, concurrency=1)
    message = str(caught.value)
    assert server.base_url in message and "judge-model" in message
    assert "5 of 8 judgements failed" in message and "kept in" in message
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 3
    # The tuned replies were written before judging began.
    lines = (tmp_path / "eval" / "tuned" / REPLIES_FILE).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(N)]
    with FakeOpenAI() as healthy:
        healthy.respond(prefers_tuned)
        result = judge(tmp_path, healthy)
        assert healthy.chat_count == 5  # only what the failing server left undone
    assert result.scores["win_rate"].value == 1.0


def test_an_unreachable_judge_names_url_and_model(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with pytest.raises(JudgeError, match=re.escape(url)) as caught:
        judge(tmp_path, None, base_url=url)
    assert "judge-model" in str(caught.value)


def test_the_key_is_written_nowhere(tmp_path, server):
    server.respond(prefers_tuned)
    judge(tmp_path, server)
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "responses.jsonl" for p in written)
    assert any(p.name == "meta.json" for p in written)
    assert files_holding(tmp_path, SECRET) == []


def test_reference_answers_and_an_earlier_evaluation(tmp_path, server):
    server.respond(prefers_tuned)
    result = judge(tmp_path, server, reference="answers")
    assert [r["reference"] for r in result.rows] == [f"Gold answer {i}." for i in range(N)]
    assert result.info["mean_length"]["reference"] == len("Gold answer 0.")
    # The tuned replies of that evaluation, found from the run folder, become the reference.
    run = tmp_path / "run"
    (run / "eval" / "tuned").mkdir(parents=True)
    (tmp_path / "eval" / "tuned" / REPLIES_FILE).rename(run / "eval" / "tuned" / REPLIES_FILE)

    def newer(conversations):
        return [f"TUNED v2 to {c[-1]['content']}" for c in conversations]

    earlier = tuned([[{"content": f"Question number {i}?"}] for i in range(N)])
    for where in (run, run / "checkpoints" / "best", run / "eval" / "tuned" / REPLIES_FILE):
        ctx = context(tmp_path, generate=newer)
        result = judge(tmp_path, server, ctx=ctx, reference=str(where))
        assert [r["reference"] for r in result.rows] == earlier
    with pytest.raises(FileNotFoundError, match="judge.jsonl"):
        judge(tmp_path, server, reference=str(tmp_path / "nowhere"))


def test_the_base_model_against_itself_ties_without_requests(tmp_path, server):
    result = judge(tmp_path, server, ctx=context(tmp_path, label="base", generate=base))
    assert result.scores["win_rate"].value == 0.5 and server.chat_count == 0
    assert (tmp_path / "eval" / "base" / REPLIES_FILE).is_file()


def test_reference_base_without_a_base_model_is_a_clear_error(tmp_path, server):
    with pytest.raises(ValueError, match="reference=base"):
        judge(tmp_path, server, ctx=context(tmp_path, base_generate=None))


def test_empty_prompt_sets_are_skipped(tmp_path, server):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for kw in ({"prompts_path": str(empty)}, {"max_prompts": 0}):
        result = judge(tmp_path, server, **kw)
        assert result.ids == [] and result.info["prompts"] == 0 and result.info["skipped"]
    assert server.chat_count == 0


def test_prompts_without_answers_and_the_validation_split(tmp_path, server):
    server.respond(prefers_tuned)
    bare = tmp_path / "bare.jsonl"
    bare.write_text(
        json.dumps({"instruction": "Name a colour."})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Hi there."}]})
        + "\n"
    )
    result = judge(tmp_path, server, prompts_path=str(bare))
    assert len(result.ids) == 2 and all(i.startswith("p-") for i in result.ids)
    with pytest.raises(ValueError, match="reference=answers"):
        judge(tmp_path, server, prompts_path=str(bare), reference="answers")
    run_cfg = compose(["data=manual"])
    ctx = context(tmp_path, run_cfg=run_cfg)
    result = judge(tmp_path, server, ctx=ctx, prompts_path=None, max_prompts=3)
    assert len(result.ids) == 3


def test_parse_verdict_is_lenient_last():
    assert parse_verdict('{"winner": "B", "reason": "x"}') == ({"winner": "B", "reason": "x"}, "ok")
    assert parse_verdict('{"winner": "a"}')[0]["winner"] == "A"
    assert parse_verdict('Sure: {"winner": "tie", "reason": "both fine"')[0]["winner"] == "tie"
    assert parse_verdict("Assistant A is better. [[A]]")[0]["winner"] == "A"
    assert parse_verdict("[[C]]")[0]["winner"] == "tie"
    assert parse_verdict('{"winner": "neither"}') == (None, "bad_winner")
    assert parse_verdict("I think the first", cut_off=True) == (None, "cut_off")
    assert [tuned_score(w, True) for w in "AB"] == [1.0, 0.0]
    assert [tuned_score(w, False) for w in "AB"] == [0.0, 1.0]
