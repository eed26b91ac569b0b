"""``python -m instruct.generate checkpoint=<dir> prompt="..."``: print one reply.

The prompt is rendered by the same function training used, and generation stops at the
template's end-of-turn token, which training supervised (:func:`instruct.decoding.generate`,
the path every caller takes).
"""

from __future__ import annotations

import sys
from typing import Any

from instruct.data.templates import to_messages
from instruct.decoding import generate, load_for_inference
from instruct.entry import hydra_main


def prompt_messages(template: Any, prompt: str, input: str | None, system: str | None):
    """A single-turn conversation for ``prompt``, shaped like the training examples."""
    messages = to_messages({"instruction": prompt, "input": input or ""}, template)
    if system:
        messages = [m for m in messages if m["role"] != "system"]
        messages.insert(0, {"role": "system", "content": system})
    return messages


def run(cfg: Any) -> str:
    model, tokenizer, run_cfg = load_for_inference(cfg.checkpoint)
    prompt = cfg.prompt if cfg.prompt is not None else sys.stdin.read().strip()
    if not prompt:
        raise SystemExit('no prompt: pass prompt="..." or pipe it on standard input')
    messages = prompt_messages(run_cfg.template, prompt, cfg.input, cfg.system)
    return generate(model, tokenizer, run_cfg.template, [messages], cfg.sampling)[0]


@hydra_main("generate")
def main(cfg: Any) -> None:
    print(run(cfg))


if __name__ == "__main__":
    main()
