"""Serving through a real engine: ``transformers serve`` (transformers' own OpenAI-compatible
server) on an exported folder, on 127.0.0.1 and the CPU, asked through the ``openai`` client.

Its greedy reply equals ``instruct.generate``'s, which proves that the prompt the server
renders from the exported tokenizer's chat template is the one training rendered, and that
its generation config stops where training's end of turn is. Slow (a server start, a model
load); skipped when transformers' serving extras are not installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from instruct.checkpoint import TEMPLATE_FILE
from instruct.config import compose
from instruct.export import export
from instruct.generate import prompt_messages, run
from tests.servers import free_port, wait_until_up

INSTALL = 'pip install "transformers[serving]"'
MISSING = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING), reason=f"transformers serve needs {', '.join(MISSING)}: {INSTALL}"
    ),
]
PROMPT = "Greet Ada."
MAX_NEW_TOKENS = 40
READY_SECONDS = 180  # the tiny model loads in seconds; a busy shared CPU takes longer


def serve_command(folder: Path, port: int) -> list[str]:
    """``transformers serve`` pinned to ``folder`` (every request gets it), on the CPU."""
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder),
            "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]  # fmt: skip


def test_transformers_serve_replies_as_generate(tuned_toy, tmp_path):
    from openai import OpenAI

    best = tuned_toy[0] / "checkpoints" / "best"
    folder = export(best, tmp_path / "merged")
    cfg = compose(
        [f"checkpoint={best}", f"prompt={PROMPT}", "sampling=greedy",
         f"sampling.max_new_tokens={MAX_NEW_TOKENS}"],
        config_name="generate",
    )  # fmt: skip
    expected = run(cfg, lambda _: None)  # what python -m instruct.generate prints
    messages = prompt_messages(OmegaConf.load(best / TEMPLATE_FILE), PROMPT, None, None)

    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            serve_command(folder, port), stdout=out, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}"
    try:
        # /health answers once the forced model is loaded
        wait_until_up(f"{url}/health", proc, log, READY_SECONDS, "transformers serve")
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        response = client.chat.completions.create(
            model=str(folder),  # the server is pinned to it; another name is refused
            messages=messages,
            temperature=0,  # transformers serve: do_sample=False, i.e. greedy
            max_tokens=MAX_NEW_TOKENS,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    served = response.choices[0].message.content
    print(f"served: {served!r}; instruct.generate: {expected!r}")
    assert served == expected == "Hello! It is good to see you."
    assert response.choices[0].finish_reason == "stop"  # at <|im_end|>, as trained
