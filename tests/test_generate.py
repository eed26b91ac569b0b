"""Inference uses the training template: chat_template, stop tokens, generate CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from instruct.checkpoint import load_checkpoint
from instruct.config import compose
from instruct.data.templates import render, render_many, stop_tokens, to_messages
from instruct.data.tokenize import IGNORE_INDEX, encode
from instruct.decoding import (
    chooser,
    decode_pool,
    generate,
    pad_of,
    reply_text,
    spare_layer,
    stop_check,
)
from instruct.generate import prompt_messages
from instruct.model import build_model, fit_tokenizer
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


@pytest.mark.slow
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


# -- the pooled generation path ------------------------------------------------------------

TEST_INSTRUCTIONS = Path(__file__).parent / "fixtures" / "varied_prompts.jsonl"
GREEDY = SimpleNamespace(max_new_tokens=40, do_sample=False, repetition_penalty=1.0, seed=0)


@pytest.fixture(scope="module")
def chatty():
    """The tiny model with weights that say something: ``(model, tokenizer, template)``.

    Its own init (std 0.02) writes one newline forever. Weights of std 0.3 give varied text,
    and ``<|im_end|>``'s (tied) embedding scaled 3x makes it end replies after 0 to 40+
    tokens, so one batch holds rows that stop early and rows that run to the budget.
    """
    cfg = compose(["model=tiny", "template=chatml"])
    model, tokenizer = build_model(cfg.model)
    fit_tokenizer(model, tokenizer, cfg.template)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        model.get_input_embeddings().weight[im_end] *= 3
    return model.eval(), tokenizer, cfg.template


def instructions(template) -> list[list[dict[str, str]]]:
    """The 36 shipped test instructions (30 to 60 tokens with ChatML), one user turn each."""
    lines = TEST_INSTRUCTIONS.read_text(encoding="utf-8").splitlines()
    return [to_messages(json.loads(line), template) for line in lines]


@torch.no_grad()
def file_order_replies(model, tokenizer, template, conversations, sampling, batch_size=8):
    """The path before the pool: ``model.generate`` on consecutive batches, cut afterwards."""
    stop_ids, stop_strings = stop_tokens(template, tokenizer)
    extra = {"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}
    replies = []
    for start in range(0, len(conversations), batch_size):
        rendered = render_many(conversations[start : start + batch_size], template, tokenizer, True)
        batch = tokenizer(
            [r.text for r in rendered],
            add_special_tokens=False,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        out = model.generate(
            **batch,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
            **extra,
        )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            replies.append(reply_text(row, tokenizer, stop_ids, stop_strings))
    return replies


@pytest.mark.slow
def test_greedy_replies_equal_model_generate_on_file_order_batches(chatty):
    model, tokenizer, template = chatty
    conversations = instructions(template)
    replies = generate(model, tokenizer, template, conversations, GREEDY)
    assert replies == file_order_replies(model, tokenizer, template, conversations, GREEDY)
    lengths = [len(tokenizer(r, add_special_tokens=False).input_ids) for r in replies]
    assert min(lengths) < 10 and max(lengths) >= 30, lengths  # short and long rows mixed


@pytest.mark.slow
def test_greedy_replies_equal_with_a_stop_string(chatty):
    """An end of turn of several tokens ends a row as a stop string, as it did before."""
    model, tokenizer, template = chatty
    conversations = instructions(template)[:16]
    plain = generate(model, tokenizer, template, conversations, GREEDY)
    longest = max(plain, key=len)
    # Two tokens from the middle of a reply: a string that occurs, so some rows are cut by it.
    ids = tokenizer(longest, add_special_tokens=False).input_ids
    stop = tokenizer.decode(ids[len(ids) // 2 : len(ids) // 2 + 2])
    cut = template.copy()
    cut.end_of_turn = stop
    assert stop_tokens(cut, tokenizer)[1] == [stop.strip()]
    replies = generate(model, tokenizer, cut, conversations, GREEDY)
    assert replies == file_order_replies(model, tokenizer, cut, conversations, GREEDY)
    assert replies != plain and all(stop.strip() not in r for r in replies)


@pytest.mark.slow
def test_replies_come_back_in_the_callers_order(chatty):
    model, tokenizer, template = chatty
    rendered = render_many(instructions(template), template, tokenizer, True)
    # One prompt per token length, so the pool's order is the same whatever the input order.
    by_length = {}
    for conversation, r in zip(instructions(template), rendered, strict=True):
        by_length.setdefault(len(tokenizer(r.text).input_ids), conversation)
    conversations = list(by_length.values())
    replies = generate(model, tokenizer, template, conversations, GREEDY, batch_size=4)
    assert len(set(replies)) >= 20  # mostly distinct, so a misplaced reply would show
    shuffled = list(range(len(conversations)))
    random.Random(0).shuffle(shuffled)
    again = generate(
        model, tokenizer, template, [conversations[i] for i in shuffled], GREEDY, batch_size=4
    )
    assert again == [replies[i] for i in shuffled]


def test_no_conversations_touch_nothing():
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"touched .{name}")

    nothing = Untouchable()
    assert generate(nothing, nothing, nothing, [], nothing) == []


@pytest.mark.slow
def test_a_row_leaves_the_batch_at_its_end_of_turn(chatty):
    """Finished rows cost nothing: the decode steps feed exactly the tokens the unfinished
    rows still need, never more than ``batch_size`` rows, and no reply carries padding."""
    model, tokenizer, template = chatty
    budget = 24  # the longest of these replies takes 31 tokens: some rows run to the budget
    stop_ids, stop_strings = stop_tokens(template, tokenizer)
    rendered = render_many(instructions(template), template, tokenizer, True)
    prompts = [tokenizer(r.text, add_special_tokens=False).input_ids for r in rendered]
    fed: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: fed.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        new = decode_pool(
            model,
            prompts,
            sorted(range(len(prompts)), key=lambda i: -len(prompts[i])),
            chooser(GREEDY),
            stop_check(tokenizer, stop_ids, stop_strings, budget),
            batch_size=8,
            pad_id=pad_of(tokenizer),
        )
    finally:
        hook.remove()
    steps = [rows for rows, width in fed if width == 1]
    assert max(rows for rows, _ in fed) <= 8
    # Each row's first token comes from its prefill; each later one from one decode step.
    assert sum(steps) == sum(len(ids) - 1 for ids in new)
    assert sum(1 for _, width in fed if width > 1) < len(prompts)  # prefills share passes
    stopped = [ids for ids in new if len(ids) < budget]
    assert len(stopped) > len(prompts) // 2
    for ids in stopped:
        assert ids[-1] in stop_ids and not set(ids[:-1]) & set(stop_ids)
    assert max(len(ids) for ids in new) == budget  # and some ran to the end


@pytest.mark.slow
def test_sampling_is_seeded(chatty):
    model, tokenizer, template = chatty
    conversations = instructions(template)[:10]
    sampling = compose(
        ["checkpoint=x", "sampling.max_new_tokens=24"], config_name="generate"
    ).sampling
    first = generate(model, tokenizer, template, conversations, sampling)
    assert generate(model, tokenizer, template, conversations, sampling) == first
    sampling.seed = 1
    other = generate(model, tokenizer, template, conversations, sampling)
    assert other != first and len(other) == len(first)
    assert first != generate(model, tokenizer, template, conversations, GREEDY)


def test_a_repetition_penalty_applies_to_each_row(chatty):
    model, tokenizer, template = chatty
    conversations = instructions(template)[:8]
    penalised = SimpleNamespace(**{**vars(GREEDY), "repetition_penalty": 1.3})
    replies = generate(model, tokenizer, template, conversations, penalised, batch_size=8)
    alone = [generate(model, tokenizer, template, [c], penalised)[0] for c in conversations[:3]]
    assert replies[:3] == alone
    assert replies != generate(model, tokenizer, template, conversations, GREEDY)


def test_processes_in_lock_step_get_the_same_replies_from_model_generate(chatty, monkeypatch):
    """Under several processes the replies come from ``model.generate`` (which keeps sharded
    processes stepping together), on the same length-sorted batches, in the caller's order."""
    model, tokenizer, template = chatty
    conversations = instructions(template)[:12]
    pooled = generate(model, tokenizer, template, conversations, GREEDY)
    calls = []

    def counted(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return type(model).generate(model, **kwargs)

    monkeypatch.setattr(model, "generate", counted)  # this model object's, no module's
    assert generate(model, tokenizer, template, conversations, GREEDY, lock_step=True) == pooled
    assert calls == [8, 4]


def test_the_cache_grows_into_spare_columns_without_changing_a_reply(chatty):
    model, tokenizer, template = chatty
    conversations = instructions(template)[:12]
    default = generate(model, tokenizer, template, conversations, GREEDY)
    # One spare column: a copy at every step, as before spare columns.
    assert generate(model, tokenizer, template, conversations, GREEDY, spare_columns=1) == default


def test_a_spare_layer_writes_into_its_spare_columns_and_grows_when_they_run_out():
    keys, step = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 1, 4)
    layer = spare_layer(keys, -keys, 1)
    room = layer.key_room
    layer.update(step, -step)  # into the one spare column: no copy
    assert layer.key_room is room and layer.keys.shape[-2] == 4
    layer.update(step, -step)  # none left: 4 columns copied into a room of 4 + 1
    assert layer.key_room is not room and layer.key_room.shape[-2] == 5
    assert torch.equal(layer.keys, torch.cat([keys, step, step], dim=2))
    assert torch.equal(layer.values, -layer.keys)


@pytest.mark.slow
def test_a_merged_adapter_computes_the_same_and_leaves_every_weight_as_it_was(lora_toy):
    """Evaluation generates with LoRA merged into the weights (faster on the CPU). Inside, the
    logits equal the unmerged adapter's; on leaving, every parameter is bit for bit what it
    was (peft's unmerge alone leaves rounding), so the base model's pass after it (adapters
    switched off) and later replies are those of the saved checkpoint."""
    from instruct.decoding import merged_adapter

    run_dir, results = lora_toy
    model, tokenizer, cfg = load_checkpoint(results["checkpoint"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # an adapter far from zero, so merging it changes the weights a lot
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([tokenizer("Name a colour, then explain why.")["input_ids"]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        assert not torch.allclose(tuned, base, atol=1e-3)
        with merged_adapter(model) as merged:
            lora = [m for m in merged.modules() if hasattr(m, "lora_A") and m.lora_A]
            assert lora and all(m.merged for m in lora)
            assert torch.allclose(merged(input_ids=ids).logits, tuned, atol=1e-4)
        assert not any(m.merged for m in lora)
        after = model.state_dict()
        assert after.keys() == before.keys()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed == []
        assert torch.equal(model(input_ids=ids).logits, tuned)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, base)
    # The same replies through the evaluation path, merged or not.
    conversations = instructions(cfg.template)[:6]
    plain = generate(model, tokenizer, cfg.template, conversations, GREEDY, batch_size=4)
    with merged_adapter(model) as merged:
        fast = generate(merged, tokenizer, cfg.template, conversations, GREEDY, batch_size=4)
    assert fast == plain
