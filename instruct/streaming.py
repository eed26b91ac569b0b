"""One reply shown as it is generated: ``chat`` and ``generate`` print tokens as they come.

The reply is decoded by the same pool :func:`instruct.decoding.generate` uses, one row, so
the streamed reply is the reply ``generate`` returns for the same conversation. What is
printed is only what can no longer change: the text :func:`~instruct.decoding.reply_text`
makes of the ids so far, less a tail that could still turn out to begin a stop string or an
unfinished character. At the end the rest is printed, so the screen holds exactly the reply.
Ctrl-C stops the reply where it is; the text so far is the reply.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from instruct.data.templates import Message, stop_tokens
from instruct.decoding import (
    NotPoolable,
    chooser,
    decode_pool,
    generate,
    pad_of,
    prompt_ids,
    reply_text,
    stop_check,
)
from instruct.modes import evaluating

REPLACEMENT = "\ufffd"  # what decoding shows for the first bytes of an unfinished character


@dataclass
class Streamed:
    """A reply, how many tokens it took and how long, and whether Ctrl-C cut it short."""

    text: str
    tokens: int
    seconds: float
    interrupted: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Printer:
    """Writes a growing reply: each call, the newly settled text after what was written."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int], stop_strings: Sequence[str],
                 write: Callable[[str], None]) -> None:  # fmt: skip
        self.tokenizer, self.stop_ids, self.stop_strings = tokenizer, stop_ids, stop_strings
        self.write = write
        self.shown = ""  # written so far: always a prefix of the reply
        self.diverged = False  # a later decoding changed written text: write the rest at end

    def settled(self, text: str) -> str:
        """``text`` less a tail that more tokens could still change."""
        text = text.rstrip(REPLACEMENT)
        held = 0
        for stop in self.stop_strings:  # a tail that is the start of a stop string
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return text[: len(text) - held].rstrip()  # the reply is stripped: so is what shows

    def update(self, ids: Sequence[int]) -> None:
        if self.diverged:
            return
        text = self.settled(reply_text(ids, self.tokenizer, self.stop_ids, self.stop_strings))
        if not text.startswith(self.shown):
            self.diverged = True
            return
        if len(text) > len(self.shown):
            piece, self.shown = text[len(self.shown) :], text  # shown even if write is cut
            self.write(piece)

    def finish(self, reply: str) -> None:
        """Write what the final reply holds beyond what was written."""
        common = 0
        while common < min(len(reply), len(self.shown)) and reply[common] == self.shown[common]:
            common += 1
        if reply[common:]:
            self.write(reply[common:])
        self.shown = reply


def stdout_stream(text: str) -> None:
    """Write ``text`` to standard output now (a reply's pieces, as they come)."""
    sys.stdout.write(text)
    sys.stdout.flush()


@torch.no_grad()
def stream_reply(
    model: Any,
    tokenizer: Any,
    template: Any,
    messages: Sequence[Message],
    sampling: Any,
    write: Callable[[str], None],
    clock: Callable[[], float] = time.perf_counter,
) -> Streamed:
    """Generate the reply to ``messages`` (ending with a user turn), writing it as it comes."""
    start = clock()
    stop_ids, stop_strings = stop_tokens(template, tokenizer)
    prompt = prompt_ids([messages], template, tokenizer)
    finished = stop_check(tokenizer, stop_ids, stop_strings, sampling.max_new_tokens)
    printer = Printer(tokenizer, stop_ids, stop_strings, write)
    ids: list[int] = []

    def done(new: list[int]) -> bool:
        ids[:] = new
        printer.update(new)
        return finished(new)

    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
    interrupted = False
    try:
        with evaluating(model):
            decode_pool(model, prompt, [0], chooser(sampling), done, 1, pad_of(tokenizer))
        reply = reply_text(ids, tokenizer, stop_ids, stop_strings)
    except NotPoolable:  # a cache the pool cannot hold (sliding windows): no stream, same reply
        reply = generate(model, tokenizer, template, [messages], sampling)[0]
        ids = tokenizer(reply, add_special_tokens=False).input_ids
    except KeyboardInterrupt:
        interrupted = True
        reply = reply_text(ids, tokenizer, stop_ids, stop_strings)
    printer.finish(reply)
    return Streamed(reply, len(ids), clock() - start, interrupted)
