"""Render a conversation into text plus the character spans the model is trained on.

One function, :func:`render`, serves training (spans cover every assistant reply and its
end-of-turn token) and inference (``add_generation_prompt=True`` ends the text where the model
starts to write). A template is data: a :class:`~instruct.config.TemplateConfig` loaded from
``conf/template/*.yaml``, or the tokenizer's own ``chat_template`` for ``kind: native``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

Message = dict[str, str]
Span = tuple[int, int]

ROLES = ("system", "user", "assistant")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Rendered:
    """Rendered text and the half-open character spans ``[start, end)`` to train on."""

    text: str
    spans: tuple[Span, ...]

    def trained_text(self) -> str:
        return "".join(self.text[s:e] for s, e in self.spans)


def fill(fmt: str, **values: str) -> str:
    """Replace ``{name}`` placeholders in one pass, so inserted text is never re-scanned.

    Braces that name no given value (``{x}`` in a code sample) are left alone.
    """
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), fmt)


def to_messages(example: Mapping[str, Any], template: Any) -> list[Message]:
    """An example as a conversation: its ``messages``, or instruction/input/output as one turn.

    Alpaca-style templates use a different system preamble when there is an input; it becomes
    an explicit system message, so training and generation see the same text.
    """
    if "messages" in example:
        return [dict(m) for m in example["messages"]]
    instruction, extra = example["instruction"], example.get("input") or ""
    messages: list[Message] = []
    if extra:
        user = fill(template.input_format, instruction=instruction, input=extra)
        if getattr(template, "system_with_input", None):
            messages.append({"role": "system", "content": template.system_with_input})
    else:
        user = instruction
    messages.append({"role": "user", "content": user})
    if "output" in example:
        messages.append({"role": "assistant", "content": example["output"]})
    return messages


def special_strings(tokenizer: Any) -> dict[str, str]:
    """``{bos}`` and ``{eos}`` for a tokenizer.

    ``{bos}`` is the BOS token only for tokenizers that prepend one when encoding (Llama,
    Mistral), so a template never adds a BOS that the model never saw in pretraining.
    """
    bos = tokenizer.bos_token or ""
    if bos and tokenizer.bos_token_id not in tokenizer("a", add_special_tokens=True).input_ids:
        bos = ""
    return {"bos": bos, "eos": tokenizer.eos_token or ""}


def check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): content must be a string, got {content!r}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")


def render(
    messages: Sequence[Mapping[str, str]],
    template: Any,
    tokenizer: Any,
    add_generation_prompt: bool = False,
    special: Mapping[str, str] | None = None,
) -> Rendered:
    """Render ``messages`` with ``template``; spans cover every assistant reply + end of turn.

    ``special`` is :func:`special_strings` of ``tokenizer``, when the caller has it already.
    """
    check_messages(messages)
    if template.kind == "native":
        return _render_native(messages, tokenizer, add_generation_prompt)
    if template.kind != "format":
        raise ValueError(f"template {template.name}: kind must be 'format' or 'native'")
    special = special if special is not None else special_strings(tokenizer)
    return _render_format(messages, template, dict(special), add_generation_prompt)


def render_many(
    conversations: Iterable[Sequence[Mapping[str, str]]],
    template: Any,
    tokenizer: Any,
    add_generation_prompt: bool = False,
) -> list[Rendered]:
    """:func:`render` for many conversations, with the per-template work done once.

    The special tokens are looked up once (the lookup encodes a probe string), the template
    is read from a plain copy (attribute access on an OmegaConf node costs microseconds, and
    a render reads a dozen of them), and its format strings are parsed once (:func:`filler`):
    1.89 s -> 0.045 s for 20,000 ChatML examples with the SmolLM2 tokenizer.
    """
    special = special_strings(tokenizer)
    plain = plain_template(template)
    if plain.kind != "format":
        return [render(c, plain, tokenizer, add_generation_prompt, special) for c in conversations]
    compiled = _compiled(plain, special)
    out = []
    for c in conversations:
        check_messages(c)
        out.append(compiled.render(c, add_generation_prompt))
    return out


def plain_template(template: Any) -> SimpleNamespace:
    """A plain-object copy of a template config: attribute reads without OmegaConf's cost,
    for loops over many examples."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(template, DictConfig):
        return SimpleNamespace(**OmegaConf.to_container(template, resolve=True))
    return SimpleNamespace(**vars(template))


def _render_format(
    messages: Sequence[Mapping[str, str]],
    t: Any,
    special: dict[str, str],
    add_generation_prompt: bool,
) -> Rendered:
    return _compiled(t, special).render(messages, add_generation_prompt)


def filler(fmt: str, fixed: Mapping[str, str]) -> Callable[[str], str]:
    """``fill(fmt, content=c, **fixed)`` as a function of ``c``, with ``fmt`` parsed once.

    The text between ``{content}`` placeholders is fixed, so filling is one ``join``.
    """
    parts = _PLACEHOLDER.split(fmt)  # literal, name, literal, name, ..., literal
    literals, current = [], [parts[0]]
    for name, literal in zip(parts[1::2], parts[2::2], strict=True):
        if name == "content":
            literals.append("".join(current))
            current = []
        else:
            current.append(fixed.get(name, "{" + name + "}"))
        current.append(literal)
    literals.append("".join(current))
    return lambda content="": content.join(literals)


@dataclass(frozen=True)
class _Compiled:
    """A format template with its pieces parsed and its special tokens filled in."""

    prefix: str
    system: str | None
    system_format: Callable[[str], str]
    user_format: Callable[[str], str]
    assistant_format: Callable[[str], str]
    assistant_prefix: str
    end_of_turn: str
    turn_separator: str

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool):
        parts: list[str] = [self.prefix]
        spans: list[Span] = []
        size = len(self.prefix)

        def add(text: str, trained: bool = False) -> None:
            nonlocal size
            if trained and text:
                spans.append((size, size + len(text)))
            parts.append(text)
            size += len(text)

        turns = list(messages)
        system = turns.pop(0)["content"] if turns and turns[0]["role"] == "system" else self.system
        if system is not None:
            add(self.system_format(system))
        after_reply = False
        for m in turns:
            if after_reply:
                add(self.turn_separator)
            if m["role"] == "user":
                add(self.user_format(m["content"]))
                after_reply = False
            else:
                add(self.assistant_prefix)
                add(self.assistant_format(m["content"]) + self.end_of_turn, trained=True)
                after_reply = True
        if add_generation_prompt:
            if after_reply:
                add(self.turn_separator)
            add(self.assistant_prefix)
        return Rendered("".join(parts), _merge(spans))


def _compiled(t: Any, special: Mapping[str, str]) -> _Compiled:
    return _Compiled(
        prefix=filler(t.prefix, special)(),
        system=t.system,
        system_format=filler(t.system_format, special),
        user_format=filler(t.user_format, special),
        assistant_format=filler(t.assistant_format, special),
        assistant_prefix=filler(t.assistant_prefix, special)(),
        end_of_turn=filler(t.end_of_turn, special)(),
        turn_separator=filler(t.turn_separator, special)(),
    )


def _render_native(
    messages: Sequence[Mapping[str, str]], tokenizer: Any, add_generation_prompt: bool
) -> Rendered:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "template=native needs a tokenizer with a chat_template; this one has none. "
            "Pick a template from conf/template/ (alpaca, vicuna, chatml, ...) instead."
        )
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return Rendered(text, _merge(_locate_replies(text, messages, _end_of_turn_pattern(tokenizer))))


def _end_of_turn_pattern(tokenizer: Any) -> re.Pattern[str]:
    tokens = {t for t in tokenizer.all_special_tokens if t}
    tokens |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    # Longest first, so "<|im_end|>" wins over a shorter token that prefixes it.
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return re.compile(rf"\s*(?:{alternatives})" if alternatives else r"(?!)")


def _locate_replies(
    text: str, messages: Sequence[Mapping[str, str]], end_of_turn: re.Pattern[str]
) -> list[Span]:
    """Find each message's content in order; an assistant reply runs through its end of turn.

    Searching on characters, not token ids, is immune to BPE merging a marker with its
    neighbours. Templates that strip whitespace from contents are handled by also trying the
    stripped content.
    """
    spans: list[Span] = []
    cursor = 0
    for i, m in enumerate(messages):
        content = m["content"]
        start = text.find(content, cursor) if content else cursor
        if start < 0 and content.strip():
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            raise ValueError(
                f"message {i} ({m['role']}): its content does not appear in the text the "
                "tokenizer's chat_template rendered, so the reply to train on cannot be located"
            )
        end = start + len(content)
        if m["role"] == "assistant":
            match = end_of_turn.match(text, end)
            if match:
                end = match.end()
            spans.append((start, end))
        cursor = end
    return spans


def _merge(spans: list[Span]) -> tuple[Span, ...]:
    merged: list[Span] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    return tuple(merged)


def _jinja_literal(text: str) -> str:
    """A Jinja string literal for ``text`` (JSON escaping is valid Jinja syntax)."""
    return json.dumps(text, ensure_ascii=False)


def _split_content(fmt: str, field: str, special: dict[str, str]) -> tuple[str, str]:
    """``fmt`` with specials filled in, split around its single ``{content}``."""
    filled = fill(fmt, **special)
    if filled.count("{content}") != 1:
        raise ValueError(f"template.{field} must contain {{content}} exactly once: {fmt!r}")
    before, after = filled.split("{content}")
    return before, after


def chat_template(template: Any, tokenizer: Any) -> str:
    """A Jinja ``chat_template`` that renders exactly as :func:`render` does.

    Saved with the tokenizer of every checkpoint, so ``apply_chat_template`` reproduces the
    training prompt token for token. A native template is the tokenizer's own, unchanged.
    """
    if template.kind == "native":
        return tokenizer.chat_template
    special = special_strings(tokenizer)
    lit = _jinja_literal
    sys_a, sys_b = _split_content(template.system_format, "system_format", special)
    user_a, user_b = _split_content(template.user_format, "user_format", special)
    bot_a, bot_b = _split_content(template.assistant_format, "assistant_format", special)
    prefix = fill(template.prefix, **special)
    eot = fill(template.end_of_turn, **special)
    sep = fill(template.turn_separator, **special)
    gen = fill(template.assistant_prefix, **special)
    default_system = "none" if template.system is None else lit(template.system)
    return (
        "{%- set ns = namespace(after_reply=false) -%}"
        f"{{{{- {lit(prefix)} -}}}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {default_system} -%}}{{%- set turns = messages -%}}"
        "{%- endif -%}"
        f"{{%- if system is not none -%}}{{{{- {lit(sys_a)} + system + {lit(sys_b)} -}}}}"
        "{%- endif -%}"
        "{%- for message in turns -%}"
        f"{{%- if ns.after_reply -%}}{{{{- {lit(sep)} -}}}}{{%- endif -%}}"
        "{%- if message['role'] == 'user' -%}"
        f"{{{{- {lit(user_a)} + message['content'] + {lit(user_b)} -}}}}"
        "{%- set ns.after_reply = false -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{- {lit(gen + bot_a)} + message['content'] + {lit(bot_b + eot)} -}}}}"
        "{%- set ns.after_reply = true -%}"
        "{%- else -%}"
        "{{- raise_exception('unexpected role ' + message['role'] + '; a system message may "
        "only come first') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        f"{{%- if ns.after_reply -%}}{{{{- {lit(sep)} -}}}}{{%- endif -%}}{{{{- {lit(gen)} -}}}}"
        "{%- endif -%}"
    )


def end_of_turn(template: Any, tokenizer: Any) -> str:
    """The text the template writes right after a reply and trains on (e.g. ``<|im_end|>``)."""
    probe = "PROBE"
    rendered = render(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}],
        template,
        tokenizer,
    )
    trained = rendered.trained_text()
    return trained[trained.index(probe) + len(probe) :]


def stop_tokens(template: Any, tokenizer: Any) -> tuple[list[int], list[str]]:
    """Token ids that end a reply, plus stop strings when end-of-turn spans several tokens."""
    ids = [tokenizer.eos_token_id]
    strings: list[str] = []
    eot = end_of_turn(template, tokenizer).strip()
    if eot:
        eot_ids = tokenizer(eot, add_special_tokens=False).input_ids
        if len(eot_ids) == 1:
            ids.insert(0, eot_ids[0])
        else:
            strings.append(eot)
    return list(dict.fromkeys(i for i in ids if i is not None)), strings
