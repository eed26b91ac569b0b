"""A Dolly-15k-shaped data file: its record format, category mix and length means, made here.

    python bench/make_public_style.py dolly.jsonl            # 15,011 records, Dolly's size
    python bench/make_public_style.py dolly.parquet -n 500   # any suffix data=file reads

Nothing is downloaded: the words are drawn in-process from a fixed vocabulary with a fixed
seed, so the same command writes the same bytes. What follows the real data set is:

- **the record format** of ``databricks-dolly-15k.jsonl``: ``instruction``, ``context``
  (an empty string when there is none), ``response``, ``category``; ``data=file`` reads it
  as it reads the real file (``context`` -> input, ``response`` -> output);
- **the category mix**, from the data set card (15,011 records): open_qa 3,742, general_qa
  2,191, classification 2,136, closed_qa 1,773, brainstorming 1,766, information_extraction
  1,506, summarization 1,188, creative_writing 709. The three categories whose writers were
  asked for a reference passage (closed_qa, information_extraction, summarization; 4,467
  records, 29.8%) have a context, the others none;
- **the mean lengths**, from Wang et al. 2023, "How Far Can Camels Go?" (arXiv:2306.04751),
  Table 1, Dolly row: prompt 118.1 and completion 91.3 tokens on average (LLaMA's
  tokenizer). SmolLM2's tokenizer makes about 1.08 tokens of a word of this vocabulary, so
  the words drawn have the means 109.1 (prompt) and 84.4 (completion). Measured on the
  default file with SmolLM2's tokenizer: 3,165,061 tokens for 2,929,929 words (1.080), a
  prompt (instruction + context) of 119.2 tokens and a response of 91.6 on average.

The spread is assumed, not published: each length is log-normal (lengths of human-written
text are right-skewed), sigma 0.6 for instructions, 0.8 for contexts and 1.0 for responses,
with the mean fixed as above; instructions have mean 15 words, so contexts have mean
(109.1 - 15) / 0.298 = 316 words. Every length is at least 2 words; nothing is capped, so
long examples are truncated (or dropped) by max_length as real ones are.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# databricks-dolly-15k's data set card: records per category (they add up to 15,011).
CATEGORIES = {
    "open_qa": 3742,
    "general_qa": 2191,
    "classification": 2136,
    "closed_qa": 1773,
    "brainstorming": 1766,
    "information_extraction": 1506,
    "summarization": 1188,
    "creative_writing": 709,
}
WITH_CONTEXT = ("closed_qa", "information_extraction", "summarization")  # a reference passage
DOLLY_RECORDS = sum(CATEGORIES.values())  # 15,011

# Wang et al. 2023 ("How Far Can Camels Go?", arXiv:2306.04751), Table 1, Dolly: mean tokens.
PROMPT_TOKENS, COMPLETION_TOKENS = 118.1, 91.3
WORDS_PER_TOKEN = 1 / 1.082  # SmolLM2's tokens a word of WORDS (measured; see above)
CONTEXT_SHARE = sum(CATEGORIES[c] for c in WITH_CONTEXT) / DOLLY_RECORDS
INSTRUCTION_WORDS = 15.0  # assumed; the context takes the rest of the prompt's mean
MEAN_WORDS = {
    "instruction": INSTRUCTION_WORDS,
    "context": (PROMPT_TOKENS * WORDS_PER_TOKEN - INSTRUCTION_WORDS) / CONTEXT_SHARE,
    "response": COMPLETION_TOKENS * WORDS_PER_TOKEN,
}
SIGMA = {"instruction": 0.6, "context": 0.8, "response": 1.0}  # assumed log-normal spreads

WORDS = """
the a of and to in is that for it as was with on be by at this from are or have an they
which one you were all we her she there would their will when who him been has more if no
out so said what up its about than into them can only other new some could time these two
may then first any my now such like our over man me even most made after also did many
before must through back years where much your way well down should because each just
those people how too little state good very make world still own see men work long get
here between both life being under never day same another know while last might us great
old year off come since against go came right used take three states himself few house use
during without again place around however home small found thought went say part once
general high upon school every does got united left number course war until always away
something fact though water less public put think almost hand enough far took head yet
government system better set told nothing night end why called did eyes find going look
asked later knew point next program city business give group toward young days let room
president side social given present several order national possible rather second face
per among form important often things looked early white case john become large big need
four within felt along children saw best church ever least power development light thing
seemed family interest want members mind country area others done turned although open god
service certain kind problem began different door thus help sense means whole matter
perhaps itself york times law human line above name example action company hands local
show whether five history gave today either act feet across taken past quite anything
river mountain garden market train library festival museum island bridge forest bakery
""".split()
CONNECT = ["and", "but", "so", "because", "while", "although", "when", "since"]
ASK = {
    "open_qa": ["What is", "Why do", "Who was", "How does", "Where is", "When did"],
    "general_qa": ["What do you think about", "How should I", "Is it better to", "Why would"],
    "classification": ["Classify each of the following as", "Which of these are", "Sort"],
    "closed_qa": [
        "Based on the passage, what is",
        "According to the text, who",
        "From the reference, when did",
    ],  # fmt: skip
    "brainstorming": ["Give me ideas for", "List some ways to", "What are good names for"],
    "information_extraction": ["Extract the", "From the passage, list the", "Pull out every"],
    "summarization": [
        "Summarise the passage about",
        "Give a short summary of",
        "In a few sentences, summarise",
    ],  # fmt: skip
    "creative_writing": [
        "Write a short story about",
        "Write a poem about",
        "Write a letter to",
    ],  # fmt: skip
}


def lognormal_words(rng: random.Random, mean: float, sigma: float) -> int:
    """A length in words, log-normal with the given mean (not median), at least 2."""
    mu = math.log(mean) - sigma * sigma / 2
    return max(2, round(rng.lognormvariate(mu, sigma)))


def prose(rng: random.Random, n: int) -> str:
    """``n`` words of sentence-shaped text: capitalised sentences of 6-24 words, joined by
    connectives now and then."""
    words: list[str] = []
    sentences: list[str] = []
    while len(words) < n:
        size = min(rng.randint(6, 24), n - len(words))
        sentence = [rng.choice(WORDS) for _ in range(size)]
        if size > 8 and rng.random() < 0.3:
            sentence[size // 2] = rng.choice(CONNECT)
        words += sentence
        sentences.append(" ".join(sentence).capitalize() + ".")
    return " ".join(sentences)


def record(rng: random.Random, category: str) -> dict[str, str]:
    """One Dolly record of ``category``: an instruction opening as that category's do."""
    opening = rng.choice(ASK[category])
    length = lognormal_words(rng, MEAN_WORDS["instruction"], SIGMA["instruction"])
    rest = max(1, length - len(opening.split()))
    instruction = f"{opening} {prose(rng, rest).rstrip('.').lower()}?"
    context = ""
    if category in WITH_CONTEXT:
        context = prose(rng, lognormal_words(rng, MEAN_WORDS["context"], SIGMA["context"]))
    response = prose(rng, lognormal_words(rng, MEAN_WORDS["response"], SIGMA["response"]))
    return {"instruction": instruction, "context": context, "response": response,
            "category": category}  # fmt: skip


def records(n: int, seed: int = 0) -> Iterator[dict[str, str]]:
    """``n`` records whose categories follow Dolly's mix, in a seeded order."""
    rng = random.Random(seed)
    names = list(CATEGORIES)
    weights = [CATEGORIES[c] for c in names]
    for _ in range(n):
        yield record(rng, rng.choices(names, weights)[0])


def write(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` in the format of ``path``'s suffix: .jsonl (Dolly's own), .json (a list),
    .csv, .tsv or .parquet."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif suffix in (".csv", ".tsv"):
        import csv

        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv"
                               else ",")  # fmt: skip
            w.writeheader()
            w.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise SystemExit(f"{path}: unknown suffix {suffix!r}; use .jsonl, .json, .csv, .tsv "
                         "or .parquet")  # fmt: skip


def describe(rows: list[dict[str, str]]) -> str:
    """Words per field: mean and quartiles, and the share of records with a context."""

    def stats(values: list[int]) -> str:
        q = statistics.quantiles(values, n=20)
        return (f"mean {statistics.fmean(values):.1f}, median {statistics.median(values):.0f}, "
                f"p5 {q[0]:.0f}, p95 {q[-1]:.0f}, max {max(values)}")  # fmt: skip

    def words(r: dict[str, str], key: str) -> int:
        return len(r[key].split())

    lines = [f"{len(rows):,} records; with a context: "
             f"{sum(1 for r in rows if r['context']) / len(rows):.1%}"]  # fmt: skip
    prompt = [words(r, "instruction") + words(r, "context") for r in rows]
    lines.append(f"prompt words (instruction + context): {stats(prompt)}")
    lines.append(f"response words: {stats([words(r, 'response') for r in rows])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help=".jsonl (Dolly's format), .json, .csv, .tsv, .parquet")
    ap.add_argument("-n", "--records", type=int, default=DOLLY_RECORDS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.records < 2:
        sys.exit("--records: at least 2 (statistics need two values)")
    rows = list(records(args.records, args.seed))
    write(args.out, rows)
    print(f"wrote {args.out}\n{describe(rows)}")


if __name__ == "__main__":
    main()
