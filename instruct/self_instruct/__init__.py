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

The package: :mod:`~instruct.self_instruct.parse` (the prompt, the schema, reading replies),
:mod:`~instruct.self_instruct.filters` (cheap filters, exact duplicates),
:mod:`~instruct.self_instruct.dedup` (ROUGE-L near duplicates),
:mod:`~instruct.self_instruct.dataset` (the data set's folder and files),
:mod:`~instruct.self_instruct.generate` (the requests and the pool) and
:mod:`~instruct.self_instruct.cli` (the command).
"""

from instruct.self_instruct.dataset import (
    GENERATION_KEYS,
    META_FILE,
    REJECTED_FILE,
    TASKS_FILE,
    dataset_dir,
    provenance,
    read_accepted,
    seed_path,
    settings_of,
)
from instruct.self_instruct.filters import blacklist_pattern, cheap_filter, task_key
from instruct.self_instruct.generate import (
    DIAGNOSE_AFTER,
    GenerationError,
    Generator,
    Stats,
    check_settings,
    ensure_dataset,
    load_self_instruct,
    meta_of,
)
from instruct.self_instruct.parse import (
    KEY_ALIASES,
    PROMPT,
    PROMPT_VERSION,
    parse_reply,
    parse_tasks,
    tasks_schema,
)

__all__ = [
    "DIAGNOSE_AFTER",
    "GENERATION_KEYS",
    "KEY_ALIASES",
    "META_FILE",
    "PROMPT",
    "PROMPT_VERSION",
    "REJECTED_FILE",
    "TASKS_FILE",
    "GenerationError",
    "Generator",
    "Stats",
    "blacklist_pattern",
    "check_settings",
    "cheap_filter",
    "dataset_dir",
    "ensure_dataset",
    "load_self_instruct",
    "meta_of",
    "parse_reply",
    "parse_tasks",
    "provenance",
    "read_accepted",
    "seed_path",
    "settings_of",
    "tasks_schema",
    "task_key",
]
