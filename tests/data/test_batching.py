"""Batches of features: padded to the longest (collate) or laid end to end in one row (pack)."""

from __future__ import annotations

import torch

from instruct.data.batching import collate, pack
from instruct.data.tokenize import IGNORE_INDEX, Feature


def test_collate_pads_to_the_longest_in_the_batch_and_keeps_eos_labels(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the hard case
    eos = tokenizer.eos_token_id
    a = Feature([5, 6, 7, eos], [IGNORE_INDEX, IGNORE_INDEX, 7, eos])
    b = Feature([5, 8, eos], [IGNORE_INDEX, 8, eos])
    batch = collate([a, b], pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 4)  # the longest, never max_length
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 8, eos, IGNORE_INDEX]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, eos]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["input_ids"][1, 3].item() == tokenizer.pad_token_id
    assert batch["input_ids"].dtype == torch.long


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
