"""What a request asks the model for, and reading its reply: the prompt, the JSON Schema of
the tasks, and a tolerant parser of the tasks in a reply."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

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
