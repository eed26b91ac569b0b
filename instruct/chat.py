"""``python -m instruct.chat checkpoint=<dir>``: talk to a checkpoint in the terminal.

The whole conversation is rendered with the training template at every turn, so the model
sees its earlier replies as it saw assistant turns in training. A line that quotes a
special-token string (``<|im_end|>``) is sent as text, as training encodes it: a user cannot
end a turn or forge one (:mod:`instruct.data.content`). ``/reset`` clears the history, ``/exit``
(or end of input) quits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from instruct.data.templates import Message
from instruct.decoding import generate, load_for_inference
from instruct.entry import hydra_main


def chat_loop(
    model: Any,
    tokenizer: Any,
    template: Any,
    sampling: Any,
    system: str | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
) -> list[Message]:
    """Read user turns until ``/exit`` or end of input; return the final history."""
    start: list[Message] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("")
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = list(start)
            write("(history cleared)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = generate(model, tokenizer, template, [history], sampling)[0]
        history.append({"role": "assistant", "content": reply})
        write(f"assistant> {reply}")
    return history


@hydra_main("chat")
def main(cfg: Any) -> None:
    model, tokenizer, run_cfg = load_for_inference(cfg.checkpoint)
    print(
        f"chatting with {cfg.checkpoint} (template {run_cfg.template.name}); "
        "/reset clears the history, /exit quits"
    )
    chat_loop(model, tokenizer, run_cfg.template, cfg.sampling, cfg.system)


if __name__ == "__main__":
    main()
