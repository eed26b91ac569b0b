"""Templates render exactly the documented strings; spans cover replies + end of turn."""

from __future__ import annotations

import pytest

from instruct.data.templates import fill, render, to_messages

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nName a primary colour.\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\n"
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
CONVERSATION = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "2 + 3 = 5."},
]


def test_alpaca_without_input(templates, tokenizer):
    t = templates["alpaca"]
    example = {"instruction": "Name a primary colour.", "output": "Red."}
    r = render(to_messages(example, t), t, tokenizer)
    assert r.text == ALPACA_NO_INPUT + "Red.<|endoftext|>"
    assert r.trained_text() == "Red.<|endoftext|>"
    prompt = render(
        to_messages({"instruction": "Name a primary colour."}, t),
        t,
        tokenizer,
        add_generation_prompt=True,
    )
    assert prompt.text == ALPACA_NO_INPUT and prompt.spans == ()


def test_alpaca_with_input_uses_the_second_preamble(templates, tokenizer):
    t = templates["alpaca"]
    example = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    r = render(to_messages(example, t), t, tokenizer)
    assert r.text == ALPACA_INPUT + "Bonjour<|endoftext|>"
    assert r.trained_text() == "Bonjour<|endoftext|>"


def test_vicuna_multi_turn(templates, tokenizer):
    r = render(CONVERSATION, templates["vicuna"], tokenizer)
    assert r.text == (
        f"{VICUNA_SYSTEM} USER: Hi! ASSISTANT: Hello. How can I help?<|endoftext|>"
        "USER: Add 2 and 3. ASSISTANT: 2 + 3 = 5.<|endoftext|>"
    )
    # The space after "ASSISTANT:" is the first thing the model writes after the prompt.
    assert [r.text[s:e] for s, e in r.spans] == [
        " Hello. How can I help?<|endoftext|>",
        " 2 + 3 = 5.<|endoftext|>",
    ]
    prompt = render(CONVERSATION[:3], templates["vicuna"], tokenizer, add_generation_prompt=True)
    assert prompt.text.endswith("USER: Add 2 and 3. ASSISTANT:")
    assert r.text.startswith(prompt.text)


def test_chatml_multi_turn_with_system(templates, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    r = render(messages, templates["chatml"], tokenizer)
    assert r.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello. How can I help?<|im_end|>\n"
        "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5.<|im_end|>"
    )
    assert [r.text[s:e] for s, e in r.spans] == [
        "Hello. How can I help?<|im_end|>",
        "2 + 3 = 5.<|im_end|>",
    ]
    prompt = render(messages[:4], templates["chatml"], tokenizer, add_generation_prompt=True)
    assert prompt.text.endswith(
        "<|im_end|>\n<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert r.text.startswith(prompt.text)


def test_custom_yaml_template_matches_the_tokenizers_own_layout(templates, tokenizer):
    """zephyr.yaml is pure data; the tiny tokenizer's chat_template uses the same layout."""
    custom = render(CONVERSATION, templates["zephyr"], tokenizer)
    native = render(CONVERSATION, templates["native"], tokenizer)
    assert custom.text.startswith("<|user|>\nHi!<|endoftext|>\n<|assistant|>\nHello.")
    assert native.text == custom.text + "\n"  # the jinja template ends every turn with \n
    # A native template trains all it writes after a reply (the prefix rule): that \n too.
    assert [s for s, _ in native.spans] == [s for s, _ in custom.spans]
    assert native.trained_text() == "Hello. How can I help?<|endoftext|>\n2 + 3 = 5.<|endoftext|>\n"


def test_native_generation_prompt(templates, tokenizer):
    prompt = render(CONVERSATION[:1], templates["native"], tokenizer, add_generation_prompt=True)
    assert prompt.text == "<|user|>\nHi!<|endoftext|>\n<|assistant|>\n"


def test_native_without_chat_template_is_a_clear_error(templates, tokenizer):
    bare = tokenizer.__class__(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>"
    )
    with pytest.raises(ValueError, match="chat_template"):
        render(CONVERSATION, templates["native"], bare)


def test_contents_with_braces_and_placeholders_are_not_substituted(templates, tokenizer):
    reply = "Use {content} and {eos} literally: f'{x}'"
    r = render(
        [{"role": "user", "content": "{input}"}, {"role": "assistant", "content": reply}],
        templates["chatml"],
        tokenizer,
    )
    assert r.trained_text() == reply + "<|im_end|>"
    assert "<|im_start|>user\n{input}<|im_end|>" in r.text
    assert fill("{a}{b}", a="{b}", b="x") == "{b}x"


def test_bad_roles_are_rejected(templates, tokenizer):
    with pytest.raises(ValueError, match="role 'robot'"):
        render([{"role": "robot", "content": "x"}], templates["chatml"], tokenizer)
    with pytest.raises(ValueError, match="system message may only come first"):
        render(
            [CONVERSATION[0], {"role": "system", "content": "x"}], templates["chatml"], tokenizer
        )


def test_render_many_equals_render_one_by_one(templates, tokenizer):
    from instruct.data.templates import render_many

    conversations = [
        CONVERSATION,
        CONVERSATION[:3],
        [{"role": "system", "content": "S"}, *CONVERSATION[:2]],
    ]
    for name, t in templates.items():
        for prompt in (False, True):
            many = render_many(conversations, t, tokenizer, add_generation_prompt=prompt)
            one = [render(c, t, tokenizer, add_generation_prompt=prompt) for c in conversations]
            assert many == one, name
