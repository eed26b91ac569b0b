"""Records -> examples: check one raw record and normalise it, or name it in the error.

An example is a plain dict: ``{"instruction", "input"?, "output"}`` or ``{"messages": [...]}``,
with optional ``"id"`` and ``"domain"``; examples loaded for a run also carry ``"where"`` (the
record's origin, as errors name it) and, in a mixture, ``"source"`` (its source's label).
Templates read only the content keys, so neither changes what is rendered or trained.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from instruct.errors import UserError

Example = dict[str, Any]

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "tool": "tool",  # a tool's result: prompt, never trained (template=native only)
}
# The roles of a normalised message ("tool": template=native only).
ROLES = ("system", "user", "assistant", "tool")
# Common public layouts, tried in order: (their key, our key).
FIELD_ALIASES = [
    ("context", "input"),  # Dolly
    ("response", "output"),  # Dolly
    ("prompt", "instruction"),  # prompt/completion
    ("completion", "output"),
]
# A source's system prompt joins instruction and input as TemplateConfig's default does.
INPUT_JOIN = "{instruction}\n\n{input}"


class DataError(UserError, ValueError):
    """A record that cannot be used; the message names the file, line and field."""


def normalise(record: Any, where: str, columns: Mapping[str, str] | None = None) -> Example:
    """Turn one raw record into an example, or raise :class:`DataError` naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    record = {(columns or {}).get(k, k): v for k, v in record.items()}
    meta = {k: record[k] for k in ("id", "domain") if k in record}
    if "conversations" in record and "messages" not in record:  # ShareGPT
        record["messages"] = [
            {
                "role": turn.get("from"),
                "content": turn.get("value"),
                **{k: turn[k] for k in TURN_KEYS if k in turn},
            }
            if isinstance(turn, dict)
            else turn
            for turn in _list_field(record, "conversations", where)
        ]
    if "messages" in record:
        messages = _messages(_list_field(record, "messages", where), where)
        return {"messages": messages, **record_tools(record, where), **meta}
    for theirs, ours in FIELD_ALIASES:
        if ours not in record and theirs in record:
            record[ours] = record[theirs]
    if "instruction" not in record or "output" not in record:
        raise DataError(
            f"{where}: record has keys {sorted(map(str, record))}; expected instruction + output "
            "(+ optional input), messages, or conversations. Map other names with "
            "data.columns, e.g. +data.columns={question:instruction,answer:output}"
        )
    example = {k: _text_field(record, k, where) for k in ("instruction", "output")}
    if record.get("input") not in (None, ""):
        example["input"] = _text_field(record, "input", where)
    if not example["instruction"].strip() or not example["output"].strip():
        raise DataError(f"{where}: instruction and output must not be empty")
    return {**example, **meta}


def with_system(example: Example, system: str | None) -> Example:
    """``example`` with the system prompt ``system`` (a source's), unless it has its own.

    An instruction/input/output example becomes a conversation (system, user, assistant),
    its input joined as :data:`INPUT_JOIN`: the template's own preamble is what the source's
    prompt replaces, and a conversation is the one form every template renders as it is.
    """
    if not system:
        return example
    meta = {k: v for k, v in example.items() if k not in ("instruction", "input", "output")}
    if "messages" in example:
        messages = example["messages"]
        if messages and messages[0]["role"] == "system":
            return example
        return {**meta, "messages": [{"role": "system", "content": system}, *messages]}
    user = example["instruction"]
    if example.get("input"):
        user = INPUT_JOIN.format(instruction=user, input=example["input"])
    turns = [("system", system), ("user", user), ("assistant", example["output"])]
    return {**meta, "messages": [{"role": r, "content": c} for r, c in turns]}


def _text_field(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _list_field(record: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = record[key]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} must be a non-empty list")
    return value


# Per-message keys that say whether (and how much) a turn is trained: data.train_on=per_message.
TURN_KEYS = ("train", "weight")


def _turn_fields(turn: Mapping[str, Any], i: int, where: str) -> dict[str, Any]:
    """A message's ``train`` (a bool) and ``weight`` (a number in [0, 1]), checked; the
    config decides later whether they may be there (:func:`instruct.data.turns.turn_weights`)."""
    fields: dict[str, Any] = {}
    # None counts as absent: Parquet's struct columns hold every key for every message.
    if turn.get("train") is not None:
        if not isinstance(turn["train"], bool):
            raise DataError(
                f"{where}: message {i}: key 'train' must be true or false, got {turn['train']!r}"
            )
        fields["train"] = turn["train"]
    if turn.get("weight") is not None:
        w = turn["weight"]
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= 1:
            raise DataError(
                f"{where}: message {i}: key 'weight' must be a number in [0, 1], got {w!r}"
            )
        fields["weight"] = float(w)
    return fields


def _messages(turns: list[Any], where: str) -> list[dict[str, Any]]:
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: message {i} must be an object with role and content")
        role = ROLE_ALIASES.get(str(turn.get("role")).lower())
        if role is None:
            raise DataError(
                f"{where}: message {i} has role {turn.get('role')!r}; expected one of "
                f"{sorted(ROLE_ALIASES)}"
            )
        extra = message_extras(turn, role, i, where)
        content = turn.get("content")
        if content is None and "tool_calls" in extra:  # OpenAI: a tool call's content is null
            content = ""
        if problem := broken_rule(i, role, content):
            raise DataError(f"{where}: {problem}")
        messages.append({"role": role, "content": content, **extra, **_turn_fields(turn, i, where)})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message to train on")
    return messages


def broken_rule(i: int, role: str, content: Any) -> str | None:
    """The rule message ``i`` breaks of those every conversation keeps, else None: checked on
    records (whose errors name file and line) and on conversations given to a template."""
    if not isinstance(content, str):
        return f"message {i} ({role}): content must be a string, got {type(content).__name__}"
    if role == "system" and i != 0:
        return f"message {i}: a system message may only come first"
    return None


def message_extras(turn: Mapping[str, Any], role: str, i: int, where: str) -> dict[str, Any]:
    """A message's tool and reasoning fields, normalised, or :class:`DataError`.

    Assistant ``tool_calls`` become OpenAI's form, ``{"type": "function", "function":
    {"name", "arguments"}}`` (``id`` kept), with ``arguments`` an object: a JSON string is
    parsed, since templates write it with ``tojson`` and would quote it twice. ``thinking``
    becomes ``reasoning_content``. A tool message keeps ``tool_call_id`` and ``name``. A
    ``None`` or empty value counts as absent, so ``"tool_calls" in message`` (Llama 3.1's
    test) holds only for a message that calls a tool.
    """
    at = f"{where}: message {i} ({role})"
    given = {k: turn[k] for k in TOOL_KEYS if turn.get(k) not in (None, [], "")}
    if role != "tool":  # OpenAI's participant name on other roles: ignored, as it always was
        given = {k: v for k, v in given.items() if k not in ("name", "tool_call_id")}
    wrong = sorted(k for k in given if role not in TOOL_KEYS[k])
    if wrong:
        raise DataError(f"{at}: {wrong[0]!r} belongs on a message of role {TOOL_KEYS[wrong[0]][0]}")
    if "thinking" in given and "reasoning_content" in given:
        raise DataError(f"{at}: give reasoning_content or thinking, not both")
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key == "tool_calls":
            if not isinstance(value, list):
                raise DataError(f"{at}: field 'tool_calls' must be a list")
            value = [_tool_call(c, f"{at}: tool_calls[{k}]") for k, c in enumerate(value)]
        elif not isinstance(value, str):
            raise DataError(f"{at}: field {key!r} must be a string")
        out["reasoning_content" if key == "thinking" else key] = value
    return out


# The tool and reasoning fields of a message, and the roles that may carry each.
TOOL_KEYS = {
    "tool_calls": ("assistant",),
    "reasoning_content": ("assistant",),
    "thinking": ("assistant",),
    "tool_call_id": ("tool",),
    "name": ("tool",),
}


def record_tools(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"tools": [...]}`` for a record with a ``tools`` list (JSON-schema function specs,
    as ``apply_chat_template(tools=...)`` takes them; a JSON string of the list is parsed),
    else ``{}``."""
    tools = record.get("tools")
    if tools in (None, [], ""):
        return {}
    if isinstance(tools, str):
        tools = _json(tools, f"{where}: field 'tools'")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: field 'tools' must be a list of function specs (objects)")
    for k, t in enumerate(tools):
        spec = t.get("function", t)
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise DataError(f"{where}: tools[{k}] has no function name")
    return {"tools": tools}


def _tool_call(call: Any, at: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise DataError(f"{at} must be an object")
    function = call.get("function", call)  # {"name", "arguments"} alone is accepted too
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise DataError(f"{at} has no function name")
    arguments = function.get("arguments")
    arguments = {} if arguments is None else arguments  # no arguments (Parquet writes null)
    if isinstance(arguments, str):
        arguments = _json(arguments, f"{at}: arguments") if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise DataError(f"{at}: arguments must be an object or a JSON string of one")
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    return {**out, "id": call["id"]} if isinstance(call.get("id"), str) else out


def _json(text: str, at: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{at} is not valid JSON ({err})") from err
