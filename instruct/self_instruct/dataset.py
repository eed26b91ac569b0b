"""A generated data set on disk: its folder (named by the settings that shape it), the seed
tasks, the accepted tasks so far and the record of how it was made (``meta.json``)."""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from instruct.data.records import DataError
from instruct.self_instruct.parse import PROMPT_VERSION

# One logger for the package, named as when it was one module (the log lines' prefix).
log = logging.getLogger(__package__)

TASKS_FILE, REJECTED_FILE, META_FILE = "tasks.jsonl", "rejected.jsonl", "meta.json"
# Settings that change what is generated; the rest (target count, concurrency, timeouts, the
# key's variable, prices) can change between runs without starting a new data set.
GENERATION_KEYS = (
    "model", "num_examples_in_prompt", "num_tasks_per_request", "temperature", "top_p",
    "max_tokens", "generation_seed", "min_instruction_words", "max_instruction_words",
    "min_output_words", "max_output_words", "similarity_threshold", "blacklist",
)  # fmt: skip


def settings_of(cfg: Any, seeds_hash: str) -> dict[str, Any]:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    settings = {k: resolved[k] for k in GENERATION_KEYS}
    return {**settings, "seed_pool_sha256": seeds_hash, "prompt_version": PROMPT_VERSION}


def dataset_dir(cfg: Any, settings: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.out_dir) / digest


def seed_path(cfg: Any) -> Path:
    if cfg.seed_path:
        return Path(cfg.seed_path)
    return Path(str(resources.files("instruct.data").joinpath("seed_tasks.jsonl")))


def read_accepted(path: Path) -> list[dict[str, Any]]:
    """Accepted tasks so far; a torn last line (a kill mid-write) is dropped with a warning."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tasks, good = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            tasks.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            if i < len(lines) - 1 and any(rest.strip() for rest in lines[i + 1 :]):
                raise DataError(
                    f"{path}:{i + 1}: corrupt line in the middle of the file"
                ) from error
            log.warning("%s:%d: torn last line dropped (the previous run was killed)", path, i + 1)
            with open(path, "r+b") as f:
                f.truncate(good)
            break
        good += len(line) + 1
    return tasks


def provenance(cfg: Any) -> dict[str, Any] | None:
    """``meta.json`` of the data set ``cfg`` names (for the training run's W&B summary)."""
    seeds_hash = hashlib.sha256(seed_path(cfg).read_bytes()).hexdigest()
    path = dataset_dir(cfg, settings_of(cfg, seeds_hash)) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
