"""IFEval: the 25 checkers, record loading and its errors, the suite, and parity with
lm-evaluation-harness's implementation (the reference) on a corpus of responses."""

from __future__ import annotations

import importlib
import json
import random
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

import nltk
import pytest

from instruct.config import EvalConfig, IFEvalSuiteConfig
from instruct.eval import ifeval
from instruct.eval.ifeval import (
    CHECKERS,
    FIGURES,
    IFEvalSuite,
    TextTools,
    load_records,
    parse_instruction,
    parse_record,
    score_reply,
    select_subset,
    sentence_splitter,
)
from instruct.eval.suite import SUITES, EvalContext

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "ifeval"
LM_EVAL_INSTALL = "pip install lm-eval==0.4.13 langdetect immutabledict nltk"

# The 24 kwarg names google/IFEval's records carry, each null where the instruction does
# not use it.
KWARG_NAMES = (
    "capital_frequency", "capital_relation", "end_phrase", "first_word", "forbidden_words",
    "frequency", "keyword", "keywords", "language", "let_frequency", "let_relation", "letter",
    "nth_paragraph", "num_bullets", "num_highlights", "num_paragraphs", "num_placeholders",
    "num_sections", "num_sentences", "num_words", "postscript_marker", "prompt_to_repeat",
    "relation", "section_spliter",
)  # fmt: skip

OFFICIAL_IDS = {
    "keywords:existence", "keywords:frequency", "keywords:forbidden_words",
    "keywords:letter_frequency", "language:response_language",
    "length_constraints:number_sentences", "length_constraints:number_paragraphs",
    "length_constraints:number_words", "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders", "detectable_content:postscript",
    "detectable_format:number_bullet_lists", "detectable_format:constrained_response",
    "detectable_format:number_highlighted_sections", "detectable_format:multiple_sections",
    "detectable_format:json_format", "detectable_format:title", "combination:two_responses",
    "combination:repeat_prompt", "startend:end_checker", "change_case:capital_word_frequency",
    "change_case:english_capital", "change_case:english_lowercase", "punctuation:no_comma",
    "startend:quotation",
}  # fmt: skip

FRENCH = (
    "Le petit village se trouve au bord de la rivière. Les habitants travaillent dans les "
    "champs et vendent leurs légumes au marché chaque samedi matin."
)
ENGLISH = (
    "The small village lies beside the river. The people work in the fields and sell their "
    "vegetables at the market every Saturday morning."
)


@pytest.fixture(scope="module")
def tools() -> TextTools:
    return TextTools.load()


def record(instruction_id: str, prompt: str = "Say hi.", **kwargs: Any) -> ifeval.IFEvalRecord:
    return parse_record(
        {"key": 1, "prompt": prompt, "instruction_id_list": [instruction_id], "kwargs": [kwargs]}
    )


# ---------------------------------------------------------------------------------------------
# Checkers: per id, a reply that passes and one that fails, strictly and loosely

P, F, L = (True, True), (False, False), (False, True)  # (strict, loose); L: only loose passes

CASES: list[tuple[str, dict[str, Any], str, tuple[bool, bool]]] = [
    ("keywords:existence", {"keywords": ["apple", "pie"]}, "I like Apple pie.", P),
    ("keywords:existence", {"keywords": ["apple", "pie"]}, "I like apple tart.", F),
    ("keywords:existence", {"keywords": ["apple"]}, "I like app*le*s.", L),
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 2, "relation": "at least"},
        "A cat met a CAT.",
        P,
    ),
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 2, "relation": "at least"},
        "A cat met a dog.",
        F,
    ),
    (
        "keywords:frequency",
        {"keyword": "dog", "frequency": 2, "relation": "less than"},
        "Dogs, dogs.",
        F,
    ),
    (
        "keywords:frequency",
        {"keyword": "dog", "frequency": 2, "relation": "less than"},
        "A dog.",
        P,
    ),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "evil"]}, "A badge is good.", P),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "evil"]}, "Evil is near.", F),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "Bad start:\nAll good.", L),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
        "Zig zag zoo.",
        P,
    ),
    (
        "keywords:letter_frequency",
        {"letter": "Z", "let_frequency": 3, "let_relation": "at least"},
        "A zoo.",
        F,
    ),
    (
        "keywords:letter_frequency",
        {"letter": "a", "let_frequency": 2, "let_relation": "less than"},
        "Banana",
        F,
    ),
    ("language:response_language", {"language": "fr"}, FRENCH, P),
    ("language:response_language", {"language": "fr"}, ENGLISH, F),
    ("language:response_language", {"language": "en"}, ENGLISH, P),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "less than"},
        "One here. Two here.",
        P,
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "less than"},
        "One here. Two here. Three here. Four here.",
        F,
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "less than"},
        "Sure thing.\nOne sentence only",
        L,
    ),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", P),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "First.\n***\n\n***\nSecond.",
        F,
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "First.\n***\nSecond.\n***\nSign-off",
        L,
    ),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "at least"},
        "one two three four five",
        P,
    ),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two", F),
    (
        "length_constraints:number_words",
        {"num_words": 4, "relation": "less than"},
        "Here is my short answer:\nYes indeed",
        L,
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "However"},
        'Intro here.\n\n"However, then.',
        P,
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        "Intro here.\n\nBut then.",
        F,
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        "Intro here.\n\n**However** then.",
        L,
    ),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        "Dear [name], at [address].",
        P,
    ),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name].", F),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\nP.S. Bye.", P),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\np. p. s. Bye.", P),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi. PS bye.", F),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n**P**.S. Bye.", L),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two", P),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n**two**", F),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n- signed", L),
    ("detectable_format:constrained_response", {}, "Well. My answer is maybe.", P),
    ("detectable_format:constrained_response", {}, "My answer is: yes.", F),
    ("detectable_format:constrained_response", {}, "My answer is **yes**.", L),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", P),
    # **bold** counts once: the single-star pattern only finds its empty "**" ends
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**bold** *it*", P),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**bold**", F),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and * *", F),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nalpha\nSection 2\nbeta",
        P,
    ),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "SECTION", "num_sections": 2},
        "SECTION 1\nalpha\nSection 2\nbeta",
        F,
    ),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "**Section** 1\nalpha\n**Section** 2\nbeta",
        L,
    ),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', P),
    ("detectable_format:json_format", {}, "{a: 1}", F),
    ("detectable_format:json_format", {}, 'Sure, here it is:\n{"a": 1}', L),
    ("detectable_format:title", {}, "<<Poem of Joy>>\nLa la.", P),
    ("detectable_format:title", {}, "<< >> no title here", F),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", P),
    ("combination:two_responses", {}, "Same.\n******\nSame.", F),
    ("combination:two_responses", {}, "One.\n******\nTwo.\n******", P),
    ("combination:two_responses", {}, "One.\n******\n\n******\nTwo.", F),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say HI. Hi!", P),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Hi! Say hi.", F),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "**Say hi.** Hi!", L),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        'Done. Any other questions?"',
        P,
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "Any other questions? Done.",
        F,
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "Done. **Any other questions?**",
        L,
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "THE END is near.",
        P,
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "The END is near.",
        F,
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "less than"},
        "THE END IS NEAR.",
        F,
    ),
    ("change_case:english_capital", {}, ENGLISH.upper(), P),
    ("change_case:english_capital", {}, ENGLISH, F),
    ("change_case:english_capital", {}, "Sure, in capitals:\n" + ENGLISH.upper(), L),
    ("change_case:english_lowercase", {}, ENGLISH.lower(), P),
    ("change_case:english_lowercase", {}, ENGLISH, F),
    ("change_case:english_lowercase", {}, ENGLISH.lower() + "\nHope This Helps!", L),
    ("punctuation:no_comma", {}, "No commas here.", P),
    ("punctuation:no_comma", {}, "Yes, one.", F),
    ("punctuation:no_comma", {}, "Sure, here it is:\nNo commas here.", L),
    ("startend:quotation", {}, '  "Quoted reply."\n', P),
    ("startend:quotation", {}, '"', F),
    ("startend:quotation", {}, '""', P),
    ("startend:quotation", {}, 'Here you go:\n"Quoted reply."', L),
    # An empty or all-whitespace reply follows nothing, even "no commas"
    ("punctuation:no_comma", {}, " \n ", F),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "", F),
]


@pytest.mark.parametrize(("instruction_id", "kwargs", "reply", "expected"), CASES)
def test_checker(instruction_id, kwargs, reply, expected, tools):
    followed = score_reply(record(instruction_id, **kwargs), reply, tools)
    assert (followed.strict[0], followed.loose[0]) == expected


def test_every_official_id_has_a_checker_and_cases():
    assert set(CHECKERS) == OFFICIAL_IDS
    outcomes: dict[str, set[tuple[bool, bool]]] = defaultdict(set)
    for instruction_id, _, _, expected in CASES:
        outcomes[instruction_id].add(expected)
    for instruction_id in OFFICIAL_IDS:
        assert {P, F} <= outcomes[instruction_id], instruction_id
    assert sum(L in o for o in outcomes.values()) >= 15  # loose readings exercised widely


def test_sentence_splitter_is_named_and_never_downloads(monkeypatch):
    # nltk's process state, not ours: any download attempt fails the test.
    monkeypatch.setattr(nltk, "download", pytest.fail)
    assert sentence_splitter() in {"punkt_tab/english", "punkt (untrained)"}
    assert TextTools.load().splitter == sentence_splitter()


# ---------------------------------------------------------------------------------------------
# Records and their errors


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def line(key: Any, ids: list[str], kwargs: list[dict[str, Any]], prompt: str = "Hi.") -> str:
    return json.dumps({"key": key, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs})


def test_google_shaped_records_load_and_score(tools):
    records = load_records(DATA / "google_shaped.jsonl")
    assert [r.key for r in records] == [1001, 1002, 1003]
    assert records[0].instruction_id_list == [
        "punctuation:no_comma",
        "detectable_content:postscript",
    ]
    # null-valued entries are dropped, as the reference drops every falsy kwarg
    assert dict(records[0].instructions[1].kwargs) == {"postscript_marker": "P.S."}
    assert dict(records[1].instructions[0].kwargs) == {"num_sentences": 3, "relation": "at least"}
    note = "Dear neighbour\n\nOur cat Miso is lost. Please call us.\n\nP.S. She likes tuna."
    assert score_reply(records[0], note, tools).strict == [True, True]
    assert score_reply(records[0], "Hello, neighbour.", tools).strict == [False, False]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"key": 7, "prompt": "x", "instruction_id_list": [',
            r"bad\.jsonl:2 \(key 7\): not valid JSON",
        ),
        ("[1, 2]", r"bad\.jsonl:2 .*must be a JSON object"),
        (
            json.dumps({"key": 7, "prompt": "x", "kwargs": []}),
            r":2 \(key 7\): missing \['instruction_id_list'\]",
        ),
        (
            line(7, ["keywords:frequncy"], [{}]),
            r":2 \(key 7\): unknown instruction id 'keywords:frequncy'; "
            r"nearest valid ids: keywords:frequency",
        ),
        (
            line("k7", ["punctuation:no_comma"], [{"num_word": None}]),
            r":2 \(key 'k7'\): punctuation:no_comma: unknown kwargs \['num_word'\]",
        ),
        (line(7, ["punctuation:no_comma"], [{"num_words": 3}]), r"takes \[\], not \['num_words'\]"),
        (
            line(
                7,
                ["length_constraints:number_words"],
                [{"num_words": "100", "relation": "at least"}],
            ),
            r"key 7\): length_constraints:number_words: kwarg num_words must be an integer",
        ),
        (
            line(
                7,
                ["length_constraints:number_words"],
                [{"num_words": True, "relation": "at least"}],
            ),
            r"num_words must be an integer",
        ),
        (
            line(7, ["length_constraints:number_words"], [{"num_words": 5, "relation": "at most"}]),
            r"kwarg relation must be one of \['at least', 'less than'\], got 'at most'",
        ),
        (
            line(
                7, ["length_constraints:number_words"], [{"num_words": 0, "relation": "at least"}]
            ),
            r"missing kwargs \['num_words'\] \(null, 0 and empty values count as missing",
        ),
        (
            line(7, ["language:response_language"], [{"language": "xx"}]),
            r"kwarg language must be one of",
        ),
        (
            line(
                7,
                ["keywords:letter_frequency"],
                [{"letter": "ab", "let_frequency": 2, "let_relation": "at least"}],
            ),
            r"kwarg letter must be one letter a-z",
        ),
        (line(7, ["keywords:existence"], [{"keywords": ["f(x"]}]), r"regular expression"),
        (
            line(
                7,
                ["length_constraints:nth_paragraph_first_word"],
                [{"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "a"}],
            ),
            r"nth_paragraph 3 is past num_paragraphs 2",
        ),
        (
            line(7, ["punctuation:no_comma", "startend:quotation"], [{}]),
            r"key 7\): instruction_id_list has 2 entries but kwargs has 1",
        ),
        (line(1, ["punctuation:no_comma"], [{}]), r":2 \(key 1\): key repeats line 1"),
    ],
)
def test_malformed_files_name_file_line_and_key(tmp_path, text, expected):
    path = write_lines(tmp_path / "bad.jsonl", [line(1, ["punctuation:no_comma"], [{}]), text])
    with pytest.raises(ValueError, match=expected):
        load_records(path)


def test_empty_and_blank_files_load_empty(tmp_path):
    assert load_records(write_lines(tmp_path / "empty.jsonl", [])) == []
    assert load_records(write_lines(tmp_path / "blank.jsonl", ["", "  "])) == []


def test_parse_instruction_keeps_only_given_kwargs():
    kwargs = {name: None for name in KWARG_NAMES} | {"keyword": "x", "frequency": 2}
    kwargs["relation"] = "less than"
    got = parse_instruction("keywords:frequency", kwargs)
    assert dict(got.kwargs) == {"keyword": "x", "frequency": 2, "relation": "less than"}


# ---------------------------------------------------------------------------------------------
# The suite


def numbered_file(path: Path, n: int) -> Path:
    lines = [line(k, ["punctuation:no_comma"], [{}], prompt=f"Prompt {k}") for k in range(n)]
    return write_lines(path, lines)


def test_seeded_subset_is_stable_and_in_file_order(tmp_path):
    records = load_records(numbered_file(tmp_path / "n.jsonl", 40))
    keys = [r.key for r in select_subset(records, 6, seed=3)]
    # fixed by SHA-256 of "<seed>:<key>": the same on every machine and Python version
    assert keys == [4, 5, 13, 15, 22, 32]
    assert keys == sorted(keys)
    assert set(keys) <= {r.key for r in select_subset(records, 12, seed=3)}
    assert keys != [r.key for r in select_subset(records, 6, seed=4)]
    assert select_subset(records, None, 3) == records == select_subset(records, 99, 3)
    with pytest.raises(ValueError, match="at least 1"):
        select_subset(records, 0, 3)


def fake_context(replies: dict[str, str], seen: list) -> EvalContext:
    def generate(conversations):
        seen.append(conversations)
        return [replies[c[-1]["content"]] for c in conversations]

    return EvalContext("tuned", None, None, None, generate, Path("."))


def suite_for(path: Path | None, subset: int | None = None, seed: int = 0) -> IFEvalSuite:
    return SUITES["ifeval"](
        EvalConfig(ifeval=IFEvalSuiteConfig(str(path) if path else None, subset, seed))
    )


def test_suite_scores_canned_replies(tmp_path):
    path = write_lines(
        tmp_path / "set.jsonl",
        [
            line(10, ["punctuation:no_comma", "startend:quotation"], [{}, {}], prompt="A"),
            line(11, ["detectable_format:json_format"], [{}], prompt="B"),
            line(
                12,
                ["punctuation:no_comma", "detectable_format:title", "startend:quotation"],
                [{}, {}, {}],
                prompt="C",
            ),
        ],
    )
    replies = {
        "A": '"No commas at all"',  # both followed
        "B": 'Here it is:\n{"ok": true}',  # only loosely: the first line is not JSON
        "C": "Sure, a title:\n<<Hi>>",  # comma fails strictly; quotation fails both ways
    }
    seen: list = []
    result = suite_for(path).run(fake_context(replies, seen))
    assert seen == [[[{"role": "user", "content": p}] for p in "ABC"]]  # one call, one turn each
    assert result.suite == "ifeval" and result.headline == "prompt_strict"
    assert result.ids == ["10", "11", "12"]
    assert list(result.scores) == list(FIGURES)
    s = result.scores
    assert (s["prompt_strict"].num, s["prompt_strict"].den) == ([1, 0, 0], [1, 1, 1])
    assert (s["inst_strict"].num, s["inst_strict"].den) == ([2, 0, 1], [2, 1, 3])
    assert (s["prompt_loose"].num, s["inst_loose"].num) == ([1, 1, 0], [2, 1, 2])
    assert s["inst_loose"].value == pytest.approx(5 / 6)
    assert result.rows[2] == {
        "key": 12,
        "prompt": "C",
        "reply": replies["C"],
        "instruction_id_list": [
            "punctuation:no_comma",
            "detectable_format:title",
            "startend:quotation",
        ],
        "followed_strict": [False, True, False],
        "followed_loose": [True, True, False],
    }
    info = result.info
    assert info["path"] == str(path) and info["prompts"] == 3 and info["subset"] is None
    assert info["sha256"] == ifeval.file_sha256(path) and len(info["sha256"]) == 64
    assert info["sentence_splitter"] == sentence_splitter()


def test_suite_subset_and_fingerprint(tmp_path):
    path = numbered_file(tmp_path / "n.jsonl", 40)
    replies = {f"Prompt {k}": "fine" for k in range(40)}
    result = suite_for(path, subset=6, seed=3).run(fake_context(replies, []))
    assert result.ids == ["4", "5", "13", "15", "22", "32"]
    assert result.scores["prompt_strict"].value == 1.0
    fp = suite_for(path, subset=6, seed=3).fingerprint()
    assert fp["sha256"] == ifeval.file_sha256(path) and (fp["subset"], fp["subset_seed"]) == (6, 3)
    assert suite_for(path, subset=6, seed=4).fingerprint() != fp
    assert suite_for(path).fingerprint()["subset_seed"] is None  # the seed picks nothing


def test_suite_on_empty_file_skips(tmp_path):
    seen: list = []
    result = suite_for(write_lines(tmp_path / "e.jsonl", [])).run(fake_context({}, seen))
    assert seen == [] and result.ids == [] and "no IFEval records" in result.info["skipped"]
    assert result.info["prompts"] == 0 and set(result.scores) == set(FIGURES)


def test_suite_without_shipped_set_says_how_to_get_one(tmp_path):
    suite = IFEvalSuite(EvalConfig(), shipped_set=tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="scripts/make_ifeval_set.py"):
        suite.run(fake_context({}, []))


# ---------------------------------------------------------------------------------------------
# Parity with lm-evaluation-harness


@pytest.fixture(scope="module")
def reference(tools):
    """lm-eval's ``lm_eval.tasks.ifeval.utils``, made deterministic and kept off the network."""
    # Everything set here is process state of third-party libraries (nltk, langdetect,
    # lm-eval), never of instruct: the reference is their code, called as it is.
    mp = pytest.MonkeyPatch()
    # Importing it calls nltk.download("punkt_tab") when the data is missing: never let that
    # reach the network (or hang) in a test.
    mp.setattr(nltk, "download", lambda *args, **kwargs: False)
    try:
        utils = importlib.import_module("lm_eval.tasks.ifeval.utils")
        util = importlib.import_module("lm_eval.tasks.ifeval.instructions_util")
        from langdetect import DetectorFactory
    except ImportError:
        mp.undo()
        pytest.skip(f"lm-eval's IFEval is not installed: {LM_EVAL_INSTALL}")
    # langdetect's global factory, which the reference calls, seeded as ours is
    mp.setattr(DetectorFactory, "seed", 0)
    if tools.splitter != "punkt_tab/english":
        # Without punkt_tab the reference cannot count sentences (nor run nltk.word_tokenize):
        # give it the splitter ours uses, so parity of everything else is then exact.
        mp.setattr(util, "_get_sentence_tokenizer", lambda: tools.sentences)
        mp.setattr(
            nltk.tokenize,
            "sent_tokenize",
            lambda text, language="english": tools.sentences.tokenize(text),
        )
    yield utils
    mp.undo()


TEXTS = {
    "en": ENGLISH,
    "en2": (
        "However, the answer is simple. We should plant more trees in the city, because they "
        "cool the streets. Dr. Smith agrees! Does the mayor? The plan costs 3.5 million dollars "
        "and takes two years."
    ),
    "en3": "it was a quiet day. the fox slept near the river and nobody came to the park.",
    "fr": FRENCH,
    "es": "El pequeño pueblo está junto al río. La gente trabaja en los campos y vende verduras.",
    "de": "Das kleine Dorf liegt am Fluss. Die Leute arbeiten auf den Feldern und pflanzen Gemüse.",
    "ru": "Маленькая деревня стоит у реки. Люди работают в полях и продают овощи на рынке.",
    "ja": "小さな村は川のそばにあります。人々は畑で働き、毎週土曜日に市場で野菜を売ります。",
    "hi": "छोटा गाँव नदी के किनारे है। लोग खेतों में काम करते हैं और बाज़ार में सब्ज़ियाँ बेचते हैं।",
    "it": "Il piccolo villaggio si trova accanto al fiume. La gente lavora nei campi.",
    "pt": "A pequena aldeia fica ao lado do rio. As pessoas trabalham nos campos e vendem legumes.",
    "ko": "작은 마을은 강 옆에 있습니다. 사람들은 들판에서 일하고 시장에서 채소를 팝니다.",
    "digits": "12345 678",
    "short": "ok",
}
SPLITTERS = ["Section", "SECTION"]
WORDS = ["the", "river", "fox", "park", "village", "answer", "item", "section", "tree", "Day"]


def _decorations(rng: random.Random, prompt: str) -> dict[str, Any]:
    other = rng.choice(list(TEXTS.values()))
    endings = [
        " Any other questions?",
        " Is there anything else I can help with?",
        ' Any other questions?"',
        " **Any other questions?**",
    ]
    answers = [" My answer is yes.", " My answer is: no", " My answer is *maybe*."]
    return {
        "intro": lambda t: "Sure, here it is:\n" + t,
        "outro": lambda t: t + "\nHope this helps!",
        "quote": lambda t: f'"{t}"',
        "fence": lambda t: "```json\n" + json.dumps({"answer": t[:40]}) + "\n```",
        "json": lambda t: json.dumps({"text": t, "n": [1, 2]}),
        "bad_json": lambda t: "{'bad': json}" + t,
        "bullets": lambda t: (
            t + "\n" + "\n".join(f"{rng.choice('*-')} item {i}" for i in range(rng.randint(1, 5)))
        ),
        "italic": lambda t: t.replace(" the ", " *the* ", rng.randint(1, 3)),
        "highlights": lambda t: t + "".join(f" *point {i}*" for i in range(rng.randint(0, 4))),
        "bold": lambda t: t.replace(" the ", " **the** ", rng.randint(1, 2)),
        "dividers": lambda t: t.replace(". ", ".\n***\n", rng.randint(1, 3)),
        "outer_dividers": lambda t: "***\n" + t + "\n***",
        "empty_divider": lambda t: t.replace(". ", ".\n***\n***\n", 1),
        "two": lambda t: t + "\n******\n" + rng.choice([other, other, t, ""]),
        "sections": lambda t: f"{rng.choice(SPLITTERS)} 1\n{t}\n{rng.choice(SPLITTERS)} 2\n{other}",
        "placeholders": lambda t: t + " Dear [name], see [address] and [date].",
        "ps": lambda t: t + rng.choice(["\n\nP.S. Bye.", "\nP. P. S. More.", "\np.s. x", " PS no"]),
        "title": lambda t: rng.choice(["<<A Title>>\n", "<< >>\n", "<<Title\n>>"]) + t,
        "end": lambda t: t + rng.choice(endings),
        "upper": lambda t: t.upper(),
        "lower": lambda t: t.lower(),
        "no_comma": lambda t: t.replace(",", ""),
        "paragraphs": lambda t: t.replace(". ", ".\n\n"),
        "blank_lines": lambda t: "\n\n" + t + "\n\n",
        "repeat": lambda t: prompt + "\n" + t,
        "capitals": lambda t: t + " NOTE: THE RESULT IS FINAL, OK?",
        "answer": lambda t: t + rng.choice(answers),
        "empty": lambda t: rng.choice(["", "   ", "\n"]),
        "word": lambda t: t + " " + rng.choice(WORDS) * rng.randint(1, 3),
    }


# The decorations that make a reply likely to follow an instruction, so both outcomes occur
TARGETS = {
    "combination:two_responses": "two",
    "detectable_format:json_format": "fence",
    "startend:quotation": "quote",
    "detectable_format:title": "title",
    "change_case:english_capital": "upper",
    "change_case:english_lowercase": "lower",
    "punctuation:no_comma": "no_comma",
    "detectable_format:constrained_response": "answer",
    "combination:repeat_prompt": "repeat",
    "startend:end_checker": "end",
    "detectable_content:postscript": "ps",
    "detectable_content:number_placeholders": "placeholders",
    "detectable_format:multiple_sections": "sections",
    "detectable_format:number_bullet_lists": "bullets",
    "detectable_format:number_highlighted_sections": "highlights",
    "length_constraints:number_paragraphs": "dividers",
    "length_constraints:nth_paragraph_first_word": "paragraphs",
    "change_case:capital_word_frequency": "capitals",
}


def _kwargs(rng: random.Random, instruction_id: str, prompt: str, reply: str) -> dict[str, Any]:
    relation = rng.choice(["less than", "at least"])
    by_id: dict[str, Any] = {
        "keywords:existence": lambda: {"keywords": rng.sample(WORDS, rng.randint(1, 2))},
        "keywords:frequency": lambda: {
            "keyword": rng.choice(WORDS),
            "frequency": rng.randint(1, 4),
            "relation": relation,
        },
        "keywords:forbidden_words": lambda: {
            "forbidden_words": rng.sample(WORDS, rng.randint(1, 3))
        },
        "keywords:letter_frequency": lambda: {
            "letter": rng.choice("aeiouxyzRT"),
            "let_frequency": rng.randint(1, 12),
            "let_relation": relation,
        },
        "language:response_language": lambda: {
            "language": rng.choice(["en", "fr", "es", "de", "ru", "ja", "hi", "it", "pt", "ko"])
        },
        "length_constraints:number_sentences": lambda: {
            "num_sentences": rng.randint(1, 6),
            "relation": relation,
        },
        "length_constraints:number_paragraphs": lambda: {"num_paragraphs": rng.randint(1, 4)},
        "length_constraints:number_words": lambda: {
            "num_words": rng.randint(2, 40),
            "relation": relation,
        },
        "detectable_content:number_placeholders": lambda: {"num_placeholders": rng.randint(1, 4)},
        "detectable_content:postscript": lambda: {
            "postscript_marker": rng.choice(["P.S.", "P.P.S", "p.s.", " P.S. "])
        },
        "detectable_format:number_bullet_lists": lambda: {"num_bullets": rng.randint(1, 5)},
        "detectable_format:number_highlighted_sections": lambda: {
            "num_highlights": rng.randint(1, 4)
        },
        "detectable_format:multiple_sections": lambda: {
            "section_spliter": rng.choice(["Section", "SECTION", " Section "]),
            "num_sections": rng.randint(1, 3),
        },
        "combination:repeat_prompt": lambda: {"prompt_to_repeat": prompt},
        "startend:end_checker": lambda: {
            "end_phrase": rng.choice(
                ["Any other questions?", "Is there anything else I can help with?", "market."]
            )
        },
        "change_case:capital_word_frequency": lambda: {
            "capital_frequency": rng.randint(1, 8),
            "capital_relation": relation,
        },
    }
    if instruction_id == "length_constraints:nth_paragraph_first_word":
        # half the time the reply's own paragraph count and a first word from it
        paragraphs = [p for p in reply.split("\n\n") if p.strip()]
        num = len(paragraphs) if paragraphs and rng.random() < 0.5 else rng.randint(1, 4)
        nth = rng.randint(1, num)
        first = rng.choice(["the", "however", "it", "we", "section", "sure", "le", "das", "el"])
        if nth <= len(paragraphs) and rng.random() < 0.7:
            first = paragraphs[nth - 1].split()[0].strip(".,?!'\"*")
        return {"num_paragraphs": num, "nth_paragraph": nth, "first_word": first or "x"}
    return by_id[instruction_id]() if instruction_id in by_id else {}


def parity_corpus(n: int, seed: int = 20240) -> list[tuple[dict[str, Any], str]]:
    """``n`` (record, reply) pairs: every id with varied kwargs, replies in several languages
    with markdown, fences, sections, placeholders, dividers, empty ones and more."""
    rng = random.Random(seed)
    ids = sorted(OFFICIAL_IDS)
    corpus = []
    for k in range(n):
        prompt = rng.choice(["Say hi.", "Write about the river village.", "Describe the park"])
        chosen = [ids[k % len(ids)], *rng.sample(ids, rng.randint(0, 2))]
        reply = rng.choice(list(TEXTS.values()))
        decorations = _decorations(rng, prompt)
        names = rng.sample(sorted(decorations), rng.randint(0, 3))
        if chosen[0] in TARGETS and rng.random() < 0.5:
            names = [TARGETS[chosen[0]], *names[:1]]
        for name in names:
            reply = decorations[name](reply)
        kwargs = [_kwargs(rng, i, prompt, reply) for i in chosen]
        if k % 3 == 0:  # google/IFEval's shape: every kwarg name, null where unused
            kwargs = [{name: None for name in KWARG_NAMES} | kw for kw in kwargs]
        doc = {"key": k, "prompt": prompt, "instruction_id_list": chosen, "kwargs": kwargs}
        corpus.append((doc, reply))
    return corpus


def as_lm_eval(followed: ifeval.Followed) -> dict[str, Any]:
    """Our verdicts in the shape of lm-eval's ``process_results``."""
    return {
        "prompt_level_strict_acc": all(followed.strict),
        "inst_level_strict_acc": followed.strict,
        "prompt_level_loose_acc": all(followed.loose),
        "inst_level_loose_acc": followed.loose,
    }


@pytest.mark.slow
def test_parity_with_lm_eval(reference, tools):
    corpus = parity_corpus(750)
    theirs = [reference.process_results(doc, [reply]) for doc, reply in corpus]
    ours = [score_reply(parse_record(doc), reply, tools) for doc, reply in corpus]
    mismatches = [
        (doc, reply, as_lm_eval(o), t)
        for (doc, reply), o, t in zip(corpus, ours, theirs, strict=True)
        if as_lm_eval(o) != t
    ]
    assert not mismatches, f"{len(mismatches)} of {len(corpus)} differ, first: {mismatches[0]}"
    # IFEval's four figures, aggregated as lm-eval aggregates them
    expected = {
        "prompt_strict": mean(t["prompt_level_strict_acc"] for t in theirs),
        "inst_strict": reference.agg_inst_level_acc([t["inst_level_strict_acc"] for t in theirs]),
        "prompt_loose": mean(t["prompt_level_loose_acc"] for t in theirs),
        "inst_loose": reference.agg_inst_level_acc([t["inst_level_loose_acc"] for t in theirs]),
    }
    scores = ifeval.ifeval_scores(ours)
    assert {name: s.value for name, s in scores.items()} == pytest.approx(expected, abs=1e-12)
    assert all(0.05 < value < 0.95 for value in expected.values())
    # The corpus proves something only if every id is both followed and not followed
    outcomes: dict[str, set[tuple[bool, bool]]] = defaultdict(set)
    for (doc, _), o in zip(corpus, ours, strict=True):
        verdicts = zip(o.strict, o.loose, strict=True)
        for instruction_id, verdict in zip(doc["instruction_id_list"], verdicts, strict=True):
            outcomes[instruction_id].add(verdict)
    for instruction_id in OFFICIAL_IDS:
        assert {P, F} <= outcomes[instruction_id], (instruction_id, outcomes[instruction_id])
    assert sum(L in o for o in outcomes.values()) >= 10
