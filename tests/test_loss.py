"""The response-only loss: the output layer at supervised positions only gives the loss of
the full forward, on padded batches and packed rows, through a wrapper as DDP is."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instruct.config import compose
from instruct.data import load_splits
from instruct.data.batching import collate, pack
from instruct.data.features import tokenize_split
from instruct.data.tokenize import IGNORE_INDEX
from instruct.loss import decoder_and_head, loss_sum
from instruct.model import apply_lora, build_model, fit_tokenizer
from tests.kernels.tiny import tiny


@pytest.mark.slow
@pytest.mark.parametrize("lora", ["lora=none", "lora=default"])
def test_output_layer_only_at_supervised_positions_gives_the_full_forward_loss(lora):
    """The fast path (decoder, then the head on supervised rows) equals the full forward."""
    cfg = compose(["model=tiny", "template=chatml", lora])
    model, tokenizer = build_model(cfg.model)
    new_ids = fit_tokenizer(model, tokenizer, cfg.template)
    model = apply_lora(model, cfg.lora, new_ids).eval()
    assert decoder_and_head(model) is not None
    _, val = load_splits(cfg.data, cfg.seed)
    features, _ = tokenize_split(val[:6], cfg, tokenizer)
    batch = collate(features, tokenizer.pad_token_id)
    fast, n = loss_sum(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    full = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    assert n == int((labels != IGNORE_INDEX).sum())
    assert torch.allclose(fast, full, rtol=1e-5)


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
