"""Which turns are trained, and how much: ``data.train_on`` and ``data.train_on_prompt``.

Each message of a conversation gets a weight (:func:`turn_weights`): 0 leaves it untrained,
and a trained turn's token losses are scaled by its weight, so the loss is the weighted mean
``sum(w * loss) / sum(w)`` over the supervised tokens. :func:`instruct.data.templates.render`
turns the weights into weighted character spans.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from instruct.config import TrainOn
from instruct.data.records import TURN_KEYS, DataError
from instruct.data.templates import conversation


def train_on(value: Any) -> TrainOn:
    """``data.train_on`` as a :class:`TrainOn` (an Enum member from Hydra, or its name)."""
    return TrainOn(getattr(value, "value", value))


def turn_weights(
    messages: Sequence[Mapping[str, Any]],
    mode: TrainOn,
    prompt: bool = False,
    where: str = "example",
) -> list[float] | None:
    """Each message's weight, or ``None`` for the default (every reply at 1, nothing else).

    ``per_message`` reads the messages' ``train`` (false: weight 0) and ``weight`` keys
    (checked by :mod:`instruct.data.records`); under another mode either key is an error
    naming ``where`` (the record's file:row) and the key, never silently ignored. So is
    either key on a system or user message when ``prompt`` (``data.train_on_prompt``) is off:
    those messages are never trained then.
    """
    per_message = mode is TrainOn.per_message
    for i, m in enumerate(messages):
        for key in TURN_KEYS:
            if key not in m:
                continue
            if not per_message:
                raise DataError(
                    f"{where}: message {i} has the key {key!r}, which only "
                    f"data.train_on=per_message reads (this run: {mode.value})"
                )
            if m["role"] == "tool":
                raise DataError(
                    f"{where}: message {i} (tool) has the key {key!r}, but a tool's result is "
                    "what the model reads, never what it writes, so it is never trained"
                )
            if m["role"] != "assistant" and not prompt:
                raise DataError(
                    f"{where}: message {i} ({m['role']}) has the key {key!r}, but system and "
                    "user messages are trained only with data.train_on_prompt=true"
                )
    marked = per_message and any(key in m for m in messages for key in TURN_KEYS)
    if mode is TrainOn.all_assistant and not prompt or per_message and not prompt and not marked:
        return None
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    weights = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            w = 0.0  # a tool's result is prompt the model reads, even with train_on_prompt
        elif m["role"] != "assistant":
            w = 1.0 if prompt else 0.0
        elif mode is TrainOn.last_assistant:
            w = 1.0 if i == last else 0.0
        else:
            w = 1.0
        if per_message:
            w = 0.0 if m.get("train") is False else w * float(m.get("weight", 1.0))
        weights.append(w)
    return weights


def without_turn_keys(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages without ``train`` and ``weight``: what a template renders (the record's
    ``tools``, which a :class:`~instruct.data.templates.Conversation` carries, kept)."""
    stripped = ({k: v for k, v in m.items() if k not in TURN_KEYS} for m in messages)
    return conversation(stripped, getattr(messages, "tools", None))


def select(
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    mode: Any,
    prompt: bool,
    where: Sequence[str],
) -> tuple[list[Any], list[list[float] | None] | None]:
    """Conversations to render and their per-message weights; ``None`` for the weights when
    every conversation takes the default (then rendering is exactly as without this)."""
    mode = train_on(mode)
    weights = [turn_weights(c, mode, prompt, w) for c, w in zip(conversations, where, strict=True)]
    if all(w is None for w in weights):
        return list(conversations), None  # as they are: nothing to strip
    return [without_turn_keys(c) for c in conversations], weights
