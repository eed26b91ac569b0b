"""The cheap filters every candidate task passes before the similarity check, and the key
that finds exact duplicates (near duplicates: :mod:`instruct.self_instruct.dedup`)."""

from __future__ import annotations

import re
import string
from typing import Any


def _words(text: str) -> list[str]:
    return text.split()


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def cheap_filter(task: dict[str, str], cfg: Any, blacklist: re.Pattern[str]) -> str | None:
    """The reason to reject ``task`` before the similarity check, or None to keep it."""
    instruction, output = task["instruction"], task["output"]
    n = len(_words(instruction))
    if n < cfg.min_instruction_words or n > cfg.max_instruction_words:
        return "instruction_length"
    if blacklist.search(instruction):
        return "blacklist"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_non_ascii"
    n = len(_words(output))
    if n < cfg.min_output_words or n > cfg.max_output_words:
        return "output_length"
    norm_out, norm_inst = _norm(output), _norm(instruction)
    if norm_out == norm_inst or (norm_inst in norm_out and len(norm_out) < 1.2 * len(norm_inst)):
        return "output_repeats_instruction"
    if output.rstrip().endswith(("...", "\u2026", "etc.", "etc")):
        return "output_truncated"
    return None


def blacklist_pattern(words: list[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w.lower()) for w in words) or "(?!)"
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)


def task_key(task: dict[str, str]) -> str:
    return _norm(task["instruction"]) + "\x00" + _norm(task.get("input", ""))
