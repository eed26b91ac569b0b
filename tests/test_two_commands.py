"""The README's two commands: what they run, and that CI runs the same test command."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def quick_start() -> list[str]:
    """The commands of the README's first code block (comments dropped)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md: no bash code block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_quick_start_is_two_commands_and_ci_runs_the_test_one():
    assert quick_start() == ["make run", "make test"]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in ci if line and not line.startswith("#")]
    assert commands[-1] == "make test"  # after the system packages CI adds (a browser)
    assert not any("pytest" in line or "setup.sh" in line for line in commands[:-1])


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_overrides_pass_through_to_the_run_and_the_tests():
    def planned(*args: str) -> list[str]:
        done = subprocess.run(["make", "-n", "-s", *args], cwd=REPO, capture_output=True,
                              text=True, check=True)  # fmt: skip
        return done.stdout.strip().splitlines()

    run = planned("run", "ARGS=template=alpaca lora.rank=16")
    assert run[-1] == ".venv/bin/python -m instruct.run template=alpaca lora.rank=16"
    test = planned("test", 'ARGS=-m "not slow"')
    assert test[-1] == '.venv/bin/python -m pytest -m "not slow"'
    # Set-up comes first only when .venv is not ready: then it is built with setup.sh.
    ready = (REPO / ".venv" / ".setup-done").is_file()
    assert ready or any("bash setup.sh" in line for line in run[:-1])
