"""The terminal chat keeps the history and renders it with the training template."""

from __future__ import annotations

import re

import pytest

from instruct.chat import chat_loop
from instruct.checkpoint import load_checkpoint
from instruct.config import compose
from tests.conftest import run_module


@pytest.mark.slow
def test_chat_keeps_history_and_resets(tuned_toy):
    run_dir, _ = tuned_toy
    model, tokenizer, cfg = load_checkpoint(run_dir / "checkpoints" / "best")
    sampling = compose(
        ["checkpoint=x", "sampling=greedy", "sampling.max_new_tokens=30"], config_name="chat"
    ).sampling
    lines = iter(["Greet Ada.", "Say goodbye to Bob.", "/reset", "Greet Eve.", "/exit", "never"])
    shown: list[str] = []
    streamed: list[str] = []
    history = chat_loop(
        model,
        tokenizer,
        cfg.template,
        sampling,
        system="Be kind.",
        read=lambda _: next(lines),
        write=shown.append,
        stream=streamed.append,
    )
    replies = "".join(streamed).splitlines()
    assert replies[0] == "assistant> Hello! It is good to see you."
    assert replies[1] == "assistant> Goodbye, and see you soon."
    assert all(re.fullmatch(r"\(\d+ tokens, [\d.]+ tokens/s\)", line) for line in shown[:2])
    assert shown[2] == "(history cleared)"
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "Greet Eve."


@pytest.mark.slow
def test_chat_cli_reads_turns_until_end_of_input(tuned_toy, tmp_path):
    run_dir, _ = tuned_toy
    proc = run_module(
        "instruct.chat",
        f"checkpoint={run_dir / 'checkpoints' / 'best'}",
        "sampling=greedy",
        "sampling.max_new_tokens=30",
        input="Greet Ada.\nSay goodbye to Bob.\n",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "assistant> Hello! It is good to see you." in proc.stdout
    assert "assistant> Goodbye, and see you soon." in proc.stdout
