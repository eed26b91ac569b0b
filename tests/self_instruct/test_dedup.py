"""ROUGE-L filtering: tokenizer, scores and decisions equal rouge-score's, pair by pair."""

from __future__ import annotations

import random

import numpy as np
import pytest
from rouge_score import rouge_scorer
from rouge_score.tokenize import tokenize as rs_tokenize

from instruct.self_instruct.dedup import (
    RougeIndex,
    dedup,
    fmeasure,
    min_lcs_table,
    naive_dedup,
    rouge_l,
    tokenize,
)

VERBS = ["write", "explain", "describe", "list", "summarize", "give", "create", "translate"]
WORDS = [
    "a", "the", "of", "to", "and", "in", "short", "poem", "story", "about", "how", "why",
    "python", "function", "that", "sorts", "list", "numbers", "three", "reasons", "for",
    "email", "your", "manager", "asking", "day", "off", "recipe", "cake", "sentence",
]  # fmt: skip
TRICKY = [
    "",
    "   ",
    "Hello, World!",
    "don't stop-believing... ok?",
    "GPT-4o vs. 3.5: 12% better (maybe)",
    "café naïve résumé",  # accented letters split words, as in rouge-score
    "日本語のテキスト and English",
    "tab\tnew\nline\r\nend",
    "UPPER lower MiXeD 123abc ABC123",
    "\u212a elvin sign and \u0130stanbul",  # lowercase to ASCII k / i + combining dot
    "under_score and-hyphen/slash\\back",
    "ﬁ ligature ß straße",
    "emoji 🙂 between🙂words",
]


def sentence(rng: random.Random, length: int | None = None) -> str:
    """An instruction-like sentence from a small vocabulary, so overlaps are common."""
    length = length or rng.randint(6, 15)
    words = [rng.choice(VERBS)] + [rng.choice(WORDS) for _ in range(length - 1)]
    text = " ".join(words)
    return text.capitalize() + rng.choice([".", "?", "", "!"])


def near_duplicate(rng: random.Random, text: str) -> str:
    """``text`` after 1-4 word substitutions, insertions or deletions.

    On 10 words, 3 substitutions give F = 7/10 exactly, so many land on the 0.7 boundary.
    """
    words = text.split()
    for _ in range(rng.randint(1, 4)):
        op, i = rng.random(), rng.randrange(len(words))
        if op < 0.5:
            words[i] = rng.choice(WORDS + ["zebra", "quantum"])
        elif op < 0.75 or len(words) < 3:
            words.insert(i, rng.choice(WORDS))
        else:
            del words[i]
    return " ".join(words)


def at_boundary(rng: random.Random, text: str, replace: int, insert: int) -> str:
    """``text`` with ``replace`` words swapped for, and ``insert`` words added as, unseen ones.

    Unseen words match nothing, so the LCS is the words kept: 10 words with 3 replaced give
    F = 2 * 7 / 20 = 0.7; 9 words with 2 replaced and 2 inserted give 2 * 7 / 20 as well.
    """
    words = text.split()
    for k, i in enumerate(rng.sample(range(len(words)), replace)):
        words[i] = f"unseen{k}"
    for k in range(insert):
        words.insert(rng.randrange(len(words) + 1), f"new{k}")
    return " ".join(words)


def rs_fmeasure(a: str, b: str) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return scorer.score(a, b)["rougeL"].fmeasure


@pytest.mark.parametrize("text", TRICKY)
def test_tokenize_matches_rouge_score(text):
    assert tokenize(text) == rs_tokenize(text, None)


def test_rouge_l_matches_rouge_score_exactly():
    rng = random.Random(0)
    pairs = []
    for _ in range(150):
        a = sentence(rng)
        pairs += [(a, sentence(rng)), (a, near_duplicate(rng, a))]
    pairs += [(a, a) for a, _ in pairs[:20]] + [("", "x y"), ("x y", ""), ("", ""), ("!!", "a")]
    pairs += [(a, b) for a in TRICKY for b in TRICKY[:4]]
    for a, b in pairs:
        ours = rouge_l(tokenize(a), tokenize(b))
        assert ours == rs_fmeasure(a, b), (a, b)
        assert ours == rouge_l(tokenize(b), tokenize(a))


def test_rouge_l_on_long_texts_past_one_machine_word():
    rng = random.Random(3)
    for _ in range(10):  # 100-200 tokens: LCS bit masks of several 64-bit words
        a = " ".join(sentence(rng) for _ in range(rng.randint(8, 14)))
        b = near_duplicate(rng, a) if rng.random() < 0.5 else sentence(rng) * 12
        assert rouge_l(tokenize(a), tokenize(b)) == rs_fmeasure(a, b)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.7, 0.9, 1.0, 1.1])
def test_min_lcs_table_is_the_first_lcs_reaching_the_threshold(threshold):
    for n in range(0, 30):
        table = min_lcs_table(n, 40, threshold)
        for m in range(41):
            reaching = [k for k in range(min(m, n) + 1) if fmeasure(k, m, n) >= threshold]
            assert table[m] == (reaching[0] if reaching else np.iinfo(np.int32).max)


@pytest.mark.slow
def test_dedup_makes_the_naive_decisions():
    rng = random.Random(1)
    pool = [sentence(rng) for _ in range(200)]
    candidates: list[str] = []
    for _ in range(250):
        if rng.random() < 0.6:  # a near-duplicate of a seed or of an earlier candidate
            candidates.append(near_duplicate(rng, rng.choice(pool + candidates)))
        else:
            candidates.append(sentence(rng))
    # Exactly at 0.7 (rejected), and 14 / 21 just below it (accepted unless another is closer).
    for length, replace, insert in [(10, 3, 0), (9, 2, 2), (10, 3, 1)] * 10:
        pool.append(sentence(rng, length))
        candidates.append(at_boundary(rng, pool[-1], replace, insert))
    candidates += ["", "?!", pool[3], "zzz unknown words only"]

    ours = dedup(candidates, pool, threshold=0.7)
    naive = naive_dedup(candidates, pool, threshold=0.7)

    items = list(pool)
    for text, (accepted, score, item), (ref_accepted, ref_score, ref_item) in zip(
        candidates, ours, naive, strict=True
    ):
        assert accepted == ref_accepted, text
        if accepted:
            assert score <= ref_score < 0.7
            items.append(text)
        else:
            assert (score, item) == (ref_score, ref_item)  # the first item with the maximum
            assert rs_fmeasure(text, items[item]) == score
    # The data exercise both outcomes and the boundary itself.
    assert 0 < sum(d[0] for d in naive) < len(candidates)
    assert any(d[1] == 0.7 for d in naive)  # rejected at exactly the threshold
    assert any(0.65 < d[1] < 0.7 for d in naive)  # accepted just below it


def test_most_similar_returns_exact_maximum_and_first_index():
    index = RougeIndex(["write a poem about cats", "x", "write a poem about cats", "a poem"])
    assert len(index) == 4
    assert index.most_similar("Write a poem about cats!", 0.7) == (1.0, 0)
    # LCS 4 of 6 and 5 tokens: rouge-score's float formula gives 0.7272727272727272, not 8 / 11
    expected = rs_fmeasure("write a short poem about dogs", "write a poem about cats")
    assert index.most_similar("write a short poem about dogs", 0.5) == (expected, 0)
    score, _ = index.most_similar("an unrelated instruction", 0.7)
    assert score < 0.7
    # Both score 0.75, but item 1 has the higher unigram bound (4 common words, LCS 3), so it
    # is scored first; the tie still goes to item 0, as an argmax over all items gives.
    assert RougeIndex(["a b c x", "d a b c"]).most_similar("a b c d", 0.7) == (0.75, 0)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 1.0, 1.5])
def test_dedup_matches_naive_at_any_threshold(threshold):
    rng = random.Random(2)
    pool = [sentence(rng) for _ in range(30)] + [""]
    candidates = [near_duplicate(rng, rng.choice(pool[:30])) for _ in range(30)] + ["", "a"]
    ours = dedup(candidates, pool, threshold)
    naive = naive_dedup(candidates, pool, threshold)
    assert [d[0] for d in ours] == [d[0] for d in naive]
    assert [d[1] for d in ours if not d[0]] == [d[1] for d in naive if not d[0]]


def test_empty_pool_accepts_first_candidate():
    assert dedup(["write a poem"], []) == [(True, 0.0, None)]
    assert naive_dedup(["write a poem"], []) == [(True, 0.0, None)]
