"""Labels cover exactly the replies and their end-of-turn token, for every template; the
tokenised cache is read back only for the same work."""

from __future__ import annotations

import logging

import pytest

from instruct.config import compose
from instruct.data import load_splits
from instruct.data.templates import Rendered, render, render_many, to_messages
from instruct.data.tokenize import (
    IGNORE_INDEX,
    Feature,
    encode,
    labels_from_spans,
    prepare,
    prepare_cached,
)
from instruct.model import build_model

REPLIES = {
    "plain": "The answer is 42.",
    "no_space": "42 is the answer.",
    "code": "```python\ndef add(a, b):\n    return a + b\n```\nIt adds two numbers.",
    "non_ascii": "Straße, café, ¿Dónde está? — 20 °C, π ≈ 3.14 🍞",
}
EOT = {
    "alpaca": "<|endoftext|>",
    "vicuna": "<|endoftext|>",
    "zephyr": "<|endoftext|>",
    "native": "<|endoftext|>",
    "chatml": "<|im_end|>",
}
LEAD = {"vicuna": " "}  # vicuna's reply starts with the space after "ASSISTANT:"
# A native template trains all it writes after a reply: the tiny template's \n after EOS too.
TAIL = {"native": "\n"}


def supervised_runs(tokenizer, feature: Feature) -> list[str]:
    """Decode each contiguous run of trained tokens."""
    runs, current = [], []
    for label in [*feature.labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def tokenized(messages, template, tokenizer) -> Feature:
    ((feature, straddles),) = encode([render(messages, template, tokenizer)], tokenizer)
    assert straddles == 0
    return feature


@pytest.mark.parametrize("kind", sorted(REPLIES))
@pytest.mark.parametrize("name", sorted(EOT))
def test_supervised_tokens_decode_to_the_reply(templates, tokenizer, name, kind):
    t = templates[name]
    reply = REPLIES[kind]
    feature = tokenized(to_messages({"instruction": "Answer.", "output": reply}, t), t, tokenizer)
    tail = TAIL.get(name, "")
    assert supervised_runs(tokenizer, feature) == [LEAD.get(name, "") + reply + EOT[name] + tail]
    # The end-of-turn token itself is trained, so the model learns to stop.
    trained = [label for label in feature.labels if label != IGNORE_INDEX]
    assert trained[-1 - len(tail)] == tokenizer.convert_tokens_to_ids(EOT[name])


@pytest.mark.parametrize("name", sorted(EOT))
def test_every_assistant_turn_of_a_conversation_is_trained(templates, tokenizer, name):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": REPLIES["non_ascii"]},
        {"role": "user", "content": "Code?"},
        {"role": "assistant", "content": REPLIES["code"]},
    ]
    feature = tokenized(messages, templates[name], tokenizer)
    lead = LEAD.get(name, "")
    assert supervised_runs(tokenizer, feature) == [
        lead + m["content"] + EOT[name] + TAIL.get(name, "")
        for m in messages
        if m["role"] == "assistant"
    ]


def test_prompt_tokens_are_a_prefix_of_the_training_tokens(templates, tokenizer):
    """What generation feeds the model is token for token what training saw before a reply."""
    for name, t in templates.items():
        messages = to_messages({"instruction": "Say hi.", "output": "Hi!"}, t)
        full = tokenized(messages, t, tokenizer)
        prompt = render(messages[:-1], t, tokenizer, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt.text, add_special_tokens=False).input_ids
        assert full.input_ids[: len(prompt_ids)].tolist() == prompt_ids, name
        assert all(label == IGNORE_INDEX for label in full.labels[: len(prompt_ids)]), name


def test_a_token_straddling_the_reply_start_is_counted_not_trained():
    ids = [10, 11, 12]
    offsets = [(0, 3), (3, 7), (7, 9)]  # token 1 covers chars 3..7; the reply starts at 5
    labels, straddles = labels_from_spans(ids, offsets, [(5, 9)])
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, 12] and straddles == 1


def test_truncation_keeps_what_fits_and_drops_examples_with_nothing_left(templates, tokenizer):
    t = templates["chatml"]
    short = render(to_messages({"instruction": "Hi", "output": "Hello there."}, t), t, tokenizer)
    long_prompt = render(
        to_messages({"instruction": "word " * 200, "output": "Fine."}, t), t, tokenizer
    )
    long_reply = render(
        to_messages({"instruction": "Count.", "output": "one two " * 100}, t), t, tokenizer
    )
    features, stats = prepare([short, long_prompt, long_reply], tokenizer, max_length=64)
    assert (stats.examples, stats.kept, stats.truncated, stats.dropped) == (3, 2, 2, 1)
    assert all(len(f.input_ids) <= 64 for f in features)
    cut = features[1]
    assert len(cut.input_ids) == 64 and cut.labels[-1] != IGNORE_INDEX
    assert stats.supervised_tokens == sum(f.supervised for f in features)


def test_rendered_spans_outside_the_text_train_nothing(tokenizer):
    ((feature, _),) = encode([Rendered("hello world", ())], tokenizer)
    assert feature.supervised == 0


def variant(tokenizer, kind: str):
    """The tiny tokenizer rebuilt with one pipeline step changed, for the labelling paths."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    if kind == "nfc":  # tiles once the text is NFC: others fall back per conversation
        backend.normalizer = normalizers.NFC()
    elif kind == "split_then_bytes":  # Llama 3 / Qwen style
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(r"\p{N}{1,3}", "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif kind == "metaspace":  # SentencePiece style: spaces become ▁, no byte tiling
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
    elif kind == "lstrip":  # an added token that takes the spaces before it
        backend.add_special_tokens([AddedToken("<sep>", lstrip=True)])
    elif kind == "prefix_space":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=tokenizer.eos_token,
        chat_template=tokenizer.chat_template,
    )


TILES = {
    "byte_level": True,
    "nfc": True,
    "split_then_bytes": True,
    "metaspace": False,
    "lstrip": False,
    "prefix_space": False,
}


@pytest.mark.parametrize("kind", sorted(TILES))
def test_byte_position_labels_equal_offset_labels_on_random_spans(tokenizer, templates, kind):
    """Labels and straddle counts follow the offset rule whichever path a tokenizer takes:
    byte positions for byte-level BPE (per conversation, when a normalizer leaves its text
    alone), the tokenizer's offsets otherwise. Spans fall anywhere: mid-word, inside a
    multi-byte character, empty, at the end."""
    import random

    from instruct.data.tokenize import encode_flat, token_byte_lengths

    tok = tokenizer if kind == "byte_level" else variant(tokenizer, kind)
    assert (token_byte_lengths(tok.backend_tokenizer) is not None) == TILES[kind]
    rng = random.Random(0)
    replies = [
        *REPLIES.values(),
        "Cafe\u0301 and cafe\u0301 are not NFC; caf\u00e9 is.",
        "Before <sep> after, 12345 <|endoftext|> tail   ",
        "\u4f60\u597d\uff0c\u4e16\u754c\u3002 \U0001f600\U0001f600 x\u200by",
    ]
    texts = [
        render(to_messages({"instruction": "Answer.", "output": reply}, t), t, tok).text
        for t in templates.values()
        for reply in replies
    ]
    rendered = []
    for text in texts * 4:
        cuts = sorted(rng.sample(range(len(text) + 1), 6))
        spans = tuple((cuts[i], cuts[i + 1]) for i in range(0, 6, 2))
        rendered.append(Rendered(text, spans))
    rendered.append(Rendered("", ((0, 0),)))
    rendered.append(Rendered("ab", ((1, 5), (7, 9))))  # past the end of the text
    ids, labels, lengths, straddles = encode_flat(rendered, tok)
    assert len(ids) == len(labels) == sum(lengths)
    start = 0
    for r, n, k in zip(rendered, lengths, straddles, strict=True):
        enc = tok(r.text, add_special_tokens=False, return_offsets_mapping=True)
        expected, expected_k = labels_from_spans(enc["input_ids"], enc["offset_mapping"], r.spans)
        assert ids[start : start + n].tolist() == enc["input_ids"]
        assert labels[start : start + n].tolist() == expected, r
        assert k == expected_k, r
        start += n
    assert sum(straddles) > 0  # mid-word cuts do occur, so the straddle rule was exercised


@pytest.mark.slow
def test_tokenised_cache_hits_on_the_same_work_and_misses_on_any_change(tmp_path):
    cfg = compose(["model=tiny", "template=chatml"])
    _, tokenizer = build_model(cfg.model)
    examples, _ = load_splits(cfg.data, cfg.seed)
    rendered = render_many([to_messages(e, cfg.template) for e in examples], cfg.template,
                           tokenizer)  # fmt: skip
    first, stats = prepare_cached(rendered, tokenizer, 64, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1 and stats.truncated > 0

    calls = []

    def counted(*args):
        calls.append(args)
        return prepare(*args)

    again, stats_again = prepare_cached(rendered, tokenizer, 64, tmp_path, counted)
    assert calls == [] and again == first and stats_again == stats

    prepare_cached(rendered, tokenizer, 128, tmp_path, counted)  # another max_length
    prepare_cached(rendered[:-1], tokenizer, 64, tmp_path, counted)  # other data
    tokenizer.add_tokens(["<|new|>"], special_tokens=True)  # another tokenizer
    prepare_cached(rendered, tokenizer, 64, tmp_path, counted)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.npz"))) == 4


@pytest.mark.slow
def test_a_corrupt_cache_entry_is_rebuilt(tmp_path, caplog):
    cfg = compose(["model=tiny"])
    _, tokenizer = build_model(cfg.model)
    examples, _ = load_splits(cfg.data, cfg.seed)
    rendered = render_many([to_messages(e, cfg.template) for e in examples[:5]], cfg.template,
                           tokenizer)  # fmt: skip
    features, _ = prepare_cached(rendered, tokenizer, 256, tmp_path)
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        again, _ = prepare_cached(rendered, tokenizer, 256, tmp_path)
    assert again == features and "unreadable tokenised cache" in caplog.text


def test_a_large_split_tokenised_in_chunks_gives_the_same_features_and_counts(templates, tokenizer):
    from instruct.data.features import prepare_in_chunks

    t = templates["chatml"]
    examples = [
        {"instruction": f"Say {i}. " + "word " * (i * 7 % 90), "output": f"{i} " * (i % 11)}
        for i in range(40)
    ]  # some cut by max_length, some with nothing left to train (empty replies)
    rendered = [render(to_messages(e, t), t, tokenizer) for e in examples]
    whole, stats = prepare(rendered, tokenizer, max_length=96)
    chunked, chunk_stats = prepare_in_chunks(rendered, tokenizer, 96, chunk=7)
    assert chunk_stats == stats and stats.truncated > 0 and stats.dropped > 0
    assert [(f.input_ids.tolist(), f.labels.tolist()) for f in chunked] == [
        (f.input_ids.tolist(), f.labels.tolist()) for f in whole
    ]
