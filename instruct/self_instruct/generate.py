"""Generation: requests through the shared OpenAI-compatible client, each candidate filtered
and appended as it is accepted, so a killed run resumes where it stopped."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from instruct.data.readers import load_records
from instruct.data.records import DataError
from instruct.openai_client import (
    ChatClient,
    ClientError,
    ClientSettings,
    Completion,
    RequestFailed,
    gather_or_cancel,
)
from instruct.self_instruct.dataset import (
    META_FILE,
    REJECTED_FILE,
    TASKS_FILE,
    dataset_dir,
    read_accepted,
    seed_path,
    settings_of,
)
from instruct.self_instruct.dedup import RougeIndex
from instruct.self_instruct.filters import blacklist_pattern, cheap_filter, task_key
from instruct.self_instruct.parse import PROMPT, parse_reply, tasks_schema

# One logger for the package, named as when it was one module (the log lines' prefix).
log = logging.getLogger(__package__)

# Responses without one accepted task after which a run stops with the rejection reasons.
DIAGNOSE_AFTER = 40

# The errors that stop generation (a bad key, an unknown model, a model that never follows
# the format); the name callers have always caught.
GenerationError = ClientError


@dataclass
class Stats:
    """Counts over every session on one data set (requests and tokens from earlier ones)."""

    requests: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    candidates: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> count

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rejected": dict(sorted(self.rejected.items()))}


@dataclass
class Generator:
    """One generation session: the pool, the output files, the counts."""

    cfg: Any
    folder: Path
    seeds: list[dict[str, Any]]
    accepted: list[dict[str, Any]]
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.cfg.generation_seed + len(self.accepted))
        self.index = RougeIndex([t["instruction"] for t in self.seeds + self.accepted])
        self.keys = {task_key(t) for t in self.seeds + self.accepted}
        self.blacklist = blacklist_pattern(list(self.cfg.blacklist))
        self.tasks_file = open(self.folder / TASKS_FILE, "a", encoding="utf-8")
        self.rejected_file = open(self.folder / REJECTED_FILE, "a", encoding="utf-8")
        self.stats.accepted = len(self.accepted)

    def close(self) -> None:
        self.tasks_file.close()
        self.rejected_file.close()

    def prompt(self) -> str:
        examples = self.rng.sample(
            self.seeds + self.accepted, min(self.cfg.num_examples_in_prompt, len(self.seeds))
        )
        shown = "\n".join(
            json.dumps(
                {k: e.get(k, "") for k in ("instruction", "input", "output")}, ensure_ascii=False
            )
            for e in examples
        )
        return PROMPT.format(k=len(examples), n=self.cfg.num_tasks_per_request, examples=shown)

    def reject_response(self, completion: Completion, problems: Counter) -> None:
        """Keep what could not be parsed from one response, with its raw text."""
        self.stats.rejected.update(problems)
        row = {
            "reason": problems.most_common(1)[0][0],
            "problems": dict(problems),
            "finish_reason": completion.finish_reason,
            "response_seq": completion.seq,  # the row of responses.jsonl it came from
            "raw": completion.content,
        }
        self.rejected_file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.rejected_file.flush()

    def consider(self, task: dict[str, str]) -> bool:
        """Filter one candidate; append it to the data set or to the rejects. Accepted?"""
        self.stats.candidates += 1
        reason = cheap_filter(task, self.cfg, self.blacklist)
        similar, score = None, None
        if reason is None and task_key(task) in self.keys:
            reason = "duplicate"
        if reason is None:
            score, idx = self.index.most_similar(task["instruction"], self.cfg.similarity_threshold)
            if idx is not None and score >= self.cfg.similarity_threshold:
                reason, similar = "similar", (self.seeds + self.accepted)[idx]["instruction"]
        if reason is not None:
            self.stats.rejected[reason] += 1
            row = {"reason": reason, **task, "most_similar": similar, "rouge_l": score}
            self.rejected_file.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.rejected_file.flush()
            return False
        record = {"id": f"si-{len(self.accepted) + 1:06d}", **task}
        self.tasks_file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.tasks_file.flush()
        os.fsync(self.tasks_file.fileno())
        self.accepted.append(record)
        self.index.add(task["instruction"])
        self.keys.add(task_key(task))
        self.stats.accepted += 1
        return True


async def _generate(gen: Generator, client: ChatClient, target: int, bar: tqdm) -> None:
    cfg, stats = gen.cfg, gen.stats
    accepted_before = stats.accepted

    async def worker() -> None:
        # As many workers as data.concurrency; the client's adaptive limit decides how many
        # of their requests are in flight at once.
        while stats.accepted < target:
            try:
                completion = await client.complete(
                    [{"role": "user", "content": gen.prompt()}],
                    parse_reply,
                    max_tokens=cfg.max_tokens,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                )
            except RequestFailed as error:
                log.warning("%s", error)
                continue
            tasks, problems = completion.value
            if problems:
                gen.reject_response(completion, problems)
            for task in tasks:
                if stats.accepted >= target:
                    break
                if gen.consider(task):
                    bar.update(1)
            bar.set_postfix(requests=client.counts.requests, rejected=sum(stats.rejected.values()))
            _diagnose(gen, client, accepted_before)

    await gather_or_cancel(worker() for _ in range(cfg.concurrency))


def _diagnose(gen: Generator, client: ChatClient, accepted_before: int) -> None:
    """Stop when :data:`DIAGNOSE_AFTER` responses parsed yet gave no acceptable task."""
    if client.counts.ok < DIAGNOSE_AFTER or gen.stats.accepted > accepted_before:
        return
    if client.counts.parsed == 0:
        return  # the client's own diagnosis (nothing parses) names the cause better
    reasons = ", ".join(f"{n} {r}" for r, n in gen.stats.rejected.most_common(5))
    raise GenerationError(
        f"0 tasks accepted from {client.counts.ok} responses (rejected: {reasons}); "
        f"see {gen.folder / REJECTED_FILE}"
    )


def meta_of(
    cfg: Any, settings: dict[str, Any], gen: Generator, client: ChatClient
) -> dict[str, Any]:
    """Self-Instruct's part of meta.json: settings, target, counts over every session."""
    stats = gen.stats.as_dict()
    counts = client.counts
    stats["requests"] += counts.requests
    stats["failed_requests"] += counts.failed + counts.timeouts
    stats["prompt_tokens"] += counts.prompt_tokens
    stats["completion_tokens"] += counts.completion_tokens
    cost = None
    if cfg.price_input_per_mtok is not None and cfg.price_output_per_mtok is not None:
        cost = (stats["prompt_tokens"] * cfg.price_input_per_mtok
                + stats["completion_tokens"] * cfg.price_output_per_mtok) / 1e6  # fmt: skip
    return {
        "settings": settings,
        "base_url": cfg.base_url,
        "api_key_env": cfg.api_key_env,  # the variable's name only, never its value
        "target": cfg.num_instructions,
        "stats": stats,
        "estimated_cost_usd": cost,
    }


def check_settings(cfg: Any) -> None:
    """Range checks that name their key, before any request is made."""
    rules = [
        ("num_instructions", cfg.num_instructions >= 1, "at least 1"),
        ("num_examples_in_prompt", cfg.num_examples_in_prompt >= 1, "at least 1"),
        ("num_tasks_per_request", cfg.num_tasks_per_request >= 1, "at least 1"),
        ("concurrency", cfg.concurrency >= 1, "at least 1"),
        ("request_timeout", cfg.request_timeout > 0, "positive"),
        ("max_retries", cfg.max_retries >= 0, "0 or more"),
        ("max_failed_requests", cfg.max_failed_requests >= 1, "at least 1"),
        ("similarity_threshold", 0 < cfg.similarity_threshold <= 1, "in (0, 1]"),
    ]
    bad = [f"data.{key} must be {expected}" for key, ok, expected in rules if not ok]
    if bad:
        raise ValueError("invalid config: " + "; ".join(bad))


def ensure_dataset(cfg: Any) -> Path:
    """The data set for ``cfg``: reused when complete, else generated or resumed to target."""
    check_settings(cfg)
    ClientSettings.from_config(cfg).api_key()  # a missing key fails before any file is made
    seeds_file = seed_path(cfg)
    seeds = [t for t in load_records([seeds_file]) if "instruction" in t]
    if not seeds:
        raise DataError(f"{seeds_file}: no instruction/output seed tasks")
    seeds_hash = hashlib.sha256(seeds_file.read_bytes()).hexdigest()
    settings = settings_of(cfg, seeds_hash)
    folder = dataset_dir(cfg, settings)
    folder.mkdir(parents=True, exist_ok=True)
    accepted = read_accepted(folder / TASKS_FILE)
    previous = _previous_stats(folder)
    if len(accepted) >= cfg.num_instructions:
        log.info("reusing %s: %d tasks generated with the same settings", folder, len(accepted))
        return folder
    if accepted:
        log.info("resuming %s at %d / %d tasks", folder, len(accepted), cfg.num_instructions)
    client_settings = ClientSettings.from_config(cfg)
    gen = Generator(cfg, folder, seeds, accepted, previous)
    client = ChatClient(
        client_settings,
        folder,
        tasks_schema(cfg.num_tasks_per_request),
        "tasks",
        extra_meta=lambda: meta_of(cfg, settings, gen, client),
    )
    bar = tqdm(total=cfg.num_instructions, initial=len(accepted), desc="accepted", unit="task")

    async def run() -> None:
        try:
            await _generate(gen, client, cfg.num_instructions, bar)
        finally:
            await client.aclose()

    try:
        with client.session():
            asyncio.run(run())
    finally:
        bar.close()
        gen.close()
        log.info("self-instruct: %s", json.dumps(meta_of(cfg, settings, gen, client)["stats"]))
    return folder


def _previous_stats(folder: Path) -> Stats:
    """Counts from earlier sessions on this data set, so meta.json covers all of them."""
    path = folder / META_FILE
    if not path.is_file():
        return Stats()
    old = json.loads(path.read_text(encoding="utf-8")).get("stats", {})
    rejected = Counter(old.pop("rejected", {}))
    old.pop("accepted", None)
    return Stats(**{k: v for k, v in old.items() if k in Stats.__dataclass_fields__},
                 rejected=rejected)  # fmt: skip


def load_self_instruct(cfg: Any) -> tuple[list[dict[str, Any]], None]:
    """The ``self_instruct`` data source: generate (or reuse), then the first N tasks."""
    folder = ensure_dataset(cfg)
    tasks = load_records([folder / TASKS_FILE])[: cfg.num_instructions]
    return tasks, None
