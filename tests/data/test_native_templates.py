"""Native templates train exactly what the model writes after the generation prompt.

Real chat templates of the families people tune, read from TRL's installed package
(``trl/chat_templates/*.jinja``), on the tiny tokenizer with each family's markers added as
special tokens, as the family's own tokenizer has them. Where TRL ships a ``*_training.jinja``
variant with ``{% generation %}`` blocks, the tokens we train through the prefix rule (from
the original template) are compared with its mask, token for token.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from instruct.data.templates import Rendered, render
from instruct.data.tokenize import IGNORE_INDEX, encode

NATIVE = SimpleNamespace(kind="native", name="native")


def trl_template(name: str) -> str:
    return (resources.files("trl") / "chat_templates" / f"{name}.jinja").read_text("utf-8")


# Families TRL does not ship, written here from the model's own tokenizer_config.json.
# mistralai/Mistral-7B-Instruct-v0.2 (also Mixtral-8x7B-Instruct-v0.1): no system role.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)
# mistralai/Mistral-7B-Instruct-v0.3, its tool branches left out: the system prompt goes into
# the *last* user message, so earlier turns render differently once more turns follow.
MISTRAL_V3 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}"
    "{%- endif %}{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}{%- endfor %}"
)
# HuggingFaceTB/SmolLM2-135M-Instruct (ChatML with a default system prompt), as this repo's
# converted model cache holds it (chat_template.jinja beside the GGUF's tokenizer).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# HuggingFaceH4/zephyr-7b-beta: the line breaks between tags are part of the template.
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)

LLAMA3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
CHATML = ("<|im_start|>", "<|im_end|>")
GEMMA = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")
PHI3 = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")
COHERE = (
    "<BOS_TOKEN>",
    "<|START_OF_TURN_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|SYSTEM_TOKEN|>",
    "<|USER_TOKEN|>",
    "<|CHATBOT_TOKEN|>",
)
DEEPSEEK = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
)
HARMONY = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>")
THINK = "<think>\n\n</think>\n\n"
NOT_SPECIAL = frozenset({"<think>", "</think>"})


@dataclass(frozen=True)
class Family:
    template: str  # a TRL template's name, or the template itself
    markers: tuple[str, ...]
    header: tuple[str, ...]  # marker tokens of the prompt that are never trained
    turn: Callable[[str, bool], str]  # what is trained for a reply; True for the last message
    bos: str | None = None
    eos: str | None = None
    reference: str | None = None  # TRL's {% generation %} variant
    # Text the reference trains and we deliberately do not, each explained where it is set.
    reference_only: frozenset[str] = frozenset()
    system: bool = True  # takes a system message
    prefix_preserving: bool = True  # every generation prompt is a prefix of the conversation
    kwargs: dict[str, Any] = field(default_factory=dict)

    def source(self) -> str:
        return self.template if "{" in self.template else trl_template(self.template)


def trimmed(end: str) -> Callable[[str, bool], str]:
    return lambda reply, last: reply.strip() + end


def verbatim(end: str) -> Callable[[str, bool], str]:
    return lambda reply, last: reply + end


def phi3_turn(reply: str, last: bool) -> str:
    return reply + "<|end|>\n" + ("<|endoftext|>" if last else "")  # the template's final EOS


FAMILIES = {
    "llama3": Family("llama3", LLAMA3, LLAMA3[:3], trimmed("<|eot_id|>"), bos=LLAMA3[0],
                     eos=LLAMA3[3], reference="llama3_training"),
    "llama3_1": Family("llama3_1", LLAMA3, LLAMA3[:3], trimmed("<|eot_id|>"), bos=LLAMA3[0],
                       eos=LLAMA3[3]),
    "llama3_2": Family("llama3_2", LLAMA3, LLAMA3[:3], trimmed("<|eot_id|>"), bos=LLAMA3[0],
                       eos=LLAMA3[3]),
    # TRL's block opens before the \n that ends the generation prompt "<|im_start|>assistant\n".
    "qwen2_5": Family("qwen2_5", CHATML, CHATML[:1], verbatim("<|im_end|>\n"), eos=CHATML[1],
                      reference="qwen2_5_training", reference_only=frozenset({"\n"})),
    # Thinking on: the empty think block the template writes into the last reply is the
    # model's to write (it comes after the generation prompt), so it is trained. TRL's variant
    # writes the block into every turn; where the texts differ, the comparison runs on it.
    "qwen3": Family("qwen3", (*CHATML, "<think>", "</think>"), CHATML[:1],
                    lambda reply, last: (THINK + reply.lstrip("\n") if last else reply)
                    + "<|im_end|>\n",
                    eos=CHATML[1], reference="qwen3_training"),
    # Thinking off: the generation prompt ends with the empty think block, so it is prompt,
    # not trained; TRL trains it. Earlier turns lack it, so their prompts are not prefixes.
    "qwen3_nothink": Family("qwen3", (*CHATML, "<think>", "</think>"), CHATML[:1],
                            lambda reply, last: (reply.lstrip("\n") if last else reply)
                            + "<|im_end|>\n",
                            eos=CHATML[1], reference="qwen3_training",
                            reference_only=frozenset({THINK}), prefix_preserving=False,
                            kwargs={"enable_thinking": False}),
    "gemma": Family("gemma", GEMMA, GEMMA[2:3], trimmed("<end_of_turn>\n"), bos=GEMMA[0],
                    eos=GEMMA[1], reference="gemma_training", system=False),
    "gemma3": Family("gemma3", GEMMA, GEMMA[2:3], trimmed("<end_of_turn>\n"), bos=GEMMA[0],
                     eos=GEMMA[1], reference="gemma3_training"),
    "mistral": Family(MISTRAL, ("<s>", "</s>"), ("<s>",), verbatim("</s>"), bos="<s>",
                      eos="</s>", system=False),
    "phi3": Family("phi3", PHI3, PHI3[:3], phi3_turn, eos="<|endoftext|>",
                   reference="phi3_training"),
    "phi3_5": Family("phi3_5", PHI3, PHI3[:3], phi3_turn, eos="<|endoftext|>",
                     reference="phi3_5_training"),
    "cohere": Family("cohere", COHERE, (*COHERE[:2], *COHERE[3:]),
                     trimmed("<|END_OF_TURN_TOKEN|>"), bos=COHERE[0], eos=COHERE[2],
                     reference="cohere_training"),
    # Two end-of-turn tokens, both trained.
    "cohere2": Family("cohere2", (*COHERE, "<|START_RESPONSE|>", "<|END_RESPONSE|>"),
                      (*COHERE[:2], *COHERE[3:], "<|START_RESPONSE|>"),
                      verbatim("<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"), bos=COHERE[0],
                      eos=COHERE[2], reference="cohere2_training"),
    # The generation prompt is "<｜Assistant｜><think>\n", which the rendered conversation never
    # holds: each reply is trained from where the conversation stops agreeing with it, after
    # "<｜Assistant｜>". TRL's block covers "<｜Assistant｜>", a header the prompt writes.
    "deepseekv3": Family("deepseekv3", DEEPSEEK, DEEPSEEK[2:4], verbatim(DEEPSEEK[1]),
                         bos=DEEPSEEK[0], eos=DEEPSEEK[1], reference="deepseekv3_training",
                         reference_only=frozenset({"<｜Assistant｜>"}), prefix_preserving=False),
    "deepseek_r1": Family("deepseek_r1_distill", DEEPSEEK, DEEPSEEK[2:4], verbatim(DEEPSEEK[1]),
                          bos=DEEPSEEK[0], eos=DEEPSEEK[1],
                          reference="deepseek_r1_distill_training",
                          reference_only=frozenset({"<｜Assistant｜>"}), prefix_preserving=False),
    # Harmony: the prompt ends "<|start|>assistant"; the model writes the channel, the reply
    # and, last, "<|return|>" (trained). An earlier reply ends "<|end|>" in the history, where
    # the model had written "<|return|>": not what it must produce, so not trained. TRL's
    # block also covers "<|start|>assistant", which the generation prompt writes.
    "gptoss": Family("gptoss", HARMONY, ("<|start|>",),
                     lambda reply, last: "<|channel|>final<|message|>" + reply
                     + ("<|return|>" if last else ""),
                     eos="<|return|>", reference="gptoss_training",
                     reference_only=frozenset({"<|start|>assistant", "<|end|>"})),
    "smollm2": Family(SMOLLM2, CHATML, CHATML[:1], verbatim("<|im_end|>\n"), eos=CHATML[1]),
    # The template's \n after "</s>" is written after the reply, so it is trained.
    "zephyr": Family(ZEPHYR, ("<|system|>", "<|user|>", "<|assistant|>", "</s>"),
                     ("<|system|>", "<|user|>", "<|assistant|>"), verbatim("</s>\n"),
                     eos="</s>"),
    # LFM2 (not required by the issue; it was among the families that failed).
    "lfm2": Family("lfm2", (*CHATML, "<|startoftext|>"), CHATML[:1], verbatim("<|im_end|>\n"),
                   bos="<|startoftext|>", eos=CHATML[1], reference="lfm2_training"),
}  # fmt: skip


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


CONVERSATIONS = {
    "one_character": [user("Hi"), bot("a")],
    **{
        f"header_word_{w.strip() or 'newline'}": [user("Say it."), bot(w)]
        for w in ["assistant", "model", "user", "end", "id", "im", "\n", "system", "start"]
    },
    "empty": [user("Say nothing."), bot("")],
    "repeat": [user("OK"), bot("OK")],
    "whitespace": [user("  spaced  "), bot("  padded reply \n")],
    "non_ascii": [user("Größe?"), bot("Straße — café, ¿dónde? 🍞 π≈3.14")],
    "system": [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello.")],
    "four_turns": [
        user("Hi"),
        bot("a"),
        user("OK"),
        bot("OK"),
        user("Again"),
        bot(""),
        user("Last"),
        bot("assistant"),
    ],
}
CASES = [
    pytest.param(f, c, id=f"{f}-{c}")
    for f in FAMILIES
    for c in CONVERSATIONS
    if FAMILIES[f].system or c != "system"
]


@pytest.fixture(scope="module")
def tokenizers(tokenizer):
    """Each family's tokenizer: the tiny BPE with the family's markers as special tokens."""
    out = {}
    for name, family in FAMILIES.items():
        tok = copy.deepcopy(tokenizer)
        # Real Qwen 3 and DeepSeek-R1 tokenizers hold <think> and </think> as added tokens
        # that are not special: a reply may write them, and a template may split on them.
        plain = [m for m in family.markers if m in NOT_SPECIAL]
        tok.add_tokens([m for m in family.markers if m not in NOT_SPECIAL], special_tokens=True)
        tok.add_tokens(plain, special_tokens=False)
        ends = {"bos_token": family.bos, "eos_token": family.eos}
        tok.add_special_tokens({k: v for k, v in ends.items() if v})
        tok.chat_template = family.source()
        out[name] = tok
    return out


def rendered(tokenizers, family: str, messages, **overrides) -> tuple[Rendered, Any]:
    tok = tokenizers[family]
    if overrides:
        tok = copy.copy(tok)
        for key, value in overrides.items():
            setattr(tok, key, value)
    kwargs = FAMILIES[family].kwargs
    if kwargs:  # what a template option (enable_thinking) passes to every render
        from instruct.data.templates import _render_native

        return _render_native(messages, tok, False, **kwargs), tok
    return render(messages, NATIVE, tok), tok


def apply(tok, messages, prompt: bool = False, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, **kwargs)


def common_prefix(a: str, b: str) -> int:
    pairs = enumerate(zip(a, b, strict=False))
    return next((k for k, (x, y) in pairs if x != y), min(len(a), len(b)))


@pytest.mark.parametrize(("family", "conversation"), CASES)
def test_each_reply_trains_what_the_model_writes_after_the_generation_prompt(
    tokenizers, family, conversation
):
    messages = CONVERSATIONS[conversation]
    r, tok = rendered(tokenizers, family, messages)
    f = FAMILIES[family]
    replies = [(i, m) for i, m in enumerate(messages) if m["role"] == "assistant"]
    # Exactly each reply (as the template writes it) and all the template writes after it.
    expected = [f.turn(m["content"], i == len(messages) - 1) for i, m in replies]
    assert [r.text[s:e] for s, e in r.spans] == expected
    for (i, _), (start, _) in zip(replies, r.spans, strict=True):
        prompt = apply(tok, messages[:i], True, **f.kwargs)
        if r.text.startswith(prompt):  # the span starts exactly where the prompt ends
            assert start == len(prompt)
        else:  # ... or where the conversation stops agreeing with it (documented families),
            assert not f.prefix_preserving  # never inside a marker ("<" of "<think>", "<|im_end|>")
            agree = common_prefix(prompt, r.text)
            assert start == agree or any(
                r.text.startswith(m, start) and start < agree < start + len(m) for m in f.markers
            )


@pytest.mark.parametrize(("family", "conversation"), CASES)
def test_the_header_is_never_trained_and_the_whole_end_of_turn_is(tokenizers, family, conversation):
    messages = CONVERSATIONS[conversation]
    r, tok = rendered(tokenizers, family, messages)
    ((feature, straddles),) = encode([r], tok)
    trained = feature.labels[feature.labels != IGNORE_INDEX].tolist()
    header = set(tok.convert_tokens_to_ids(list(FAMILIES[family].header)))
    assert not header & set(trained)
    # The last trained tokens are the whole end of turn the template writes (several tokens
    # for Cohere 2, "<|end|>\n<|endoftext|>" for Phi-3, "<|eot_id|>" for Llama 3).
    last = FAMILIES[family].turn("", True).split(THINK)[-1].split("<|message|>")[-1]
    end_ids = tok(last, add_special_tokens=False).input_ids
    assert trained[-len(end_ids) :] == end_ids
    decoded = tok.decode(trained)
    for m in messages:
        if m["role"] == "assistant" and m["content"].strip():
            assert m["content"].strip() in decoded
    # A reply that starts with whitespace the prompt ends with shares one BPE token with it:
    # that token is left untrained and counted; it happens only for such replies.
    merges_possible = any(m["content"][:1].isspace() for m in messages[1:])
    assert straddles == 0 or merges_possible


def straddles(offsets: tuple[int, int], spans) -> bool:
    return any(offsets[0] < s < offsets[1] for s, _ in spans)


def strip_generation(template: str) -> str:
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


REFERENCED = [p for p in CASES if FAMILIES[p.values[0]].reference]


@pytest.mark.parametrize(("family", "conversation"), REFERENCED)
def test_trained_tokens_equal_trls_generation_mask(tokenizers, family, conversation):
    """Token for token, but for the differences each family states (``reference_only``) and
    one that holds for all: a token that BPE merged from the generation prompt's last
    character and the reply's first (a reply starting with a newline after a prompt ending
    with one) straddles the span's start; TRL's mask trains any token that overlaps its block,
    we train only tokens wholly inside the span, and count the straddles."""
    f = FAMILIES[family]
    messages = CONVERSATIONS[conversation]
    r, tok = rendered(tokenizers, family, messages)
    reference = trl_template(f.reference)
    ref_text = apply(tok, messages, chat_template=reference, **f.kwargs)
    if ref_text != r.text:
        # Qwen 3's variant writes a think block into every turn, the original only into the
        # last: compare on the variant's own text, with its markers taken out.
        assert family.startswith("qwen3") and conversation == "four_turns"
        r, tok = rendered(tokenizers, family, messages, chat_template=strip_generation(reference))
        assert r.text == ref_text
    ref = tok.apply_chat_template(
        messages,
        chat_template=reference,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        **f.kwargs,
    )
    ((feature, _),) = encode([r], tok)
    assert feature.input_ids.tolist() == ref["input_ids"]
    ours = feature.labels != IGNORE_INDEX
    theirs = np.asarray(ref["assistant_masks"], dtype=bool)
    assert not (ours & ~theirs).any(), "we train a token the reference does not"
    offsets = ref.encodings[0].offsets
    only_theirs = np.flatnonzero(theirs & ~ours).tolist()
    runs = np.split(only_theirs, np.flatnonzero(np.diff(only_theirs) != 1) + 1)
    for run in runs if only_theirs else []:
        kept = [k for k in run.tolist() if not straddles(offsets[k], r.spans)]
        text = tok.decode([ref["input_ids"][k] for k in kept])
        # With a straddling token taken out, what is left is the start of a stated difference.
        cut = len(kept) < len(run)
        assert not kept or any(x == text or cut and x.startswith(text) for x in f.reference_only)


@pytest.mark.parametrize("conversation", ["four_turns", "whitespace", "header_word_newline"])
@pytest.mark.parametrize("name", ["llama3", "qwen2_5", "qwen3", "gptoss", "cohere2", "phi3"])
def test_a_template_with_generation_blocks_is_honoured(tokenizers, name, conversation):
    """As the tokenizer's own template, TRL's variant trains exactly what its blocks mark,
    a token that overlaps a block's start included."""
    f = FAMILIES[name]
    messages = CONVERSATIONS[conversation]
    reference = trl_template(f.reference)
    r, tok = rendered(tokenizers, name, messages, chat_template=reference)
    ref = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ((feature, _),) = encode([r], tok)
    assert feature.input_ids.tolist() == ref["input_ids"]
    assert ((feature.labels != IGNORE_INDEX) == np.asarray(ref["assistant_masks"], bool)).all()


def test_the_issues_smollm2_replies(tokenizers):
    """Replies that also occur in the header ("a" of "assistant", "im", a newline)."""
    for reply in ["a", "im", "\n", "assistant"]:
        r, _ = rendered(tokenizers, "smollm2", [user("q"), bot(reply)])
        assert r.trained_text() == reply + "<|im_end|>\n"
        assert r.text.endswith("<|im_start|>assistant\n" + reply + "<|im_end|>\n")


def test_qwen3_trains_reasoning_where_the_conversation_holds_it(tokenizers):
    """Qwen 3 drops the reasoning of replies before the last user message: an earlier reply
    trains what the history holds (its answer), the last one its reasoning too."""
    messages = [
        user("2+2?"),
        {**bot("4"), "reasoning_content": "Two and two."},
        user("3+3?"),
        {**bot("6"), "reasoning_content": "Three and three."},
    ]
    r, _ = rendered(tokenizers, "qwen3", messages)
    assert [r.text[s:e] for s, e in r.spans] == [
        "4<|im_end|>\n",
        "<think>\nThree and three.\n</think>\n\n6<|im_end|>\n",
    ]
    # Reasoning inside an earlier reply's content is cut by the template itself: refused.
    messages[1] = bot("<think>\nTwo and two.\n</think>\n\n4")
    with pytest.raises(ValueError, match=r"message 1 \(assistant\).*rewrites or drops"):
        rendered(tokenizers, "qwen3", messages)


def test_text_after_the_end_of_turn_does_not_merge_into_the_next_header(tokenizers):
    """Mistral-7B-Instruct-v0.1's own template writes a space after EOS; BPE joins it with
    the next user turn's "[", which must not be trained."""
    tok = copy.copy(tokenizers["mistral"])
    tok.chat_template = MISTRAL.replace("eos_token}}", "eos_token + ' '}}")
    r = render(CONVERSATIONS["four_turns"], NATIVE, tok)
    assert [r.text[s:e] for s, e in r.spans][0] == "a</s> "
    ((feature, _),) = encode([r], tok)
    trained = [tok.decode([t]) for t in feature.labels[feature.labels != IGNORE_INDEX]]
    assert " [" not in trained


def test_a_template_that_renders_earlier_turns_differently_is_refused(tokenizers):
    """Mistral v0.3 moves the system prompt to the last user message: with it, the prompt
    of an earlier reply is not what the whole conversation holds before that reply."""
    tok = copy.copy(tokenizers["mistral"])
    tok.chat_template = MISTRAL_V3
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATIONS["four_turns"]]
    with pytest.raises(ValueError, match=r"message 2 \(assistant\).*generation prompt"):
        render(messages, NATIVE, tok)
    # Without a system prompt the template is prefix-preserving, and a reply is " " + text.
    r = render(CONVERSATIONS["four_turns"], NATIVE, tok)
    assert [r.text[s:e] for s, e in r.spans] == [" a</s>", " OK</s>", " </s>", " assistant</s>"]


def test_reasoning_a_template_drops_is_refused_not_trained(tokenizers):
    """DeepSeek-R1's template keeps only what follows </think>; with no prompt to align on,
    the reply cannot be located, and that is an error naming the message."""
    messages = [user("Hi"), bot("<think>\nhmm\n</think>\n\nHello.")]
    with pytest.raises(ValueError, match=r"message 1 \(assistant\).*rewrites or drops"):
        rendered(tokenizers, "deepseek_r1", messages)


def test_a_conversation_that_starts_with_a_reply_is_refused(tokenizers):
    with pytest.raises(ValueError, match=r"message 0 \(assistant\).*no prompt"):
        render([bot("Hello."), user("Hi")], NATIVE, tokenizers["smollm2"])
    # A template's own refusal is a ValueError too, so the example it came from is named.
    with pytest.raises(ValueError, match="cannot render this .*System role not supported"):
        render(CONVERSATIONS["system"], NATIVE, tokenizers["gemma"])


def test_a_prompt_for_generation_is_the_templates_own_with_the_same_history_spans(tokenizers):
    """At inference the text ends with the generation prompt; earlier replies keep their
    spans, and what training saw before a reply is exactly that prompt."""
    messages = CONVERSATIONS["four_turns"][:3]
    for family in ["llama3", "gptoss", "qwen3", "cohere2", "zephyr"]:
        tok = tokenizers[family]
        prompt = render(messages, NATIVE, tok, add_generation_prompt=True)
        assert prompt.text == apply(tok, messages, True)
        full = render([*messages, bot("x")], NATIVE, tok)
        assert full.text.startswith(prompt.text)
        assert full.spans[:-1] == prompt.spans and full.spans[-1][0] == len(prompt.text)


def split_config(*overrides: str):
    from instruct.config import compose

    return compose(["model=tiny", "trainer.tokenized_cache=false", *overrides])


def test_examples_dropped_after_truncation_are_named_and_counted(tokenizer):
    from instruct.data.features import DROPPED_NAMED, describe, tokenize_split

    long = "Tell me a long story about a lighthouse keeper and the ships she guides."
    examples = [
        {"instruction": "Hi", "output": "Hello.", "where": "chat.jsonl:1"},
        *(
            {"instruction": long, "output": "Once.", "where": f"chat.jsonl:{n}"}
            for n in range(2, 9)
        ),
        {"instruction": long, "output": "Twice."},  # no "where": named by its index
    ]
    cfg = split_config("template=native", "trainer.max_length=12")
    features, stats = tokenize_split(examples, cfg, tokenizer)
    assert (stats.kept, stats.dropped) == (1, 8)
    assert stats.dropped_examples == [f"chat.jsonl:{n}" for n in range(2, 2 + DROPPED_NAMED)]
    assert vars(stats)["dropped_examples"] == stats.dropped_examples  # what results.json gets
    line = describe("train", stats)
    assert "8 dropped" in line and "chat.jsonl:2, chat.jsonl:3" in line and "and 3 more" in line
    stats = tokenize_split(examples[-1:], cfg, tokenizer)[1]
    assert stats.dropped_examples == ["example 0"]
    assert "dropped" not in describe("train", tokenize_split(examples[:1], cfg, tokenizer)[1])


def test_a_reply_with_no_trained_token_is_an_error_naming_the_example(tokenizer):
    """A prompt that ends "Th" and a reply "e": BPE makes one token of "The", which starts
    before the reply and so is not trained; with no end-of-turn text, nothing of the reply
    is trained. That is an error naming the example, not a silent drop."""
    from instruct.data.features import tokenize_split

    examples = [
        {"instruction": "Hi", "output": "Hello.", "where": "a.jsonl:1"},
        {"instruction": "Spell it.", "output": "e", "where": "a.jsonl:2"},
    ]
    cfg = split_config("template=chatml", "template.assistant_prefix=Th", "template.end_of_turn=''")
    with pytest.raises(ValueError, match=r"a reply but no token to train on \(1\): a\.jsonl:2;"):
        tokenize_split(examples, cfg, tokenizer)


def test_a_refused_conversation_names_its_example(tokenizer):
    from instruct.data.features import tokenize_split

    examples = [
        {"messages": [user("Hi"), bot("Hello.")], "where": "chats.parquet:7"},
        {"messages": [bot("Hello."), user("Hi")], "where": "chats.parquet:8"},
    ]
    with pytest.raises(ValueError, match=r"^chats\.parquet:8: message 0 \(assistant\)"):
        tokenize_split(examples, split_config("template=native"), tokenizer)
