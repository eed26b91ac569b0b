"""``python -m instruct.generate checkpoint=<dir> prompt="..."``: print one reply, token by
token as it is generated (:mod:`instruct.streaming`).

The prompt is rendered by the same function training used, and generation stops at the
template's end-of-turn token, which training supervised (:func:`instruct.decoding.generate`,
the path every caller takes).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from instruct.data.templates import to_messages
from instruct.decoding import load_for_inference
from instruct.entry import hydra_main
from instruct.streaming import stdout_stream, stream_reply


def prompt_messages(template: Any, prompt: str, input: str | None, system: str | None):
    """A single-turn conversation for ``prompt``, shaped like the training examples."""
    messages = to_messages({"instruction": prompt, "input": input or ""}, template)
    if system:
        messages = [m for m in messages if m["role"] != "system"]
        messages.insert(0, {"role": "system", "content": system})
    return messages


def run(cfg: Any, write: Callable[[str], None]) -> str:
    """The reply to ``cfg.prompt`` (else standard input), written through ``write`` as it
    comes."""
    model, tokenizer, run_cfg = load_for_inference(cfg.checkpoint)
    prompt = cfg.prompt if cfg.prompt is not None else sys.stdin.read().strip()
    if not prompt:
        raise SystemExit('no prompt: pass prompt="..." or pipe it on standard input')
    messages = prompt_messages(run_cfg.template, prompt, cfg.input, cfg.system)
    return stream_reply(model, tokenizer, run_cfg.template, messages, cfg.sampling, write).text


@hydra_main("generate")
def main(cfg: Any) -> None:
    run(cfg, stdout_stream)
    print()


if __name__ == "__main__":
    main()
