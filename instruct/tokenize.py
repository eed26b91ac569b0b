"""Conversation -> input ids + labels, and batches with dynamic padding.

Labels are ``IGNORE_INDEX`` everywhere but the tokens that start inside a trained character
span (assistant replies and their end-of-turn token). Character spans go through the fast
tokenizer's offset mapping, so no marker is ever searched for among token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from instruct.templates import Rendered, Span

IGNORE_INDEX = -100


@dataclass
class Feature:
    input_ids: list[int]
    labels: list[int]

    @property
    def supervised(self) -> int:
        # Position 0 is never predicted: its label is dropped by the shift in the loss.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class PrepareStats:
    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to train on after truncation
    boundary_merges: int = 0  # a token that straddles the start of a reply
    tokens: int = 0
    supervised_tokens: int = 0


def labels_from_spans(
    input_ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[Span]
) -> tuple[list[int], int]:
    """Labels for one sequence, and how many tokens straddle the start of a span.

    A token is trained when its first character lies in a span. A token that begins before a
    span and ends inside it means BPE merged prompt and reply text across the boundary; it is
    left untrained and counted, since the prompt alone would tokenize differently.
    """
    labels = [IGNORE_INDEX] * len(input_ids)
    straddles = 0
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k == len(spans):
            break
        span_start, span_end = spans[k]
        if span_start <= start < span_end:
            labels[i] = input_ids[i]
        elif start < span_start < end:
            straddles += 1
    return labels, straddles


def encode(rendered: Sequence[Rendered], tokenizer: Any) -> list[tuple[Feature, int]]:
    """Tokenize many rendered conversations in one batched fast-tokenizer call."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("instruct needs a fast (Rust) tokenizer for its offset mapping")
    enc = tokenizer(
        [r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True
    )
    out = []
    for r, ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
        labels, straddles = labels_from_spans(ids, offsets, r.spans)
        out.append((Feature(list(ids), labels), straddles))
    return out


def prepare(
    rendered: Sequence[Rendered], tokenizer: Any, max_length: int
) -> tuple[list[Feature], PrepareStats]:
    """Tokenize, truncate to ``max_length`` and drop examples left with nothing to train on."""
    stats = PrepareStats(examples=len(rendered))
    features: list[Feature] = []
    for feature, straddles in encode(rendered, tokenizer):
        stats.boundary_merges += straddles
        if len(feature.input_ids) > max_length:
            stats.truncated += 1
            feature = Feature(feature.input_ids[:max_length], feature.labels[:max_length])
        if feature.supervised == 0:
            stats.dropped += 1
            continue
        features.append(feature)
        stats.tokens += len(feature.input_ids)
        stats.supervised_tokens += feature.supervised
    stats.kept = len(features)
    return features, stats


def collate(features: Sequence[Feature], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch (never to max_length).

    Padding is marked by position, not by comparing ids, so when pad == eos the trained EOS
    label of a shorter sequence survives.
    """
    width = max(len(f.input_ids) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f.input_ids)
        input_ids[row, :n] = torch.tensor(f.input_ids)
        labels[row, :n] = torch.tensor(f.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
