"""The speed levers outside :mod:`instruct.kernels` give the result of the plain path (packed
rows, output layer at supervised positions, tokenised cache, fused AdamW). Each kernel has its
own test file under ``tests/kernels/``."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from instruct.config import compose
from instruct.data import load_splits
from instruct.data.batching import pack
from instruct.data.tokenize import IGNORE_INDEX, Feature, prepare_cached
from instruct.loss import loss_sum
from instruct.model import build_model
from instruct.train import train
from tests.conftest import toy_config
from tests.kernels.tiny import tiny


def test_pack_lays_examples_end_to_end():
    a = Feature([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = Feature([8, 9], [8, 9])  # a label at position 0 is never a target
    row = pack([a, b])
    assert row["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # The first token of b would be predicted from a's last token: never a target.
    assert row["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert row["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert row["max_length_q"] == 3


@pytest.mark.slow
def test_tokenised_cache_hits_on_the_same_work_and_misses_on_any_change(tmp_path, monkeypatch):
    import instruct.data.tokenize as tok_module
    from instruct.data.templates import render_many, to_messages

    cfg = compose(["model=tiny", "template=chatml"])
    _, tokenizer = build_model(cfg.model)
    examples, _ = load_splits(cfg.data, cfg.seed)
    rendered = render_many([to_messages(e, cfg.template) for e in examples], cfg.template,
                           tokenizer)  # fmt: skip
    first, stats = prepare_cached(rendered, tokenizer, 64, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1 and stats.truncated > 0

    calls = []
    real_prepare = tok_module.prepare
    monkeypatch.setattr(tok_module, "prepare", lambda *a: calls.append(a) or real_prepare(*a))
    again, stats_again = prepare_cached(rendered, tokenizer, 64, tmp_path)
    assert calls == [] and again == first and stats_again == stats

    prepare_cached(rendered, tokenizer, 128, tmp_path)  # another max_length
    prepare_cached(rendered[:-1], tokenizer, 64, tmp_path)  # other data
    tokenizer.add_tokens(["<|new|>"], special_tokens=True)  # another tokenizer
    prepare_cached(rendered, tokenizer, 64, tmp_path)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.npz"))) == 4


@pytest.mark.slow
def test_a_corrupt_cache_entry_is_rebuilt(tmp_path, caplog):
    cfg = compose(["model=tiny"])
    _, tokenizer = build_model(cfg.model)
    from instruct.data.templates import render_many, to_messages

    examples, _ = load_splits(cfg.data, cfg.seed)
    rendered = render_many([to_messages(e, cfg.template) for e in examples[:5]], cfg.template,
                           tokenizer)  # fmt: skip
    features, _ = prepare_cached(rendered, tokenizer, 256, tmp_path)
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        again, _ = prepare_cached(rendered, tokenizer, 256, tmp_path)
    assert again == features and "unreadable tokenised cache" in caplog.text


@pytest.mark.slow
def test_fused_adamw_takes_the_same_steps_as_foreach(toy_data, tmp_path):
    common = ("logger=none", "trainer.max_steps=4", "trainer.save_best=false")
    fused = train(toy_config(toy_data, tmp_path / "a", "optimizer.fused=true", *common))
    plain = train(toy_config(toy_data, tmp_path / "b", "optimizer.fused=false", *common))
    for (_, x), (_, y) in zip(
        fused["train_loss_history"], plain["train_loss_history"], strict=True
    ):
        assert x == pytest.approx(y, rel=1e-5)


@pytest.mark.slow
def test_loss_sum_with_full_logits_on_a_packed_row_matches():
    """The full-forward fallback (used under DDP) reads packed rows the same way."""
    _, model, tokenizer, features = tiny("lora=none")
    model.eval()
    row = pack(features)
    fast, n = loss_sum(model, row)
    logits = model(**{k: v for k, v in row.items() if k != "labels"}, use_cache=False).logits
    labels = row["labels"][:, 1:]
    full = F.cross_entropy(logits[0, :-1], labels[0], ignore_index=IGNORE_INDEX, reduction="sum")
    assert n == int((labels != IGNORE_INDEX).sum())
    assert torch.allclose(fast, full, rtol=1e-5)


@pytest.mark.slow
def test_a_wrapped_model_computes_logits_only_at_supervised_positions():
    """A wrapper (as DDP is) whose forward must run: logits_to_keep gives the same loss."""
    _, model, tokenizer, features = tiny("lora=none")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, **kwargs):
            kept.append(kwargs.get("logits_to_keep"))
            return self.module(**kwargs)

    kept: list = []
    row = pack(features)
    direct, n = loss_sum(model, row)
    wrapped, m = loss_sum(Wrapper(model), row)
    assert n == m and torch.allclose(direct, wrapped, rtol=1e-5)
    assert len(kept[0]) == n  # one position per supervised token, not the whole row
