"""How each task of a Self-Instruct data set got in: the filters' verdicts and its nearest
ROUGE-L neighbour, as the generation saw them (for ``python -m instruct.inspect``).

The data set's ``tasks.jsonl`` holds the accepted tasks in the order they were accepted, so
the pool each one was checked against is the seed tasks and the tasks before it. The checks
are run again here on that pool, with the data set's own settings: the same verdicts, and
the exact nearest neighbour (at acceptance only whether one reached the threshold mattered).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from instruct.data.readers import load_records
from instruct.self_instruct.dataset import (
    META_FILE,
    TASKS_FILE,
    dataset_dir,
    read_accepted,
    seed_path,
    settings_of,
)
from instruct.self_instruct.dedup import RougeIndex
from instruct.self_instruct.filters import blacklist_pattern, task_key, verdicts


def data_set_folder(cfg: Any) -> Path:
    """The folder of the data set the data config ``cfg`` names."""
    seeds_hash = hashlib.sha256(seed_path(cfg).read_bytes()).hexdigest()
    return dataset_dir(cfg, settings_of(cfg, seeds_hash))


def task_provenance(cfg: Any) -> dict[str, dict[str, Any]]:
    """Each accepted task's checks by its ID: ``filters`` (name -> passed), ``duplicate``
    (an exact duplicate of an earlier task), and ``nearest`` (the most similar earlier
    instruction, its ROUGE-L F, whether it is a seed) with ``threshold``."""
    folder = data_set_folder(cfg)
    seeds = [t for t in load_records([seed_path(cfg)]) if "instruction" in t]
    tasks = read_accepted(folder / TASKS_FILE)
    pool = [t["instruction"] for t in seeds]
    index, keys = RougeIndex(pool), {task_key(t) for t in seeds}
    blacklist = blacklist_pattern(list(cfg.blacklist))
    out = {}
    for task in tasks:
        score, item = index.most_similar(task["instruction"], 0.0)  # 0: the exact maximum
        out[str(task.get("id"))] = {
            "filters": verdicts(task, cfg, blacklist),
            "duplicate": task_key(task) in keys,
            "nearest": None if item is None else pool[item],
            "nearest_is_seed": item is not None and item < len(seeds),
            "rouge_l": score,
            "threshold": cfg.similarity_threshold,
        }
        index.add(task["instruction"])
        pool.append(task["instruction"])
        keys.add(task_key(task))
    return out


def rejected_counts(cfg: Any) -> dict[str, int]:
    """How many candidates each filter rejected (``meta.json``), for the page's summary."""
    path = data_set_folder(cfg) / META_FILE
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text(encoding="utf-8")).get("stats", {}).get("rejected", {}))
