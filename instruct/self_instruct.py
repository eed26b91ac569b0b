"""Self-Instruct data generation through any OpenAI-compatible chat-completions API.

``python -m instruct.self_instruct data.num_instructions=500`` grows a data set from the seed
tasks, as in Self-Instruct (Wang et al. 2022) and Stanford Alpaca: each request shows a few
sampled tasks and asks for a batch of new ones as JSON; every candidate passes a chain of
filters, each counted by reason, the last being ROUGE-L similarity with every instruction
already in the pool. Accepted tasks are appended and flushed one by one, so a killed run
resumes where it stopped. The API key is read from the environment and written nowhere.

Requests go through :class:`instruct.openai_client.ChatClient`: the tasks are asked for as
JSON matching :func:`tasks_schema` in whichever structured-output form the server accepts,
every raw response lands in ``responses.jsonl`` and every unusable one, with its text, in
``rejected.jsonl``; ``meta.json`` holds the counts and why the run ended, however it ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from instruct.config import CONFIG_MODULE, HYDRA_VERSION_BASE, register_schemas
from instruct.data import DataError, load_records
from instruct.data.rouge import RougeIndex
from instruct.openai_client import (
    ChatClient,
    ClientError,
    ClientSettings,
    Completion,
    RequestFailed,
    gather_or_cancel,
)

log = logging.getLogger(__name__)

TASKS_FILE, REJECTED_FILE, META_FILE = "tasks.jsonl", "rejected.jsonl", "meta.json"
# Settings that change what is generated; the rest (target count, concurrency, timeouts, the
# key's variable, prices) can change between runs without starting a new data set.
GENERATION_KEYS = (
    "model", "num_examples_in_prompt", "num_tasks_per_request", "temperature", "top_p",
    "max_tokens", "generation_seed", "min_instruction_words", "max_instruction_words",
    "min_output_words", "max_output_words", "similarity_threshold", "blacklist",
)  # fmt: skip
KEY_ALIASES = {
    "instruction": ("instruction", "task", "prompt", "question"),
    "input": ("input", "context", "inputs"),
    "output": ("output", "response", "answer", "completion"),
}
# Bump when PROMPT or the schema changes, so old data sets are not reused by mistake.
# 2: the tasks come wrapped as {"tasks": [...]}, the root object structured output needs.
PROMPT_VERSION = 2
PROMPT = """\
You are helping to build a diverse, high-quality data set for training a helpful, text-only \
AI assistant. Here are {k} example tasks, as JSON:

{examples}

Write {n} new tasks that differ from these and from each other. Requirements:
- Vary the kind of task: open questions, explanations, writing, code, math with worked steps, \
classification, information extraction, rewriting, advice, brainstorming.
- Vary the verbs and the phrasing; each instruction is one or two sentences in English.
- A text-only model must be able to do the task: nothing that needs images, audio, video, \
files, web browsing or actions in the world.
- "input" holds the material the task works on (a passage, a code snippet, a table) when \
the instruction needs one, and is "" otherwise. Use an input for about a third of the tasks.
- "output" is a correct, complete and well-written response to the instruction and input.

Reply with only a JSON object {{"tasks": [...]}} whose list holds {n} objects, each with the \
keys "instruction", "input" and "output"."""
# Responses without one accepted task after which a run stops with the rejection reasons.
DIAGNOSE_AFTER = 40

# The errors that stop generation (a bad key, an unknown model, a model that never follows
# the format); the name callers have always caught.
GenerationError = ClientError


def tasks_schema(n: int) -> dict[str, Any]:
    """The JSON Schema of a reply: ``{"tasks": [{"instruction", "input", "output"}, ...]}``
    with 1 to ``n`` tasks.

    An object at the root and every key required, without extras: OpenAI's strict
    structured outputs accept no less. ``maxItems`` keeps a grammar-constrained small model
    (llama.cpp) from listing tasks until ``max_tokens`` cuts it off.
    """
    task = {
        "type": "object",
        "properties": {k: {"type": "string"} for k in ("instruction", "input", "output")},
        "required": ["instruction", "input", "output"],
        "additionalProperties": False,
    }
    tasks = {"type": "array", "items": task, "minItems": 1, "maxItems": n}
    return {
        "type": "object",
        "properties": {"tasks": tasks},
        "required": ["tasks"],
        "additionalProperties": False,
    }


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


# ---------------------------------------------------------------------------- parsing


def _strip_trailing_commas(text: str) -> str:
    return re.sub(r",\s*([\]}])", r"\1", text)


def _decode_object(text: str, start: int) -> tuple[Any, int] | None:
    """The JSON value starting at ``start`` and where it ends; None when it does not parse.

    A second try drops trailing commas up to the first ``}`` (``{"a": "b",}``).
    """
    try:
        return json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        close = text.find("}", start)
        if close < 0:
            return None
        try:
            return json.loads(_strip_trailing_commas(text[start : close + 1])), close + 1
        except json.JSONDecodeError:
            return None


def parse_tasks(text: str, cut_off: bool = False) -> tuple[list[dict[str, str]], Counter]:
    """Tasks from a model's reply, and counts of what could not be used, by reason.

    Tolerates code fences, prose around the JSON, trailing commas, a ``{"tasks": [...]}``
    wrapper and other key names (``response`` for ``output``, ...). When the reply was cut
    off (``finish_reason == "length"``), the complete items are kept and the cut one, the last
    that fails to parse, is counted as ``cut_off``; other unparseable objects as ``malformed``.
    """
    problems: Counter = Counter()
    items: list[Any] = []
    pos, last_failed = 0, False
    while (start := text.find("{", pos)) >= 0:
        decoded = _decode_object(text, start)
        if decoded is None:
            problems["malformed"] += 1
            close = text.find("}", start)
            pos, last_failed = (close + 1 if close >= 0 else len(text)), True
            continue
        obj, pos = decoded
        last_failed = False
        if isinstance(obj, dict) and isinstance(obj.get("tasks"), list):
            items.extend(obj["tasks"])
        else:
            items.append(obj)
    if cut_off and last_failed:
        problems["malformed"] -= 1
        problems["cut_off"] += 1
    if not items and not problems:
        problems["unparseable"] += 1
    tasks = []
    for item in items:
        task = _normalise_task(item)
        if task is None:
            problems["bad_format"] += 1
        else:
            tasks.append(task)
    return tasks, +problems


def parse_reply(text: str, cut_off: bool) -> tuple[tuple[list[dict[str, str]], Counter], str]:
    """:func:`parse_tasks` as a :class:`~instruct.openai_client.ChatClient` parser: the tasks
    and problems, and "ok" when at least one task came out, else the main problem."""
    tasks, problems = parse_tasks(text, cut_off)
    outcome = "ok" if tasks else (problems.most_common(1)[0][0] if problems else "no_tasks")
    return (tasks, problems), outcome


def _normalise_task(item: Any) -> dict[str, str] | None:
    if not isinstance(item, dict):
        return None
    lowered = {str(k).strip().lower(): v for k, v in item.items()}
    task = {}
    for key, aliases in KEY_ALIASES.items():
        value = next((lowered[a] for a in aliases if a in lowered), "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            return None
        task[key] = value.strip()
    if not task["instruction"] or not task["output"]:
        return None
    return task


# ---------------------------------------------------------------------------- filters


def _words(text: str) -> list[str]:
    return text.split()


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def cheap_filter(task: dict[str, str], cfg: Any, blacklist: re.Pattern[str]) -> str | None:
    """The reason to reject ``task`` before the similarity check, or None to keep it."""
    instruction, output = task["instruction"], task["output"]
    n = len(_words(instruction))
    if n < cfg.min_instruction_words or n > cfg.max_instruction_words:
        return "instruction_length"
    if blacklist.search(instruction):
        return "blacklist"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_non_ascii"
    n = len(_words(output))
    if n < cfg.min_output_words or n > cfg.max_output_words:
        return "output_length"
    norm_out, norm_inst = _norm(output), _norm(instruction)
    if norm_out == norm_inst or (norm_inst in norm_out and len(norm_out) < 1.2 * len(norm_inst)):
        return "output_repeats_instruction"
    if output.rstrip().endswith(("...", "\u2026", "etc.", "etc")):
        return "output_truncated"
    return None


def blacklist_pattern(words: list[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w.lower()) for w in words) or "(?!)"
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)


def task_key(task: dict[str, str]) -> str:
    return _norm(task["instruction"]) + "\x00" + _norm(task.get("input", ""))


# ---------------------------------------------------------------------------- files


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


# ---------------------------------------------------------------------------- generation


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


def provenance(cfg: Any) -> dict[str, Any] | None:
    """``meta.json`` of the data set ``cfg`` names (for the training run's W&B summary)."""
    seeds_hash = hashlib.sha256(seed_path(cfg).read_bytes()).hexdigest()
    path = dataset_dir(cfg, settings_of(cfg, seeds_hash)) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


@hydra.main(
    config_path=f"pkg://{CONFIG_MODULE}", config_name="self_instruct",
    version_base=HYDRA_VERSION_BASE,
)  # fmt: skip
def main(cfg: DictConfig) -> None:
    folder = ensure_dataset(cfg.data)
    print(f"data set: {folder / TASKS_FILE}")


if __name__ == "__main__":
    register_schemas()
    main()
