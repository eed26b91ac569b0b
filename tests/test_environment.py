"""What a run records of its environment, and the report's warning when jobs differ in it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import pytest

from instruct.compat import installed_versions
from instruct.environment import differences, environment, git_state
from instruct.reporting import find_jobs, rank
from tests.test_report import COMMON, fake_results, write_job


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True)  # fmt: skip
    return done.stdout.strip()


@pytest.fixture
def clone(tmp_path) -> Path:
    repo = tmp_path / "project"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    git(repo, "add", "code.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    return repo


def test_a_clone_records_its_commit_and_whether_a_tracked_file_changed(clone):
    head = git(clone, "rev-parse", "HEAD")
    assert git_state(clone) == {"commit": head, "dirty": False}
    (clone / "notes.txt").write_text("untracked files do not make it dirty\n")
    assert git_state(clone) == {"commit": head, "dirty": False}
    (clone / "code.py").write_text("x = 2\n")
    assert git_state(clone) == {"commit": head, "dirty": True}


def test_no_commit_outside_a_clone_or_inside_another_projects_repository(clone, tmp_path):
    plain = tmp_path / "site-packages"
    plain.mkdir()
    assert git_state(plain) is None
    inside = clone / "vendored"  # a folder of some other repository: not our commit
    inside.mkdir()
    assert git_state(inside) is None


def test_the_environment_names_versions_machine_and_accelerators():
    env = environment()
    json.dumps(env)  # plain JSON values only
    assert env["versions"] == installed_versions()
    assert {"torch", "transformers", "peft", "accelerate", "tokenizers", "instruct"} <= set(
        env["versions"]
    )
    assert env["python"] == platform.python_version()
    assert env["cpu_cores"] == os.cpu_count()
    assert isinstance(env["cpu"], str) and env["cpu"]
    assert env["gpu_count"] == len(env["gpus"])
    # This checkout is a clone: the commit it records is its HEAD.
    repo = Path(__file__).resolve().parents[1]
    if (repo / ".git").exists():
        assert env["git"]["commit"] == git(repo, "rev-parse", "HEAD")


def env_of(torch: str, commit: str, dirty: bool = False) -> dict:
    return {"versions": {"torch": torch, "peft": "0.17.0"},
            "git": {"commit": commit, "dirty": dirty}}  # fmt: skip


def test_differences_name_each_value_and_its_jobs():
    same = {"a": env_of("2.13.0", "c" * 40), "b": env_of("2.13.0", "c" * 40)}
    assert differences(same) == []
    found = differences({"a": env_of("2.13.0", "c" * 40), "b": env_of("2.12.1", "d" * 40, True),
                         "c": env_of("2.13.0", "c" * 40)})  # fmt: skip
    assert found == [
        "torch version differs: 2.12.1 (b); 2.13.0 (a, c)",
        f"project commit differs: {'c' * 12} (a, c); {'d' * 12} (dirty) (b)",
    ]
    old = differences({"a": env_of("2.13.0", "c" * 40), "old": None})
    assert old == ["jobs old record no environment (run before it was kept)"]


def test_the_report_warns_when_the_jobs_of_a_sweep_ran_on_other_code(tmp_path):
    root = tmp_path / "sweep"
    for i, commit in enumerate(("a" * 40, "b" * 40)):
        job = write_job(root, i, [*COMMON, f"optimizer.lr=1e-{i + 3}"])
        results = {**fake_results(2.0 + i, i), "val_fingerprint": "same",
                   "environment": env_of("2.13.0", commit)}  # fmt: skip
        (job / "results.json").write_text(json.dumps(results), encoding="utf-8")
    (warning,) = rank(find_jobs(root)).warnings
    assert "did not all run on the same code" in warning
    assert f"project commit differs: {'a' * 12} (0); {'b' * 12} (1)" in warning
    results = json.loads((root / "1" / "results.json").read_text())
    results["environment"] = env_of("2.13.0", "a" * 40)
    (root / "1" / "results.json").write_text(json.dumps(results), encoding="utf-8")
    assert rank(find_jobs(root)).warnings == []
