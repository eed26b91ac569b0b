"""The tiny model with the toy data's first features, for the kernels' tests."""

from __future__ import annotations

from instruct.config import compose
from instruct.data import load_splits
from instruct.data.features import tokenize_split
from instruct.kernels.packed_attention import PACKED_ATTENTION, use_packed_attention
from instruct.model import apply_lora, build_model, fit_tokenizer


def tiny(*overrides: str, packed: bool = True):
    cfg = compose(["model=tiny", "template=chatml", *overrides])
    model, tokenizer = build_model(cfg.model)
    new_ids = fit_tokenizer(model, tokenizer, cfg.template)
    if packed:
        assert use_packed_attention(model) == PACKED_ATTENTION
    model = apply_lora(model, cfg.lora, new_ids)
    train_examples, _ = load_splits(cfg.data, cfg.seed)
    features, _ = tokenize_split(train_examples[:8], cfg, tokenizer)
    return cfg, model, tokenizer, features
