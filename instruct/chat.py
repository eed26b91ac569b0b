"""``python -m instruct.chat checkpoint=<dir>``: talk to a checkpoint in the terminal.

The whole conversation is rendered with the training template at every turn, so the model
sees its earlier replies as it saw assistant turns in training. Replies print as they are
generated, with tokens/s after each (:mod:`instruct.streaming`); Ctrl-C stops a reply and the
chat goes on. A line that quotes a special-token string (``<|im_end|>``) is sent as text, as
training encodes it: a user cannot end a turn or forge one (:mod:`instruct.data.content`).

Commands: ``/system <text>`` sets the system prompt (``/system`` alone clears it), ``/reset``
clears the history, ``/exit`` (or end of input) quits. A line ending in ``\\`` continues on
the next; ``\"\"\"`` opens a block of lines that a second ``\"\"\"`` closes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from instruct.data.templates import Message
from instruct.decoding import load_for_inference
from instruct.entry import hydra_main
from instruct.streaming import stdout_stream, stream_reply

BLOCK = '"""'
HELP = (
    "/system <text> sets the system prompt, /reset clears the history, /exit quits; "
    f"end a line with \\ to go on, or put a message between {BLOCK} lines"
)


def read_message(read: Callable[[str], str]) -> str:
    """One user message: a line, lines joined by a trailing ``\\``, or a ``\"\"\"`` block."""
    line = read("you> ")
    if line.strip().startswith(BLOCK):
        lines, rest = [], line.strip()[len(BLOCK) :]
        while not rest.rstrip().endswith(BLOCK):
            lines.append(rest)
            rest = read("... ")
        lines.append(rest.rstrip()[: -len(BLOCK)])
        return "\n".join(lines).strip("\n")
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read("... ")
    return "\n".join([*lines, line])


def with_system(history: list[Message], system: str | None) -> list[Message]:
    """``history`` with its system message replaced by ``system`` (or removed, for None)."""
    rest = [m for m in history if m["role"] != "system"]
    return [{"role": "system", "content": system}, *rest] if system else rest


def chat_loop(
    model: Any,
    tokenizer: Any,
    template: Any,
    sampling: Any,
    system: str | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
    stream: Callable[[str], None] | None = None,
) -> list[Message]:
    """Read user turns until ``/exit`` or end of input; return the final history.

    ``write`` gets whole lines; ``stream`` the reply's text as it comes (by default, standard
    output, flushed at each piece).
    """
    stream = stream or stdout_stream
    history = with_system([], system)
    while True:
        try:
            text = read_message(read)
        except (EOFError, KeyboardInterrupt):
            write("")
            break
        line = text.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = with_system([], system)
            write("(history cleared)")
        elif line == "/help":
            write(HELP)
        elif line == "/system" or line.startswith("/system "):
            system = line.removeprefix("/system").strip() or None
            history = with_system(history, system)
            write(f"(system prompt: {system})" if system else "(no system prompt)")
        elif line:
            asked = [*history, {"role": "user", "content": text.strip("\n")}]
            stream("assistant> ")
            try:
                reply = stream_reply(model, tokenizer, template, asked, sampling, stream)
            except ValueError as refused:  # the template cannot render this conversation
                stream("\n")
                write(f"error: {refused}")
                continue
            history = asked
            history.append({"role": "assistant", "content": reply.text})
            stream("\n")
            cut = ", stopped" if reply.interrupted else ""
            write(f"({reply.tokens} tokens, {reply.tokens_per_s:.1f} tokens/s{cut})")
    return history


@hydra_main("chat")
def main(cfg: Any) -> None:
    model, tokenizer, run_cfg = load_for_inference(cfg.checkpoint)
    print(f"chatting with {cfg.checkpoint} (template {run_cfg.template.name}); {HELP}")
    chat_loop(model, tokenizer, run_cfg.template, cfg.sampling, cfg.system)


if __name__ == "__main__":
    main()
