"""What a run ran on: package versions, the project's commit, Python, OS, CPU and GPU.

``results.json`` keeps it under ``"environment"`` and the W&B run's config under the same
key, so a result can be traced to the code and machine that made it, and
``python -m instruct.report`` can warn when the jobs of one sweep did not run on the same
code (:func:`differences`).
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from instruct.compat import installed_versions

PROJECT = Path(__file__).resolve().parents[1]  # the clone's root, when run from one


def environment(project: Path = PROJECT) -> dict[str, Any]:
    """The environment of this process, as plain JSON values."""
    return {
        "versions": installed_versions(),
        "git": git_state(project),
        "python": platform.python_version(),
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        **accelerators(),
    }


def git_state(project: Path) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the clone ``project`` is, or None when it is none (a wheel
    install) or git is missing. Dirty: a tracked file differs from the commit."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(project), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != project.resolve():
        return None  # not a clone, or this package sits inside another project's repository
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return None
    return {"commit": commit, "dirty": bool(status)}


def cpu_model() -> str:
    """The CPU's marketing name where the OS tells it, else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and value.strip():
                return value.strip()
    if platform.system() == "Darwin":
        try:
            done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=10)  # fmt: skip
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return platform.processor() or platform.machine()


def accelerators() -> dict[str, Any]:
    """GPU model names and count, and the CUDA (or ROCm) version torch was built with."""
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        gpus = ["Apple MPS"]
    return {
        "gpus": gpus,
        "gpu_count": len(gpus),
        "cuda": torch.version.cuda,
        "rocm": getattr(torch.version, "hip", None),
    }


def differences(environments: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
    """What differs, between jobs (by name), in package versions or the project's commit:
    one line per difference, naming the jobs of each value. Jobs that record no environment
    are named once."""
    out = []
    missing = sorted(name for name, env in environments.items() if not env)
    present = {name: env for name, env in environments.items() if env}
    if missing and present:
        out.append(f"jobs {', '.join(missing)} record no environment (run before it was kept)")
    packages = sorted({p for env in present.values() for p in env.get("versions", {})})
    for package in packages:
        values = {name: env.get("versions", {}).get(package) for name, env in present.items()}
        out += _differs(f"{package} version", values)
    commits = {name: _commit(env.get("git")) for name, env in present.items()}
    out += _differs("project commit", commits)
    return out


def _commit(git: Mapping[str, Any] | None) -> str | None:
    if not git:
        return None
    return git["commit"][:12] + (" (dirty)" if git.get("dirty") else "")


def _differs(what: str, values: Mapping[str, Any]) -> Sequence[str]:
    by_value: dict[Any, list[str]] = {}
    for name, value in values.items():
        by_value.setdefault(value, []).append(name)
    if len(by_value) < 2:
        return []
    parts = [f"{value or 'none'} ({', '.join(sorted(names))})" for value, names in by_value.items()]
    return [f"{what} differs: " + "; ".join(sorted(parts))]
