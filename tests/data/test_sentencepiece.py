"""Tokenizers beyond byte-level BPE: SentencePiece (Llama 2 / Mistral style), Unigram and
WordPiece get the labels the offset rule gives, for every shipped template.

The SentencePiece models are trained in-process (well under a second each) with byte
fallback and ``▁`` for spaces, and wrapped three ways: as transformers converts a
``tokenizer.model`` today (``Metaspace`` with ``prepend_scheme: first``), in the layout of
the Llama 2 and Mistral 7B ``tokenizer.json`` files on the Hub (a ``Prepend("▁")`` normaliser
that puts ``▁`` before every piece between special tokens), and as a Unigram model. None of
them tiles byte for byte, so they take the offset path of :mod:`instruct.data.tokenize`; the
reference here is computed from the tokenizer's own offsets, independently of that code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from instruct.config import option_names
from instruct.data.templates import render_many
from instruct.data.tokenize import IGNORE_INDEX, encode, token_byte_lengths
from instruct.model import TINY_CHAT_TEMPLATE, tokenizer_corpus

spm = pytest.importorskip("sentencepiece")

# Every template's markers, added as special tokens as fit_tokenizer adds them.
MARKERS = ["<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>"]
KINDS = ["sp_bpe", "sp_bpe_legacy", "sp_unigram", "wordpiece"]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour.\n  Thanks"},
        {"role": "assistant", "content": " Blue  "},
        {"role": "user", "content": "Another one: é ñ 😀"},
        {"role": "assistant", "content": "Grün, 緑 😀\nand red."},
    ],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
    [{"role": "user", "content": "Say it twice"}, {"role": "assistant", "content": "it it"}],
]


def train_sentencepiece(folder: Path, kind: str) -> Path:
    """A SentencePiece model of ``kind`` (bpe, unigram), Llama 2 style: byte fallback,
    ``<unk>``/``<s>``/``</s>`` at ids 0/1/2, digits split."""
    prefix = folder / kind
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(tokenizer_corpus())),
        model_prefix=str(prefix),
        model_type=kind,
        vocab_size=800,
        byte_fallback=True,
        character_coverage=0.9995,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def llama_tokenizer(model: Path, folder: Path):
    """The ``.model`` as transformers loads a Llama tokenizer folder (BOS added)."""
    from transformers import LlamaTokenizer

    folder.mkdir()
    shutil.copy(model, folder / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(folder, add_bos_token=True)


def hub_layout(tok):
    """``tok`` with the normaliser of the Llama 2 / Mistral 7B tokenizer.json files."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    spec["pre_tokenizer"] = None
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def unigram_tokenizer(model: Path):
    """A Unigram tokenizer with byte fallback from a SentencePiece unigram model's pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(model))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    t = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    t.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def wordpiece_tokenizer():
    """BERT's pipeline (lower-casing normaliser, splitting on spaces and punctuation)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=800, special_tokens=["[UNK]", "[PAD]", "[SEP]"], show_progress=False
    )
    t.train_from_iterator(list(tokenizer_corpus()), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="[SEP]", unk_token="[UNK]", pad_token="[PAD]"
    )


def with_markers(tok):
    tok.add_tokens([m for m in MARKERS if m not in tok.get_vocab()], special_tokens=True)
    tok.chat_template = TINY_CHAT_TEMPLATE  # what template=native renders with
    return tok


def build_other_tokenizers(folder: Path) -> dict:
    """Every kind of :data:`KINDS`, with the templates' markers added."""
    bpe = llama_tokenizer(train_sentencepiece(folder, "bpe"), folder / "llama")
    return {
        "sp_bpe": with_markers(bpe),
        "sp_bpe_legacy": with_markers(hub_layout(bpe)),
        "sp_unigram": with_markers(unigram_tokenizer(train_sentencepiece(folder, "unigram"))),
        "wordpiece": with_markers(wordpiece_tokenizer()),
    }


@pytest.fixture(scope="session")
def other_tokenizers(tmp_path_factory) -> dict:
    return build_other_tokenizers(tmp_path_factory.mktemp("sentencepiece"))


def reference_labels(tok, text: str, spans) -> tuple[list[int], list[int]]:
    """Ids and labels from the tokenizer's own offsets: a token is trained when it lies
    wholly inside a span."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        i if any(a <= start < b and end <= b for a, b in spans) else IGNORE_INDEX
        for i, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return enc["input_ids"], labels


def test_the_tokenizers_are_what_they_claim(other_tokenizers):
    bpe, legacy = other_tokenizers["sp_bpe"], other_tokenizers["sp_bpe_legacy"]
    assert type(bpe.backend_tokenizer.model).__name__ == "BPE"
    assert bpe.backend_tokenizer.model.byte_fallback
    assert type(other_tokenizers["sp_unigram"].backend_tokenizer.model).__name__ == "Unigram"
    assert type(other_tokenizers["wordpiece"].backend_tokenizer.model).__name__ == "WordPiece"
    assert bpe("a b").input_ids[0] == bpe.bos_token_id  # Llama style: BOS prepended
    assert "▁" in "".join(bpe.convert_ids_to_tokens(bpe("a b").input_ids))
    assert "<0xF0>" in bpe.convert_ids_to_tokens(bpe("😀").input_ids)  # byte fallback
    # The two layouts differ after a special token: only the Hub's puts ▁ there.
    after = "<|im_start|>user"
    assert bpe.convert_ids_to_tokens(bpe(after, add_special_tokens=False).input_ids)[1] != "▁"
    assert (
        legacy.convert_ids_to_tokens(legacy(after, add_special_tokens=False).input_ids)[1][0] == "▁"
    )
    for tok in other_tokenizers.values():
        assert token_byte_lengths(tok.backend_tokenizer) is None  # the offset path


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", option_names("template"))
def test_labels_equal_the_offset_reference(other_tokenizers, templates, kind, name):
    tok = other_tokenizers[kind]
    template = templates[name]
    rendered = render_many(CONVERSATIONS, template, tok)
    for r, (feature, _) in zip(rendered, encode(rendered, tok), strict=True):
        ids, labels = reference_labels(tok, r.text, r.spans)
        assert feature.input_ids.tolist() == ids, r.text
        assert feature.labels.tolist() == labels, r.text
        assert feature.supervised > 0


@pytest.mark.parametrize("kind", ["sp_bpe", "sp_bpe_legacy", "sp_unigram"])
@pytest.mark.parametrize("name", option_names("template"))
def test_trained_tokens_are_the_replies_and_their_end_of_turn(
    other_tokenizers, templates, kind, name
):
    """What the labels decode to, from the tokens alone (SentencePiece decodes losslessly up
    to spaces)."""
    tok = other_tokenizers[kind]
    template = templates[name]
    rendered = render_many(CONVERSATIONS, template, tok)
    for conversation, r, (feature, _) in zip(
        CONVERSATIONS, rendered, encode(rendered, tok), strict=True
    ):
        trained = [i for i in feature.labels.tolist() if i != IGNORE_INDEX]
        text = tok.decode(trained, skip_special_tokens=False)
        assert text.replace(" ", "") == r.trained_text().replace(" ", "")
        for m in conversation:
            if m["role"] == "assistant":
                assert m["content"].strip() in text
