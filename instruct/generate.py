"""Generate replies with the template a model was trained on.

``python -m instruct.generate checkpoint=<dir> prompt="..."`` prints one reply. The prompt is
rendered by the same function training used, and generation stops at the template's
end-of-turn token, which training supervised.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import hydra
import torch

from instruct.config import CONFIG_MODULE, HYDRA_VERSION_BASE, register_schemas
from instruct.templates import Message, render_many, stop_tokens, to_messages


def generation_kwargs(sampling: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": sampling.do_sample,
        "repetition_penalty": sampling.repetition_penalty,
    }
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    else:  # silence the model's own sampling defaults when decoding greedily
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    template: Any,
    conversations: Sequence[Sequence[Message]],
    sampling: Any,
    batch_size: int = 8,
) -> list[str]:
    """One reply per conversation (each ends with a user turn), in order."""
    stop_ids, stop_strings = stop_tokens(template, tokenizer)
    kwargs = generation_kwargs(sampling)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        rendered = render_many(chunk, template, tokenizer, add_generation_prompt=True)
        prompts = [tokenizer(r.text, add_special_tokens=False).input_ids for r in rendered]
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends where generation starts.
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            text = tokenizer.decode(row[:cut], skip_special_tokens=False)
            for s in stop_strings:
                text = text.split(s, 1)[0]
            replies.append(text.strip())
    model.train(was_training)
    return replies


def load_for_inference(checkpoint: str) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, run config)`` from a checkpoint, on the GPU when there is one."""
    from instruct.checkpoint import load_checkpoint

    model, tokenizer, cfg = load_checkpoint(checkpoint)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer, cfg


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


@hydra.main(
    config_path=f"pkg://{CONFIG_MODULE}", config_name="generate", version_base=HYDRA_VERSION_BASE
)
def main(cfg: Any) -> None:
    print(run(cfg))


if __name__ == "__main__":
    register_schemas()
    main()
