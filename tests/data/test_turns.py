"""Which turns are trained (data.train_on, data.train_on_prompt, per-message train and
weight), the weighted loss, and the wholly-inside rule for tokens at a span's edges.

Labels are checked against references computed here from the tokenizer's own offsets: a
token is trained when it lies wholly inside a span it should be trained on.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instruct.config import TrainOn, compose
from instruct.data import DataError
from instruct.data.batching import batch
from instruct.data.features import describe, tokenize_split
from instruct.data.sources import file_source
from instruct.data.templates import Rendered, render, render_many, to_messages
from instruct.data.tokenize import (
    IGNORE_INDEX,
    Feature,
    PrepareStats,
    encode,
    encode_flat,
    labels_from_spans,
    load_features,
    prepare,
    save_features,
)
from instruct.data.turns import select, turn_weights
from tests.data.test_tokenize import variant

NATIVE = SimpleNamespace(kind="native", name="native")
# SmolLM2's ChatML chat template, shortened: no default system prompt.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str, **keys) -> dict:
    return {"role": "assistant", "content": text, **keys}


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    user("Name a colour."),
    bot("Blue."),
    user("Another one?"),
    bot("Green, like grass."),
]


@pytest.fixture(scope="module")
def native_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    return tok


def reference_labels(tok, text: str, spans) -> list[int]:
    """From the tokenizer's offsets: trained when wholly inside one of ``spans``."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return [
        i if any(a <= s < b and e <= b for a, b in spans) else IGNORE_INDEX
        for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]


def content_span(text: str, content: str, after: int = 0) -> tuple[int, int]:
    start = text.index(content, after)
    return start, start + len(content)


def weighted(messages, mode: TrainOn, prompt: bool = False):
    conversations, weights = select([messages], mode, prompt, ["example"])
    return conversations[0], (weights or [None])[0]


# --- the wholly-inside rule -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["byte_level", "metaspace", "lstrip", "nfc"])
def test_a_token_crossing_a_span_end_is_untrained_and_counted_on_every_path(tokenizer, kind):
    """A span that ends inside a token (as a reply's trailing space ends inside " [" of
    Mistral's next "[INST]"): that token is not trained, whichever path labels it (byte
    positions for byte-level BPE, offsets for the others), and it is counted."""
    tok = tokenizer if kind == "byte_level" else variant(tokenizer, kind)
    text = "Question: hello there.\nAnswer: wonderful weather today"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    # The last multi-character token: the span ends after its first character.
    s, e = next(o for o in reversed(enc["offset_mapping"]) if o[1] - o[0] >= 3)
    spans = ((text.index("Answer"), s + 1),)
    ids, labels, lengths, straddles = encode_flat([Rendered(text, spans)], tok)
    assert labels.tolist() == reference_labels(tok, text, spans)
    crossing = enc["offset_mapping"].index((s, e))
    assert labels[crossing] == IGNORE_INDEX and labels[crossing - 1] != IGNORE_INDEX
    expected, k = labels_from_spans(enc["input_ids"], enc["offset_mapping"], spans)
    assert labels.tolist() == expected and straddles == [k]
    # Ended with that token instead, the span trains it and counts one crossing less (the
    # start may cross a token too: "\nAnswer" is one token for some of these tokenizers).
    whole = ((spans[0][0], e),)
    _, labels_whole, _, straddles_whole = encode_flat([Rendered(text, whole)], tok)
    assert labels_whole[crossing] != IGNORE_INDEX and straddles_whole == [k - 1]
    _, stats = prepare([Rendered(text, spans)], tok, max_length=1024)
    assert stats.boundary_merges == k
    assert f"{k} tokens cross the start or end of a trained span" in describe("train", stats)


def test_one_token_over_a_whole_span_is_counted_once(tokenizer):
    text = "The wonderful weather."
    for tok in (tokenizer, variant(tokenizer, "metaspace")):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        s, e = next(o for o in enc["offset_mapping"] if o[1] - o[0] >= 4)
        spans = ((s + 1, e - 1),)  # inside one token: it crosses both ends
        _, labels, _, straddles = encode_flat([Rendered(text, spans)], tok)
        assert (labels == IGNORE_INDEX).all() and straddles == [1]


@pytest.mark.parametrize("kind", ["byte_level", "metaspace", "lstrip", "nfc"])
def test_random_spans_train_exactly_the_tokens_wholly_inside(tokenizer, templates, kind):
    """Every labelling path against the offsets reference, with spans cut anywhere (inside
    words and multi-byte characters) so that tokens cross both ends of spans."""
    import random

    tok = tokenizer if kind == "byte_level" else variant(tokenizer, kind)
    rng = random.Random(1)
    texts = [
        render(CONVERSATION, templates[name], tok).text for name in ("chatml", "alpaca", "vicuna")
    ]
    texts.append("Cafe\u0301 and caf\u00e9 \u4f60\u597d\uff0c\u4e16\u754c \U0001f600\U0001f600 ok.")
    rendered = []
    for text in texts * 5:
        cuts = sorted(rng.sample(range(len(text) + 1), 6))
        rendered.append(Rendered(text, tuple((cuts[i], cuts[i + 1]) for i in range(0, 6, 2))))
    ids, labels, lengths, straddles = encode_flat(rendered, tok)
    start = 0
    for r, n in zip(rendered, lengths, strict=True):
        assert labels[start : start + n].tolist() == reference_labels(tok, r.text, r.spans), r
        start += n
    assert sum(straddles) > 0


# --- train_on ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chatml", "alpaca", "native"])
def test_last_assistant_trains_only_the_last_reply(templates, tokenizer, native_tokenizer, name):
    template = NATIVE if name == "native" else templates[name]
    tok = native_tokenizer if name == "native" else tokenizer
    every = render(CONVERSATION, template, tok)
    messages, weights = weighted(CONVERSATION, TrainOn.last_assistant)
    assert weights == [0, 0, 0, 0, 1]
    (r,) = render_many([messages], template, tok, weights=[weights])
    assert r.text == every.text and r.spans == every.spans[-1:] and r.weights == ()
    assert r.trained_text().startswith("Green, like grass.")
    ((feature, _),) = encode([r], tok)
    assert feature.labels.tolist() == reference_labels(tok, r.text, every.spans[-1:])
    assert feature.weights is None


def test_all_assistant_and_unmarked_per_message_render_as_before(templates, tokenizer):
    for mode in (TrainOn.all_assistant, TrainOn.per_message):
        conversations, weights = select([CONVERSATION], mode, False, ["x"])
        assert weights is None and conversations == [CONVERSATION]


@pytest.mark.parametrize("name", ["chatml", "native"])
def test_per_message_train_false_leaves_that_reply_untrained(
    templates, tokenizer, native_tokenizer, name
):
    template = NATIVE if name == "native" else templates[name]
    tok = native_tokenizer if name == "native" else tokenizer
    marked = [*CONVERSATION[:2], bot("Blue.", train=False), *CONVERSATION[3:]]
    messages, weights = weighted(marked, TrainOn.per_message)
    assert weights == [0, 0, 0, 0, 1] and all("train" not in m for m in messages)
    (r,) = render_many([messages], template, tok, weights=[weights])
    every = render(CONVERSATION, template, tok)
    ((feature, _),) = encode([r], tok)
    assert feature.labels.tolist() == reference_labels(tok, r.text, every.spans[-1:])
    first_reply = every.spans[0]
    enc = tok(r.text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [k for k, (s, _) in enumerate(enc["offset_mapping"]) if first_reply[0] <= s]
    inside = [k for k in inside if enc["offset_mapping"][k][1] <= first_reply[1]]
    assert inside and all(feature.labels[k] == IGNORE_INDEX for k in inside)


@pytest.mark.parametrize("name", ["chatml", "native"])
def test_per_message_weights_reach_each_trained_token(templates, tokenizer, native_tokenizer, name):
    template = NATIVE if name == "native" else templates[name]
    tok = native_tokenizer if name == "native" else tokenizer
    marked = [*CONVERSATION[:2], bot("Blue.", weight=0.25), *CONVERSATION[3:]]
    messages, weights = weighted(marked, TrainOn.per_message)
    assert weights == [0, 0, 0.25, 0, 1]
    (r,) = render_many([messages], template, tok, weights=[weights])
    every = render(CONVERSATION, template, tok)
    assert r.spans == every.spans and r.weights == (0.25, 1.0)
    ((feature, _),) = encode([r], tok)
    assert feature.labels.tolist() == reference_labels(tok, r.text, every.spans)
    enc = tok(r.text, add_special_tokens=False, return_offsets_mapping=True)
    for k, (s, _) in enumerate(enc["offset_mapping"]):
        if feature.labels[k] != IGNORE_INDEX:
            expected = 0.25 if s < every.spans[0][1] else 1.0
            assert feature.weights[k] == expected
    features, stats = prepare([r], tok, max_length=1024)
    assert features[0] == feature and stats.weighted == 1


def test_weight_zero_is_train_false(templates, tokenizer):
    t = templates["chatml"]
    zero = weighted([*CONVERSATION[:2], bot("Blue.", weight=0), *CONVERSATION[3:]], "per_message")
    off = weighted([*CONVERSATION[:2], bot("Blue.", train=False), *CONVERSATION[3:]], "per_message")
    assert zero == off
    (a,), (b,) = (render_many([m], t, tokenizer, weights=[w]) for m, w in (zero, off))
    assert a == b and len(a.spans) == 1


# --- train_on_prompt --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chatml", "alpaca", "native"])
def test_train_on_prompt_trains_system_and_user_content(
    templates, tokenizer, native_tokenizer, name
):
    template = NATIVE if name == "native" else templates[name]
    tok = native_tokenizer if name == "native" else tokenizer
    messages, weights = weighted(CONVERSATION, TrainOn.all_assistant, prompt=True)
    assert weights == [1, 1, 1, 1, 1]
    (r,) = render_many([messages], template, tok, weights=[weights])
    replies = render(CONVERSATION, template, tok).spans
    prompt_spans, at = [], 0
    for m in CONVERSATION:
        if m["role"] != "assistant":
            prompt_spans.append(content_span(r.text, m["content"], at))
            at = prompt_spans[-1][1]
    assert set(r.spans) == set(prompt_spans) | set(replies)
    assert [r.text[s:e] for s, e in prompt_spans] == ["Be brief.", "Name a colour.", "Another one?"]
    ((feature, _),) = encode([r], tok)
    assert feature.labels.tolist() == reference_labels(tok, r.text, r.spans)


def test_train_on_prompt_with_last_assistant(templates, tokenizer):
    t = templates["chatml"]
    messages, weights = weighted(CONVERSATION, TrainOn.last_assistant, prompt=True)
    (r,) = render_many([messages], t, tokenizer, weights=[weights])
    trained = [r.text[s:e] for s, e in r.spans]
    assert "Be brief." in trained and "Another one?" in trained
    assert not any(x.startswith("Blue.") for x in trained)


def test_an_alpaca_example_trains_its_instruction_with_train_on_prompt(templates, tokenizer):
    t = templates["alpaca"]
    example = {"instruction": "Add 2 and 3.", "input": "Numbers: 2, 3", "output": "5"}
    messages, weights = weighted(to_messages(example, t), TrainOn.all_assistant, prompt=True)
    (r,) = render_many([messages], t, tokenizer, weights=[weights])
    trained = r.trained_text()
    assert "Add 2 and 3." in trained and "Numbers: 2, 3" in trained and "5" in trained
    assert "### Instruction" not in trained and "### Response" not in trained


# --- errors -----------------------------------------------------------------------------


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_with(message: dict) -> list[dict]:
    plain = {"messages": [user("Hi"), bot("Hello.")]}
    return [plain, {"messages": [user("Hi"), message]}]


def split_cfg(path: Path, *overrides: str):
    return compose(
        [
            "model=tiny",
            "template=chatml",
            "data=file",
            f"data.paths=[{path}]",
            "trainer.tokenized_cache=false",
            *overrides,
        ]
    )


@pytest.mark.parametrize(
    ("message", "key"),
    [(bot("x", weight=1.5), "weight"), (bot("x", weight=-0.1), "weight"),
     (bot("x", weight="1"), "weight"), (bot("x", train="no"), "train"),
     (bot("x", train=1), "train")],
)  # fmt: skip
def test_a_bad_train_or_weight_names_file_row_and_key(tmp_path, message, key):
    path = write_jsonl(tmp_path / "d.jsonl", rows_with(message))
    cfg = split_cfg(path, "data.train_on=per_message")
    with pytest.raises(DataError, match=rf"d\.jsonl:2: message 1: key '{key}'"):
        file_source(cfg.data.paths, cfg.data).examples()


@pytest.mark.parametrize("mode", ["all_assistant", "last_assistant"])
@pytest.mark.parametrize("key", ["train", "weight"])
def test_train_or_weight_without_per_message_is_an_error(tmp_path, tokenizer, mode, key):
    value = True if key == "train" else 1
    path = write_jsonl(tmp_path / "d.jsonl", rows_with(bot("x", **{key: value})))
    cfg = split_cfg(path, f"data.train_on={mode}")
    examples = file_source(cfg.data.paths, cfg.data).examples()
    with pytest.raises(DataError, match=rf"d\.jsonl:2: message 1 has the key '{key}'.*{mode}"):
        tokenize_split(examples, cfg, tokenizer)


def test_train_or_weight_on_a_user_message_needs_train_on_prompt(tokenizer):
    messages = [
        user(
            "Hi",
        )
        | {"weight": 0.5},
        bot("Hello."),
    ]
    with pytest.raises(DataError, match=r"x\.jsonl:3: message 0 \(user\) has the key 'weight'"):
        turn_weights(messages, TrainOn.per_message, False, "x.jsonl:3")
    assert turn_weights(messages, TrainOn.per_message, True) == [0.5, 1.0]


def test_an_unknown_train_on_fails_at_composition():
    with pytest.raises(Exception, match="train_on"):
        compose(["data=manual", "data.train_on=first_assistant"])


def test_every_reply_train_false_is_a_drop_not_an_error(tmp_path, tokenizer):
    rows = [{"messages": [user("Hi"), bot("Hello.")]}] * 2
    rows.append({"messages": [user("Hi"), bot("Hello.", train=False)]})
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = split_cfg(path, "data.train_on=per_message")
    features, stats = tokenize_split(
        file_source(cfg.data.paths, cfg.data).examples(), cfg, tokenizer
    )
    assert (stats.kept, stats.dropped) == (2, 1) and stats.dropped_examples == [f"{path}:3"]


# --- features, cache, batches -----------------------------------------------------------


def weighted_features(templates, tokenizer) -> list[Feature]:
    t = templates["chatml"]
    conversations = [
        [*CONVERSATION[:2], bot("Blue.", weight=0.25), *CONVERSATION[3:]],
        CONVERSATION,
        [user("Count to three."), bot("One, two, three.", weight=0.5)],
    ]
    conversations, weights = select(conversations, "per_message", False, ["a", "b", "c"])
    features, _ = prepare(render_many(conversations, t, tokenizer, weights=weights), tokenizer, 512)
    return features


def test_the_cache_keeps_weights(templates, tokenizer, tmp_path):
    features = weighted_features(templates, tokenizer)
    assert [f.weights is not None for f in features] == [True, False, True]
    stats = PrepareStats(kept=len(features))
    save_features(tmp_path / "x.npz", features, stats)
    loaded, _ = load_features(tmp_path / "x.npz")
    assert loaded == features
    save_features(tmp_path / "y.npz", features[1:2], stats)
    with np.load(tmp_path / "y.npz") as entry:
        assert "weights" not in entry  # nothing stored for unweighted features


def test_batches_carry_weights_only_when_some_feature_has_them(templates, tokenizer):
    features = weighted_features(templates, tokenizer)
    for packed in (False, True):
        assert "weights" not in batch(features[1:2], tokenizer.pad_token_id, packed)
        b = batch(features, tokenizer.pad_token_id, packed)
        w, labels = b["weights"], b["labels"]
        assert w.shape == labels.shape and w.dtype == torch.float32
        got = sorted(set(w[labels != IGNORE_INDEX].tolist()))
        assert got == [0.25, 0.5, 1.0]


# --- the weighted loss ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from instruct.kernels.packed_attention import use_packed_attention
    from instruct.model import build_model, fit_tokenizer

    cfg = compose(["model=tiny", "template=chatml", "lora=none"])
    model, tok = build_model(cfg.model)
    fit_tokenizer(model, tok, cfg.template)
    use_packed_attention(model)
    return model.eval(), tok, cfg


def per_token_losses(model, features, pad_id):
    """Each supervised token's loss and weight, from the full forward of a padded batch."""
    b = batch(features, pad_id, False)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    labels = b["labels"][:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    mask = labels.reshape(-1) != IGNORE_INDEX
    w = b["weights"][:, 1:].reshape(-1) if "weights" in b else torch.ones_like(losses)
    return losses[mask], w[mask]


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_the_loss_and_its_gradient_are_the_weighted_mean(templates, tiny, packed, fused):
    from instruct.loss import loss_sum

    model, tok, _ = tiny
    features = weighted_features(templates, tok)
    losses, w = per_token_losses(model, features, tok.pad_token_id)
    expected = (losses * w).sum() / w.sum()
    assert set(w.tolist()) == {0.25, 0.5, 1.0}
    expected.backward()
    want = grads(model)
    loss, count = loss_sum(model, batch(features, tok.pad_token_id, packed), fused)
    assert count == pytest.approx(float(w.sum()))
    assert (loss / count).item() == pytest.approx(expected.item(), rel=1e-5)
    (loss / count).backward()
    got = grads(model)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_without_weights_the_loss_is_the_plain_token_mean(templates, tiny):
    from instruct.loss import loss_sum

    model, tok, _ = tiny
    features = [f for f in weighted_features(templates, tok) if f.weights is None]
    losses, _ = per_token_losses(model, features, tok.pad_token_id)
    loss, count = loss_sum(model, batch(features, tok.pad_token_id, True))
    assert isinstance(count, int) and count == len(losses)
    assert loss.item() == pytest.approx(losses.sum().item(), rel=1e-5)


def test_a_weight_zero_turn_contributes_nothing(templates, tiny):
    """Weight 0 on the first reply: the loss is the mean of the other reply's token losses,
    taken from the conversation with every reply trained."""
    from instruct.loss import loss_sum

    model, tok, _ = tiny
    t = templates["chatml"]
    marked = [*CONVERSATION[:2], bot("Blue.", weight=0.0), *CONVERSATION[3:]]
    extra = weighted_features(templates, tok)[2]  # a weighted neighbour in the batch
    conversations, weights = select([marked], "per_message", False, ["x"])
    (zero,), _ = prepare(render_many(conversations, t, tok, weights=weights), tok, 512)
    (full,), _ = prepare(render_many([CONVERSATION], t, tok), tok, 512)
    assert np.array_equal(zero.input_ids, full.input_ids)
    losses, _ = per_token_losses(model, [full], tok.pad_token_id)
    supervised = full.labels[1:] != IGNORE_INDEX
    kept = torch.from_numpy((zero.labels[1:] != IGNORE_INDEX)[supervised])
    assert 0 < int(kept.sum()) < len(kept)  # the first reply's tokens are left out
    extra_losses, extra_w = per_token_losses(model, [extra], tok.pad_token_id)
    expected = (losses[kept].sum() + (extra_losses * extra_w).sum()) / (kept.sum() + extra_w.sum())
    loss, count = loss_sum(model, batch([zero, extra], tok.pad_token_id, False))
    assert count == pytest.approx(float(kept.sum() + extra_w.sum()))
    assert (loss / count).item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_step_divides_by_the_weights_of_every_micro_batch(templates, tiny):
    """Run.step_once over two micro-batches: the step's loss is sum(w * loss) / sum(w) of
    all of them, and so is its gradient (an SGD step of lr 1 moves each weight by it)."""
    from instruct.engine import Engine
    from instruct.loss import loss_sum
    from instruct.parallel import strategy_for
    from instruct.parallel.launch import new_accelerator
    from instruct.train import Run, Splits

    model, tok, cfg = tiny
    model = copy.deepcopy(model)
    features = weighted_features(templates, tok)
    losses, w = per_token_losses(model, features, tok.pad_token_id)
    expected = (losses * w).sum() / w.sum()
    expected.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    accelerator = new_accelerator("no")
    engine = Engine(accelerator, strategy_for(accelerator), model, tok, optimizer, scheduler,
                    loss_sum)  # fmt: skip
    run = SimpleNamespace(
        engine=engine,
        data=Splits(features, [], packed=True),
        cfg=SimpleNamespace(
            trainer=SimpleNamespace(fused_loss=True), optimizer=SimpleNamespace(max_grad_norm=None)
        ),
    )
    loss, n_sup, _ = Run.step_once(run, [features[:2], features[2:]])
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert n_sup == len(losses)  # tokens, for throughput; the mean is over their weights
    for p, p0, g in zip(model.parameters(), before, want, strict=True):
        torch.testing.assert_close(p0 - p.detach(), g, rtol=1e-4, atol=1e-6)


# --- a run end to end -------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_with_per_message_weights_trains_and_reports_them(tmp_path):
    from instruct.train import train

    rows = [
        {"messages": [user(f"Greet {n}."), bot("Hello!", weight=0.5), user("Again."), bot("Hi!")]}
        for n in ["Ada", "Bob", "Chen", "Dana", "Eve", "Femi", "Gus", "Hana"]
    ]
    path = write_jsonl(tmp_path / "w.jsonl", rows)
    cfg = compose(
        [
            "model=tiny",
            "template=chatml",
            "data=file",
            f"data.paths=[{path}]",
            "data.train_on=per_message",
            "data.val_fraction=0.25",
            "lora=none",
            "logger=none",
            "eval=none",
            "trainer.max_steps=3",
            "trainer.eval_every=3",
            "trainer.batch_size=3",
            "trainer.samples=0",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    results = train(cfg)
    assert results["data"]["train"]["weighted"] == 6
    assert np.isfinite(results["best_val_loss"])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "boundary_merges" in saved["data"]["train"]


# --- streaming --------------------------------------------------------------------------


def test_streaming_honours_train_on_and_refuses_weights(templates, tokenizer):
    from instruct.data.stream import prepare_stream

    t = templates["chatml"]
    examples = [{"messages": CONVERSATION, "where": "s.jsonl:1"}]
    streamed = prepare_stream([examples], t, tokenizer, 512, "last_assistant")
    messages, weights = weighted(CONVERSATION, TrainOn.last_assistant)
    expected, _ = prepare(render_many([messages], t, tokenizer, weights=[weights]), tokenizer, 512)
    assert streamed[0] == expected[0]
    marked = [{"messages": [user("Hi"), bot("Hello.", weight=0.5)], "where": "s.jsonl:2"}]
    with pytest.raises(ValueError, match=r"s\.jsonl:2: a message's weight"):
        prepare_stream([marked], t, tokenizer, 512, "per_message")
    with pytest.raises(DataError, match=r"s\.jsonl:2: message 1 has the key 'weight'"):
        prepare_stream([marked], t, tokenizer, 512)


def test_a_checkpoint_saved_before_train_on_existed_resumes_with_the_defaults():
    from instruct.train import changed_keys

    saved = {"data": {"source": "manual", "val_fraction": 0.1}, "seed": 0}
    current = {"data": {**saved["data"], "train_on": "all_assistant", "train_on_prompt": False}}
    assert changed_keys(saved, {**current, "seed": 0}) == []
    current["data"]["train_on"] = "last_assistant"
    assert changed_keys(saved, {**current, "seed": 0}) == ["data.train_on"]
