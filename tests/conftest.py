"""Shared fixtures: the tiny model's real byte-level BPE tokenizer and composed configs."""

from __future__ import annotations

import pytest

from instruct.config import compose
from instruct.model import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny model's tokenizer: byte-level BPE trained in-process, pad == eos."""
    return build_tiny_tokenizer(4096)


@pytest.fixture(scope="session")
def templates():
    """Every shipped template, by name, as composed by Hydra."""
    from instruct.config import option_names

    return {name: compose([f"template={name}"]).template for name in option_names("template")}
