"""Inference uses the training template: chat_template, stop tokens, generate CLI."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from instruct.checkpoint import load_checkpoint
from instruct.config import compose
from instruct.generate import generate, prompt_messages
from instruct.model import build_model, fit_tokenizer
from instruct.templates import render, stop_tokens, to_messages
from instruct.tokenize import IGNORE_INDEX, encode
from tests.conftest import run_module

EXAMPLES = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Translate: café", "input": "Straße {x}", "output": "Street"},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]
TEMPLATES = ["alpaca", "vicuna", "chatml", "native", "zephyr"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_saved_chat_template_reproduces_the_training_prompt_token_for_token(name, tmp_path):
    cfg = compose(["model=tiny", f"template={name}"])
    model, tokenizer = build_model(cfg.model)
    fit_tokenizer(model, tokenizer, cfg.template)
    tokenizer.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)  # what a checkpoint's user loads
    for example in EXAMPLES:
        messages = to_messages(example, cfg.template)
        ((feature, _),) = encode([render(messages, cfg.template, tokenizer)], tokenizer)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = saved.apply_chat_template(
                messages[:i], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            # The prompt is exactly the training tokens before this reply, none of them trained.
            assert feature.input_ids[: len(prompt)].tolist() == prompt, (name, i)
            assert feature.labels[len(prompt) - 1] == IGNORE_INDEX
            assert feature.labels[len(prompt)] != IGNORE_INDEX
        full = saved.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert full == feature.input_ids[: len(full)].tolist()


def test_stop_tokens_are_the_trained_end_of_turn(tokenizer, templates):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_tokens(templates["chatml"], tokenizer) == ([im_end, tokenizer.eos_token_id], [])
    assert stop_tokens(templates["alpaca"], tokenizer) == ([tokenizer.eos_token_id], [])


def test_a_tuned_model_stops_at_the_end_of_turn(tuned_toy):
    run_dir, _ = tuned_toy
    model, tokenizer, cfg = load_checkpoint(run_dir / "checkpoints" / "best")
    greedy = compose(
        ["checkpoint=x", "sampling=greedy", "sampling.max_new_tokens=40"], config_name="generate"
    ).sampling
    prompts = ["Greet Ada.", "Say goodbye to Bob."]
    messages = [prompt_messages(cfg.template, p, None, None) for p in prompts]
    replies = generate(model, tokenizer, cfg.template, messages, greedy)
    assert replies == ["Hello! It is good to see you.", "Goodbye, and see you soon."]
    for reply in replies:
        n_tokens = len(tokenizer(reply, add_special_tokens=False).input_ids)
        assert n_tokens < 20  # stopped at <|im_end|>, far before max_new_tokens
        assert "<|im_end|>" not in reply
    # The same through transformers alone: the checkpoint's generation config stops there too.
    prompt = tokenizer.apply_chat_template(
        messages[0], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1] :].tolist()
    assert new[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") and len(new) < 40


@pytest.mark.slow
def test_generate_cli_prints_the_reply(tuned_toy, tmp_path):
    run_dir, _ = tuned_toy
    best = run_dir / "checkpoints" / "best"
    proc = run_module(
        "instruct.generate",
        f"checkpoint={best}",
        "prompt=Greet Ada.",
        "sampling=greedy",
        "sampling.max_new_tokens=40",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "Hello! It is good to see you."
    assert list(tmp_path.iterdir()) == []  # no run folder or log left behind
    piped = run_module(
        "instruct.generate",
        f"checkpoint={best}",
        "sampling=greedy",
        input="Say goodbye to Eve.",
        cwd=tmp_path,
    )
    assert piped.returncode == 0 and piped.stdout.strip() == "Goodbye, and see you soon."
