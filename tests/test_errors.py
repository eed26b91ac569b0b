"""User errors end a command with one line and exit status 2; bugs keep their traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from instruct.data.records import DataError
from instruct.errors import ConfigError, UserError, told_as_one_line
from instruct.openai_client import ClientError


def test_a_user_error_is_one_line_and_exit_status_2(capsys):
    with pytest.raises(SystemExit) as stop, told_as_one_line():
        raise DataError("mine.jsonl:3: invalid JSON:\n  Expecting value")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: mine.jsonl:3: invalid JSON: Expecting value\n"


def test_a_bug_keeps_its_traceback_and_full_errors_show_user_errors_too(monkeypatch):
    with pytest.raises(KeyError), told_as_one_line():
        raise KeyError("a bug: not the user's mistake")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError), told_as_one_line():
        raise ConfigError("invalid config: lora.rank must be at least 1, got 0")


def test_the_errors_users_cause_are_user_errors():
    # Still the built-in kinds callers catch, and each one a UserError.
    assert issubclass(DataError, ValueError) and issubclass(DataError, UserError)
    assert issubclass(ConfigError, ValueError) and issubclass(ClientError, UserError)


def run(*args: str, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "instruct.run", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})  # fmt: skip


@pytest.mark.slow
def test_a_malformed_line_of_a_users_file_ends_the_run_with_one_line(tmp_path):
    bad = tmp_path / "mine.jsonl"
    good = json.dumps({"instruction": "Say hi.", "output": "Hi."})
    bad.write_text(f'{good}\n{good}\n{{"instruction": oops\n', encoding="utf-8")
    args = ["model=tiny", "data=file", f"data.paths=[{bad}]", "logger=none",
            f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}:3: invalid JSON"), last
    traced = run(*args, cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert traced.returncode == 1 and "Traceback (most recent call last)" in traced.stderr
    assert "DataError" in traced.stderr


@pytest.mark.slow
def test_a_missing_model_ends_the_run_with_one_line(tmp_path):
    proc = run("model=hf", "model.path=/nonexistent/model", "logger=none",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: model.path: /nonexistent/model does not exist")
    )
