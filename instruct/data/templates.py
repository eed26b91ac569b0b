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

from instruct.config import TemplateKind
from instruct.data.content import ControlTokens, hide
from instruct.data.records import ROLES, broken_rule

Message = dict[str, str]
Span = tuple[int, int]

# Message fields of tool use and reasoning, which only a native template renders.
TOOL_FIELDS = ("tool_calls", "reasoning_content", "thinking", "tool_call_id", "name")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Rendered:
    """Rendered text and the half-open character spans ``[start, end)`` to train on.

    ``literal``: the ranges where a message quoted a special-token string, which is encoded
    as text, never as a control token (:mod:`instruct.data.content`); empty for nearly every
    conversation. ``weights``: each span's loss weight (``data.train_on=per_message``).
    """

    text: str
    spans: tuple[Span, ...]
    literal: tuple[Span, ...] = ()
    # Each span's loss weight, in (0, 1]; empty when every one is 1 (nearly always).
    weights: tuple[float, ...] = ()

    def trained_text(self) -> str:
        return "".join(self.text[s:e] for s, e in self.spans)


def fill(fmt: str, **values: str) -> str:
    """Replace ``{name}`` placeholders in one pass, so inserted text is never re-scanned.

    Braces that name no given value (``{x}`` in a code sample) are left alone.
    """
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), fmt)


class Conversation(list):
    """A list of messages that also carries its record's ``tools`` (function specs), which a
    native template renders through ``apply_chat_template(tools=...)``."""

    tools: list[dict[str, Any]] | None = None


def conversation(messages: Iterable[Mapping[str, Any]], tools: Any = None) -> Conversation:
    """``messages`` (copied) as a :class:`Conversation` with ``tools``."""
    out = Conversation(dict(m) for m in messages)
    out.tools = list(tools) if tools else None
    return out


def to_messages(example: Mapping[str, Any], template: Any) -> list[Message]:
    """An example as a conversation: its ``messages``, or instruction/input/output as one turn.

    Alpaca-style templates use a different system preamble when there is an input; it becomes
    an explicit system message, so training and generation see the same text. A record's
    ``tools`` travel with its messages (:class:`Conversation`).
    """
    if "messages" in example:
        return conversation(example["messages"], example.get("tools"))
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
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if problem := broken_rule(i, role, m.get("content")):
            raise ValueError(problem)


def refuse_tool_fields(messages: Sequence[Mapping[str, Any]], template: Any) -> None:
    """A format template renders role and content only: tool messages, tool calls, a tools
    list and reasoning are refused, never dropped in silence."""
    problem = "the record's 'tools'" if getattr(messages, "tools", None) else ""
    for i, m in enumerate(messages):
        if problem:
            break
        if m["role"] == "tool":
            problem = f"message {i}: role 'tool'"
        elif len(m) > 2:  # more than role and content
            key = next((k for k in TOOL_FIELDS if k in m), None)
            problem = f"message {i}: {key!r}" if key else ""
    if problem:
        raise ValueError(
            f"{problem}: template {template.name} renders role and content only, so it "
            "cannot render tool calls, tool results, a tools list or reasoning; use "
            "template=native (the tokenizer's own chat template)"
        )


def render(
    messages: Sequence[Mapping[str, str]],
    template: Any,
    tokenizer: Any,
    add_generation_prompt: bool = False,
    special: Mapping[str, str] | None = None,
    controls: ControlTokens | None = None,
    weights: Sequence[float] | None = None,
) -> Rendered:
    """Render ``messages`` with ``template``; spans cover every assistant reply + end of turn.

    ``weights``, one per message (:func:`instruct.data.turns.turn_weights`), choose the trained
    turns instead: a reply with weight 0 is not trained, a system or user message with a
    weight above 0 is (its content as the template writes it), and each span carries its
    message's weight. ``None``: every reply at weight 1, nothing else.

    A special-token string inside a message stays text: the template renders a placeholder
    in its place, and the result marks where the string went back as a ``literal`` range
    (:func:`instruct.data.content.hide`), which tokenisation encodes as text. ``special`` is
    :func:`special_strings` of ``tokenizer`` and ``controls`` its
    :meth:`~instruct.data.content.ControlTokens.of`, when the caller has them already.
    """
    check_messages(messages)
    if template.kind != TemplateKind.native:
        refuse_tool_fields(messages, template)
    controls = controls if controls is not None else ControlTokens.of(tokenizer)
    tools = getattr(messages, "tools", None)
    hidden = hide(messages, controls, lambda: _written_by(template, tokenizer), tools)
    if hidden is None:
        return _render(
            messages, template, tokenizer, add_generation_prompt, special, tools, weights
        )
    rendered = _render(
        hidden.messages, template, tokenizer, add_generation_prompt, special, hidden.tools, weights
    )
    return Rendered(*hidden.restore(rendered.text, rendered.spans), weights=rendered.weights)


def _render(
    messages: Sequence[Mapping[str, str]],
    template: Any,
    tokenizer: Any,
    add_generation_prompt: bool,
    special: Mapping[str, str] | None,
    tools: list[Any] | None = None,
    weights: Sequence[float] | None = None,
) -> Rendered:
    if template.kind == TemplateKind.native:
        kwargs = template_kwargs(template)
        if tools:
            kwargs["tools"] = tools
        messages = [_both_reasoning_keys(m) for m in messages]
        return _render_native(messages, tokenizer, add_generation_prompt, weights=weights, **kwargs)
    if getattr(template, "kwargs", None):
        raise ValueError(
            f"template {template.name}: template.kwargs go to the tokenizer's chat template "
            "(apply_chat_template), which only template=native uses"
        )
    special = special if special is not None else special_strings(tokenizer)
    return _compiled(template, dict(special)).render(messages, add_generation_prompt, weights)


def _both_reasoning_keys(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """``message`` with its reasoning under both names templates read: ``reasoning_content``
    (Qwen 3, GLM 4, Nemotron, Gemma 4) and ``thinking`` (gpt-oss; LFM2 reads either)."""
    reasoning = message.get("reasoning_content", message.get("thinking"))
    if reasoning is None or message["role"] != "assistant":
        return message
    return {**message, "reasoning_content": reasoning, "thinking": reasoning}


def template_kwargs(template: Any) -> dict[str, Any]:
    """A native template's extra ``apply_chat_template`` arguments (``template.kwargs``,
    e.g. ``enable_thinking: false`` for Qwen 3), as a plain dict."""
    kwargs = getattr(template, "kwargs", None) or {}
    if not isinstance(kwargs, dict):  # an OmegaConf node
        from omegaconf import OmegaConf

        kwargs = OmegaConf.to_container(kwargs, resolve=True)
    return dict(kwargs)


def _written_by(template: Any, tokenizer: Any) -> str:
    """All the text a template may write itself (placeholders must differ from it)."""
    if template.kind == TemplateKind.native:
        source = getattr(tokenizer, "chat_template", None) or ""
        return source if isinstance(source, str) else "".join(map(str, source.values()))
    fields = vars(template) if not hasattr(template, "items") else dict(template.items())
    return "".join(v for v in fields.values() if isinstance(v, str))


def render_many(
    conversations: Iterable[Sequence[Mapping[str, str]]],
    template: Any,
    tokenizer: Any,
    add_generation_prompt: bool = False,
    weights: Sequence[Sequence[float] | None] | None = None,
) -> list[Rendered]:
    """:func:`render` for many conversations, with the per-template work done once.

    The special tokens are looked up once (the lookup encodes a probe string), the template
    is read from a plain copy (attribute access on an OmegaConf node costs microseconds, and
    a render reads a dozen of them), and its format strings are parsed once (:func:`filler`):
    many times faster than rendering each conversation on its own. Whether any content quotes
    a special-token string is one search over all contents; only those conversations are
    rendered again through :func:`render`. ``weights``: each conversation's per-message
    weights for :func:`render`, or ``None`` for all.
    (measured: docs/performance.md, "Measurements behind design choices")
    """
    special = special_strings(tokenizer)
    controls = ControlTokens.of(tokenizer)
    plain = plain_template(template)
    conversations = list(conversations)
    per = list(weights) if weights is not None else [None] * len(conversations)
    if plain.kind != TemplateKind.format:
        return [
            render(c, plain, tokenizer, add_generation_prompt, special, controls, w)
            for c, w in zip(conversations, per, strict=True)
        ]
    if getattr(plain, "kwargs", None):
        raise ValueError(
            f"template {plain.name}: template.kwargs go to the tokenizer's chat template "
            "(apply_chat_template), which only template=native uses"
        )
    compiled = _compiled(plain, special)
    out = []
    for c, w in zip(conversations, per, strict=True):
        check_messages(c)
        refuse_tool_fields(c, plain)
        out.append(compiled.render(c, add_generation_prompt, w))
    for i in controls.quoting(conversations):  # again through render, which keeps them text
        c = conversations[i]
        out[i] = render(c, plain, tokenizer, add_generation_prompt, special, controls, per[i])
    return out


def plain_template(template: Any) -> SimpleNamespace:
    """A plain-object copy of a template config: attribute reads without OmegaConf's cost,
    for loops over many examples."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(template, DictConfig):
        return SimpleNamespace(**OmegaConf.to_container(template, resolve=True))
    return SimpleNamespace(**vars(template))


@dataclass(frozen=True)
class Filler:
    """``fill(fmt, content=c, **fixed)`` as a function of ``c``: the fixed text between the
    ``{content}`` placeholders, joined by ``c``."""

    literals: tuple[str, ...]

    def __call__(self, content: str = "") -> str:
        return content.join(self.literals)

    def content_spans(self, at: int, content: str) -> list[Span]:
        """Where ``content`` lies in ``self(content)`` written at offset ``at``."""
        out = []
        for literal in self.literals[:-1]:
            at += len(literal)
            out.append((at, at + len(content)))
            at += len(content)
        return out


def filler(fmt: str, fixed: Mapping[str, str]) -> Filler:
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
    return Filler(tuple(literals))


@dataclass(frozen=True)
class _Compiled:
    """A format template with its pieces parsed and its special tokens filled in."""

    prefix: str
    system: str | None
    system_format: Filler
    user_format: Filler
    assistant_format: Filler
    assistant_prefix: str
    end_of_turn: str
    turn_separator: str

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool,
        weights: Sequence[float] | None = None,
    ) -> Rendered:
        parts: list[str] = [self.prefix]
        spans: list[Span] = []
        span_weights: list[float] = []
        size = len(self.prefix)

        def add(text: str, trained: Sequence[Span] = (), weight: float = 1.0) -> None:
            nonlocal size
            for s, e in trained:
                if e > s and weight > 0:
                    spans.append((size + s, size + e))
                    span_weights.append(weight)
            parts.append(text)
            size += len(text)

        def weight(k: int) -> float:  # message k's; by default only replies, at 1
            if weights is None:
                return float(messages[k]["role"] == "assistant")
            return weights[k]

        turns = list(enumerate(messages))
        first = turns.pop(0) if turns and turns[0][1]["role"] == "system" else None
        system = first[1]["content"] if first else self.system
        if system is not None:
            text = self.system_format(system)
            at = self.system_format.content_spans(0, system) if first else ()
            add(text, at, weight(first[0]) if first else 0.0)
        after_reply = False
        for k, m in turns:
            if after_reply:
                add(self.turn_separator)
            if m["role"] == "user":
                at = self.user_format.content_spans(0, m["content"])
                add(self.user_format(m["content"]), at, weight(k))
                after_reply = False
            else:
                add(self.assistant_prefix)
                text = self.assistant_format(m["content"]) + self.end_of_turn
                add(text, [(0, len(text))], weight(k))
                after_reply = True
        if add_generation_prompt:
            if after_reply:
                add(self.turn_separator)
            add(self.assistant_prefix)
        if weights is None:
            return Rendered("".join(parts), _merge(spans))
        merged, merged_weights = _merge_weighted(spans, span_weights)
        return Rendered("".join(parts), merged, weights=merged_weights)


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


_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_MARKS = "\x00\x01\x02\x03"  # characters no template writes; one is missing from any reply
RenderFn = Callable[[Sequence[Mapping[str, Any]], bool], str]


def _render_native(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    add_generation_prompt: bool,
    *,
    weights: Sequence[float] | None = None,
    **template_kwargs: Any,
) -> Rendered:
    """The tokenizer's own ``chat_template``; each reply's span by :func:`_reply_span`.

    ``template_kwargs`` go to every ``apply_chat_template`` call (``tools``,
    ``enable_thinking``, ...). A template with ``{% generation %}`` blocks says itself what
    is trained (:func:`_generation_spans`). ``weights`` as in :func:`render`: a system or
    user message is trained as its content the template writes (:func:`_content_region`).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "template=native needs a tokenizer with a chat_template; this one has none. "
            "Pick a template from conf/template/ (alpaca, vicuna, chatml, ...) instead."
        )

    def apply(msgs: Sequence[Mapping[str, Any]], prompt: bool, **changed: Any) -> str:
        return tokenizer.apply_chat_template(
            list(msgs),
            tokenize=False,
            add_generation_prompt=prompt,
            **{**template_kwargs, **changed},
        )

    try:
        text = apply(messages, add_generation_prompt)
    except Exception as err:  # a template raises what it likes: TemplateError, TypeError, ...
        raise ValueError(f"the tokenizer's chat_template cannot render this ({err})") from err
    check_tool_fields(
        messages, text, apply, add_generation_prompt, bool(template_kwargs.get("tools"))
    )
    spans = _native_spans(
        messages, text, apply, tokenizer, add_generation_prompt, weights, template_kwargs
    )
    if weights is None:
        return Rendered(text, _merge([(s, e) for s, e in spans if s < e]))
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    weighted = [(span, weights[i]) for span, i in zip(spans, replies, strict=True)]
    for i, m in enumerate(messages):
        if m["role"] != "assistant" and weights[i] > 0:
            why = "it is trained (data.train_on_prompt)"
            where = f"message {i} ({m['role']})"
            span = _content_region(text, messages, i, apply, add_generation_prompt, where, why)
            weighted.append((span, weights[i]))
    weighted = [((s, e), w) for (s, e), w in weighted if s < e and w > 0]
    merged, merged_weights = _merge_weighted([x for x, _ in weighted], [w for _, w in weighted])
    return Rendered(text, merged, weights=merged_weights)


def _native_spans(
    messages: Sequence[Mapping[str, Any]],
    text: str,
    apply: Callable[..., str],
    tokenizer: Any,
    add_generation_prompt: bool,
    weights: Sequence[float] | None,
    template_kwargs: Mapping[str, Any],
) -> list[tuple[int, int]]:
    """Each reply's span in ``text``: from the template's ``{% generation %}`` blocks when it
    has them, else by :func:`_reply_span` (``(0, 0)`` for a reply of weight 0)."""
    source = tokenizer.get_chat_template(None, template_kwargs.get("tools"))
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not _GENERATION_BLOCK.search(source):
        return [
            _reply_span(messages, i, text, apply, add_generation_prompt, tokenizer)
            if weights is None or weights[i] > 0
            else (0, 0)
            for i in replies
        ]
    spans = _generation_spans(messages, tokenizer, add_generation_prompt, template_kwargs)
    if weights is not None and len(spans) != len(replies):
        raise ValueError(
            f"the chat_template's {{% generation %}} blocks mark {len(spans)} runs of "
            f"tokens for {len(replies)} replies, so which reply each run belongs to "
            "(data.train_on, per-message train and weight) cannot be told"
        )
    return spans


def check_tool_fields(
    messages: Sequence[Mapping[str, Any]],
    text: str,
    apply: Callable[..., str],
    add_generation_prompt: bool,
    tools: bool,
) -> None:
    """Refuse a tool or reasoning field that the chat template ignores (it renders the same
    text with and without it), so nothing in a record is dropped in silence.

    An assistant's ``tool_calls``, ``reasoning_content`` (and content beside tool calls) are
    checked in the conversation that ends with that turn, as the model writes it: Qwen 3
    writes the reasoning of the turns after the last user message only, so an earlier turn's
    reasoning is absent from the whole conversation and rightly untrained there, yet the
    template renders it. A tool message's content and the record's ``tools`` are checked in
    the whole conversation. ``tool_call_id`` and a tool's ``name`` are passed on unchecked:
    most templates match results to calls by order and write neither.
    """
    where = "the tokenizer's chat_template (template=native)"
    if tools and apply(messages, add_generation_prompt, tools=None) == text:
        raise ValueError(f"the record's 'tools': {where} renders the same text without them")
    for i, m in enumerate(messages):
        at = f"message {i} ({m['role']})"
        if m["role"] == "tool" and m["content"]:
            marked = {**m, "content": m["content"] + _MARKS[0]}
            changed = [*messages[:i], marked, *messages[i + 1 :]]
            if _apply(apply, changed, add_generation_prompt, at, "it changed") == text:
                raise ValueError(f"{at}: {where} does not write its content")
        if m["role"] != "assistant":
            continue
        keys = [k for k in ("tool_calls", "reasoning_content") if m.get(k)]
        if m.get("tool_calls") and m["content"].strip():
            keys.append("content")  # Llama 3.1 writes a tool call's content nowhere
        if not keys:
            continue
        upto = _apply(apply, messages[: i + 1], False, at, "the turns up to it")
        for key in keys:
            without = {**m, "content": ""} if key == "content" else _dropped(m, key)
            if key == "reasoning_content":
                without.pop("thinking", None)  # under both names (_both_reasoning_keys)
            if _apply(apply, [*messages[:i], without], False, at, f"it without {key}") == upto:
                raise ValueError(
                    f"{at}: {where} renders the same text with and without its {key!r}, so "
                    "it would be dropped in silence; remove it from the record or use a chat "
                    "template that renders it"
                )


def _dropped(message: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != key}


def _generation_spans(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    add_generation_prompt: bool,
    template_kwargs: Mapping[str, Any],
) -> list[Span]:
    """The tokens the template's ``{% generation %}`` blocks mark, as character spans.

    Each run of marked tokens becomes one span from its first token's first character to its
    last token's last, so :mod:`instruct.data.tokenize` (a token is trained when it lies wholly
    inside a span) trains exactly the tokens ``return_assistant_tokens_mask`` marks.
    """
    out = tokenizer.apply_chat_template(
        list(messages),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )
    if not out.encodings:
        raise ValueError("template=native with {% generation %} blocks needs a fast tokenizer")
    offsets = out.encodings[0].offsets
    spans: list[Span] = []
    first = None
    for k, marked in enumerate([*out["assistant_masks"], 0]):
        if marked and first is None:
            first = k
        elif not marked and first is not None:
            spans.append((offsets[first][0], offsets[k - 1][1]))
            first = None
    if not spans and any(m["role"] == "assistant" for m in messages):
        raise ValueError(
            "the chat_template's {% generation %} blocks mark nothing in this conversation, "
            "so none of its replies would be trained"
        )
    return spans


def _reply_span(
    messages: Sequence[Mapping[str, Any]],
    i: int,
    full: str,
    apply: RenderFn,
    add_generation_prompt: bool,
    tokenizer: Any,
) -> Span:
    """What the model must write for assistant message ``i``, as a span of ``full``.

    The prefix rule: the span starts where the prompt for this reply ends (the messages
    before it with the generation prompt, a prefix of ``full``) and ends where the
    conversation that ends with the reply stops agreeing with ``full``. So whatever the
    template writes after the reply (end-of-turn tokens, a newline, a final EOS) is trained,
    and so is whatever the model writes after the generation prompt (a harmony channel, an
    empty think block); the header never is. A template that renders the turn differently
    once other turns follow goes through :func:`_reply_span_per_turn`.
    """
    where = f"message {i} (assistant)"
    if i == 0:
        raise ValueError(
            f"{where}: a conversation cannot start with a reply: no prompt comes before it, "
            "so nothing says where the reply starts"
        )
    prompt = _apply(apply, messages[:i], True, where, "the messages before it")
    last = i == len(messages) - 1 and not add_generation_prompt
    upto = full if last else _apply(apply, messages[: i + 1], False, where, "the turns up to it")
    if full.startswith(prompt) and full.startswith(upto) and upto.startswith(prompt):
        start, end = len(prompt), len(upto)
    else:
        start, end = _reply_span_per_turn(
            messages, i, full, prompt, upto, apply, add_generation_prompt, tokenizer
        )
    content = messages[i].get("content")
    if start == end and isinstance(content, str) and content.strip():
        raise ValueError(
            f"{where}: the chat_template writes nothing of this reply after the generation "
            "prompt, so it cannot be trained"
        )
    return start, end


def _reply_span_per_turn(
    messages: Sequence[Mapping[str, Any]],
    i: int,
    full: str,
    prompt: str,
    upto: str,
    apply: RenderFn,
    add_generation_prompt: bool,
    tokenizer: Any,
) -> Span:
    """The span of message ``i`` for a template that is not prefix-preserving there.

    Qwen 3 drops the think block of earlier turns, DeepSeek's generation prompt opens a think
    block that earlier turns lack, gpt-oss ends a last reply with ``<|return|>`` and an earlier
    one with ``<|end|>``. The reply itself is located by rendering it changed
    (:func:`_content_region`), in ``full`` and in ``upto`` (the turns up to it: what the model
    writes after the generation prompt when this reply comes last). Around it, ``full`` is
    trained only where it agrees with ``upto``: from the end of the part of the generation
    prompt that ``full`` contains, and after the reply as far as the two agree, never ending
    inside an added token (``<|end|>`` and ``<|return|>`` agree on ``<|``). Anything else is
    an error, never a guess.
    """
    where = f"message {i} (assistant)"
    if not full.startswith(prompt):
        why = "the generation prompt before it is not a prefix of the whole conversation"
    else:
        why = "the turns up to it, rendered alone, are not a prefix of the whole conversation"
    c0, c1 = _content_region(full, messages, i, apply, add_generation_prompt, where, why)
    r0, r1 = _content_region(upto, messages[: i + 1], i, apply, False, where, why)
    markers = [t.content for t in tokenizer.added_tokens_decoder.values() if len(t.content) > 1]
    start = _marker_boundary(full, min(_common_prefix(prompt, full), c0), markers)
    before = full[start:c0]
    # Where the prompt is a prefix of both, the history may hold a suffix of what the model
    # writes before the reply (Qwen 3 drops an earlier turn's think block); the dropped part
    # is not trained. Elsewhere the text before the reply must be the model's whole.
    dropped_only = start == len(prompt) and upto.startswith(prompt) and upto[:r0].endswith(before)
    if before and upto[:r0] != prompt + before and not dropped_only:
        start = _after_header(full, c0, messages[:i], prompt, upto, r0, apply)
    if start is None:
        raise ValueError(
            f"{where}: {why}, and the text between the generation prompt and the reply "
            f"({before!r}) is not what the model writes there when the reply comes last; "
            "the template renders this turn differently once other turns follow, and there "
            "is no telling which part of it to train"
        )
    return start, _marker_boundary(full, c1 + _common_prefix(full[c1:], upto[r1:]), markers)


def _after_header(
    full: str,
    c0: int,
    before: Sequence[Mapping[str, Any]],
    prompt: str,
    upto: str,
    r0: int,
    apply: RenderFn,
) -> int | None:
    """Where the model's part of a reply starts in ``full`` when the turns ``before`` it
    render differently there than in its prompt (Qwen 3 drops the reasoning of turns before
    the last user message, which the prompt of a reply before that message still holds).

    Accepted only right after the template's generation header (the text the generation
    prompt adds to ``before``, never empty), followed by a suffix of what the model writes
    before the reply when it comes last; the part the history drops is not trained.
    ``None`` when ``full`` is not so.
    """
    try:
        history = apply(before, False)
    except Exception:  # a template raises what it likes; this is a refusal either way
        return None
    header = prompt[len(history) :] if prompt.startswith(history) else ""
    if not header or not upto.startswith(prompt):
        return None
    written = upto[len(prompt) : r0]
    agree = _common_suffix(full[:c0], written, min(c0, len(written)))
    for k in range(agree, -1, -1):  # the longest suffix of it that follows the header
        if c0 - k >= len(header) and full.startswith(header, c0 - k - len(header)):
            return c0 - k
    return None


def _marker_boundary(text: str, at: int, markers: Sequence[str]) -> int:
    """``at``, moved back to the start of any marker in ``text`` that it would cut in two
    (a tokenizer never splits an added token, so a span cannot end inside one)."""
    moved = True
    while moved:
        moved = False
        for m in markers:
            k = text.find(m, max(0, at - len(m) + 1), at + len(m) - 1)
            if -1 < k < at:
                at, moved = k, True
    return at


def _content_region(
    text: str,
    messages: Sequence[Mapping[str, Any]],
    i: int,
    apply: RenderFn,
    prompt: bool,
    where: str,
    why: str,
) -> Span:
    """Where message ``i``'s content lies in ``text`` (``apply(messages, prompt)``).

    Rendered again with a mark at each end of the content, the text changes only between the
    marks: the common prefix and suffix bound the content as the template wrote it (trimmed,
    say). No search for the content's text, which can also occur in a header.
    """
    mark, marked = _marked(messages[i])
    if not mark:
        raise ValueError(f"{where}: {why}, and its content is not plain text to locate")
    changed = [*messages[:i], marked, *messages[i + 1 :]]
    other = _apply(apply, changed, prompt, where, "it with its content changed")
    a = _common_prefix(text, other)
    b = _common_suffix(text, other, min(len(text), len(other)) - a)
    closing = len(other) - b - 1
    if closing <= a or other[a] != mark or other[closing] != mark:
        raise ValueError(
            f"{where}: {why}, and the template does not write its content as given (it "
            "rewrites or drops part of it, e.g. reasoning before </think>), so the reply "
            "cannot be located"
        )
    return a, len(text) - b


def _marked(message: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(mark, message)`` with a mark at each end of its content, or of its first tool
    call's name when it only calls tools (an empty content marked would change the text
    around it: Qwen writes a newline between content and a call); ``("", ...)`` when there
    is nothing to mark."""
    content, calls = message.get("content"), message.get("tool_calls") or []
    if isinstance(content, str) and (content or not calls):
        text, put = content, lambda t: {**message, "content": t}
    else:
        first = calls[0] if isinstance(calls[0], Mapping) else {}
        function = first.get("function", first)
        text = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(text, str):
            return "", dict(message)

        def put(t: str) -> dict[str, Any]:
            named = {**function, "name": t}
            call = {**first, "function": named} if "function" in first else named
            return {**message, "tool_calls": [call, *calls[1:]]}

    mark = next((c for c in _MARKS if c not in text), "")
    return mark, put(mark + text + mark) if mark else dict(message)


def _apply(
    apply: RenderFn, messages: Sequence[Mapping[str, Any]], prompt: bool, where: str, what: str
) -> str:
    try:
        return apply(messages, prompt)
    except Exception as err:  # a template raises what it likes: TemplateError, TypeError, ...
        raise ValueError(
            f"{where}: rendering {what} failed ({err}), so the reply's span cannot be found"
        ) from err


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix, by bisection on slices (no loop per char)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    """The length of the longest common suffix, at most ``limit``."""
    lo, hi = 0, limit
    if a[len(a) - hi :] == b[len(b) - hi :]:
        return hi
    while hi - lo > 1:  # the last lo characters agree, the last hi do not
        mid = (lo + hi) // 2
        if a[len(a) - mid : len(a) - lo] == b[len(b) - mid : len(b) - lo]:
            lo = mid
        else:
            hi = mid
    return lo


def _merge_weighted(
    spans: Sequence[Span], weights: Sequence[float]
) -> tuple[tuple[Span, ...], tuple[float, ...]]:
    """Spans sorted, those that touch merged when their weights agree (an overlap goes to
    the span that starts first); the weights, or ``()`` when every one is 1."""
    merged: list[Span] = []
    kept: list[float] = []
    for (s, e), w in sorted(zip(spans, weights, strict=True)):
        if merged and s <= merged[-1][1] and w == kept[-1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
            continue
        if merged:
            s = max(s, merged[-1][1])
        if s < e:
            merged.append((s, e))
            kept.append(w)
    return tuple(merged), (() if all(w == 1 for w in kept) else tuple(kept))


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
    training prompt token for token. A native template is the tokenizer's own, with its
    ``template.kwargs`` set at the top (:func:`with_kwargs`).
    """
    if template.kind == TemplateKind.native:
        return with_kwargs(tokenizer.chat_template, template_kwargs(template))
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


def with_kwargs(source: Any, kwargs: Mapping[str, Any]) -> Any:
    """A Jinja chat template with ``kwargs`` set at its top, so a checkpoint's
    ``apply_chat_template`` (vLLM, ``transformers serve``, lm-eval) renders as training did
    without being passed them (``enable_thinking: false``). A ``set`` tag outputs nothing;
    transformers' ``trim_blocks`` eats one newline after it, so a template that starts with
    one gets one more. Unchanged when there are none, or already set."""
    if not kwargs or not isinstance(source, str):
        return source
    value = {True: "true", False: "false", None: "none"}
    head = "".join(
        f"{{% set {k} = {value[v] if v is None or isinstance(v, bool) else _jinja_literal(v)} %}}"
        for k, v in kwargs.items()
    )
    if source.startswith(head):
        return source
    return head + ("\n" if source.startswith("\n") else "") + source


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
