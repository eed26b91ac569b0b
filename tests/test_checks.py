"""Verifiable instruction checks: each passes and fails where it should; specs are validated."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from instruct.checks import CHECKS, pass_rate, run_checks, validate_checks
from instruct.data import TASK_TYPES

DOMAINS = set(TASK_TYPES)

FENCE = "```"

# (check type, params, response, expected). Every registered check appears with at least one
# passing and one failing response; the empty string is covered separately for all of them.
CASES = [
    ("max_words", {"value": 5}, "One two three four five.", True),
    ("max_words", {"value": 4}, "One two three four five.", False),
    # Lone punctuation is not a word; non-ASCII words count like any other.
    ("max_words", {"value": 4}, "Ça va — très bien !", True),
    ("max_words", {"value": 3}, "Ça va — très bien !", False),
    ("min_words", {"value": 3}, "naïve café crème", True),
    ("min_words", {"value": 4}, "naïve café crème", False),
    ("max_sentences", {"value": 2}, "Pi is about 3.14. It never ends!", True),
    ("max_sentences", {"value": 1}, "Pi is about 3.14. It never ends!", False),
    ("max_sentences", {"value": 2}, "今日は晴れ。明日は雨。", True),
    ("max_sentences", {"value": 1}, "今日は晴れ。明日は雨。", False),
    ("include_keywords", {"keywords": ["copper", "Wire"]}, "COPPER makes good wire.", True),
    # Whole words only: "wires" does not contain the word "wire".
    ("include_keywords", {"keywords": ["copper", "wire"]}, "Copper wires.", False),
    ("include_keywords", {"keywords": ["C++"]}, "I write C++ daily.", True),
    ("include_keywords", {"keywords": ["Zürich"]}, "She moved to zürich.", True),
    (
        "exclude_keywords",
        {"keywords": ["join"]},
        "SELECT * FROM a, b WHERE a.id = b.a_id; joined",
        True,
    ),
    ("exclude_keywords", {"keywords": ["join"]}, "SELECT * FROM a JOIN b ON a.id = b.a_id", False),
    ("keyword_frequency", {"keyword": "density", "min_count": 2}, "Density and DENSITY.", True),
    ("keyword_frequency", {"keyword": "density", "min_count": 2}, "density, densities", False),
    ("json_format", {}, '{"name": "Ana", "age": 31}', True),
    ("json_format", {}, f'\n  {FENCE}json\n{{"a": [1, 2]}}\n{FENCE}\n\n', True),
    ("json_format", {}, f"{FENCE}\n[1, 2, 3]\n{FENCE}", True),
    ("json_format", {}, '{"ville": "Kraków"}', True),
    ("json_format", {}, 'Here you go: {"a": 1}', False),
    ("json_format", {}, f'{FENCE}json\n{{"a": 1}}\n{FENCE}\nHope this helps!', False),
    ("json_format", {}, f"{FENCE}python\nprint(1)\n{FENCE}", False),
    ("json_format", {}, "{'single': 'quotes'}", False),
    ("lowercase", {}, "snow on the old roof, ça glisse", True),
    ("lowercase", {}, "snow on the Old roof", False),
    ("lowercase", {}, "123 !!", False),  # no letters at all
    ("uppercase", {}, "RUN FAST, RUN FREE! ÉTÉ 2024", True),
    ("uppercase", {}, "RUN FAST, run free", False),
    ("uppercase", {}, "2024", False),
    ("no_commas", {}, "Weather is today. Climate is decades.", True),
    ("no_commas", {}, "Weather, then climate.", False),
    ("no_commas", {}, "天气，气候", False),  # full-width comma
    ("bullet_count", {"value": 3}, "Uses:\n- wiring\n  * plumbing\n- coins\n", True),
    ("bullet_count", {"value": 3}, "- wiring\n- plumbing", False),
    # Bold text and horizontal rules are not bullets.
    ("bullet_count", {"value": 1}, "**Note**\n---\n- one", True),
    ("numbered_count", {"value": 3}, "1. Mix\n2) Stir\n  3. Bake", True),
    ("numbered_count", {"value": 3}, "1. Mix\n2. Stir\n3.14 is pi", False),
    ("starts_with", {"text": "Yes"}, "  Yes, a tomato is a fruit.", True),
    ("starts_with", {"text": "Yes"}, "yes, it is.", False),
    ("ends_with", {"text": "Answer: 7"}, "y = 7\nAnswer: 7  \n\n", True),
    ("ends_with", {"text": "Answer: 7"}, "Answer: 7.", False),
    ("ends_with", {"text": "¿Algo más?"}, "Listo. ¿Algo más?", True),
    ("quoted", {}, '  "Southern Lantern"\n', True),
    ("quoted", {}, "\u201cSouthern Lantern\u201d", True),
    ("quoted", {}, 'The ship is "Southern Lantern"', False),
    ("quoted", {}, '""', False),
    ("paragraph_count", {"value": 2}, "First part.\nStill first.\n\n  \n\nSecond part.", True),
    ("paragraph_count", {"value": 2}, "First part.\r\n\r\nSecond.\r\n\r\nThird.", False),
    ("paragraph_count", {"value": 1}, "\n\nOnly one paragraph.\n\n", True),
    ("title", {}, "<<Song of the Sea>>\nThe tide comes in.", True),
    ("title", {}, "<<Chanson de la mer>>", True),
    ("title", {}, "Song of the Sea\nThe tide comes in.", False),
    ("title", {}, "<<  >> nothing inside", False),
]


@pytest.mark.parametrize(("kind", "params", "response", "expected"), CASES)
def test_check_passes_and_fails_where_it_should(kind, params, response, expected):
    assert CHECKS[kind](response, **params) is expected


def test_every_check_has_a_passing_and_a_failing_case():
    outcomes = {(kind, expected) for kind, _, _, expected in CASES}
    assert {kind for kind, _ in outcomes} == set(CHECKS)
    assert all((kind, True) in outcomes and (kind, False) in outcomes for kind in CHECKS)


def _minimal_params(kind: str) -> dict:
    """Parameters that make ``kind`` pass vacuously on an empty response, if anything could."""
    return {
        "max_words": {"value": 10},
        "min_words": {"value": 0},
        "max_sentences": {"value": 10},
        "include_keywords": {"keywords": ["x"]},
        "exclude_keywords": {"keywords": ["x"]},
        "keyword_frequency": {"keyword": "x", "min_count": 0},
        "bullet_count": {"value": 0},
        "numbered_count": {"value": 0},
        "paragraph_count": {"value": 0},
        "starts_with": {"text": "x"},
        "ends_with": {"text": "x"},
    }.get(kind, {})


@pytest.mark.parametrize("kind", sorted(CHECKS))
@pytest.mark.parametrize("response", ["", "   \n\t "])
def test_empty_response_fails_every_check_without_crashing(kind, response):
    assert CHECKS[kind](response, **_minimal_params(kind)) is False


def test_run_checks_returns_type_params_and_passed_per_spec():
    specs = [{"type": "max_words", "value": 3}, {"type": "lowercase"}]
    results = run_checks("Hello there", specs)
    assert results == [
        {"type": "max_words", "params": {"value": 3}, "passed": True},
        {"type": "lowercase", "params": {}, "passed": False},
    ]
    assert specs == [{"type": "max_words", "value": 3}, {"type": "lowercase"}]  # not mutated
    assert run_checks("anything", []) == []


def test_run_checks_rejects_a_bad_spec():
    with pytest.raises(ValueError, match="unknown check type 'nope'"):
        run_checks("text", [{"type": "nope"}])


@pytest.mark.parametrize(
    ("checks", "problem"),
    [
        ({"type": "max_words", "value": 3}, "must be a list of dicts, got dict"),
        (["max_words"], r"checks\[0\] must be a dict, got str"),
        ([{"value": 3}], "unknown check type None"),
        ([{"type": ["max_words"]}], "unknown check type"),
        ([{"type": "max_wrds", "value": 3}], "unknown check type 'max_wrds'; known: max_words, "),
        (
            [{"type": "lowercase"}, {"type": "max_words"}],
            r"checks\[1\] \(max_words\): missing .*'value'",
        ),
        ([{"type": "lowercase", "value": 1}], r"unknown parameter\(s\) \['value'\]"),
        ([{"type": "max_words", "value": 3, "limit": 4}], r"unknown parameter\(s\) \['limit'\]"),
        ([{"type": "max_words", "value": "20"}], "'value' must be an integer, got str"),
        ([{"type": "max_words", "value": True}], "'value' must be an integer, got bool"),
        ([{"type": "max_words", "value": -1}], "'value' must be >= 0"),
        ([{"type": "starts_with", "text": 5}], "'text' must be a string, got int"),
        ([{"type": "include_keywords", "keywords": "red"}], "'keywords' must be a list of strings"),
        ([{"type": "include_keywords", "keywords": ["red", 1]}], "must be a list of strings"),
        ([{"type": "exclude_keywords", "keywords": []}], "non-empty list"),
    ],
)
def test_validate_checks_names_the_location_and_the_problem(checks, problem):
    where = "test_instructions.jsonl:7"
    with pytest.raises(ValueError, match=problem) as err:
        validate_checks(checks, where)
    assert str(err.value).startswith(f"{where}: ")


def test_validate_checks_accepts_every_check_with_its_params():
    validate_checks([{"type": kind, **_minimal_params(kind)} for kind in CHECKS], "here")


def test_pass_rate_on_a_hand_made_example():
    results = [
        run_checks("- red\n- green\n- blue", [{"type": "bullet_count", "value": 3}]),
        [{"type": "no_commas", "params": {}, "passed": True}] * 2,
        [
            {"type": "max_words", "params": {"value": 1}, "passed": False},
            {"type": "lowercase", "params": {}, "passed": True},
            {"type": "title", "params": {}, "passed": False},
        ],
        [{"type": "quoted", "params": {}, "passed": False}],
    ]
    assert pass_rate(results) == {
        "prompt_level": 2 / 4,
        "check_level": 4 / 7,
        "prompts": 4,
        "checks": 7,
    }


def test_pass_rate_when_empty():
    empty = {"prompt_level": 0.0, "check_level": 0.0, "prompts": 0, "checks": 0}
    assert pass_rate([]) == empty
    assert pass_rate([[]]) == {**empty, "prompt_level": 1.0, "prompts": 1}


def test_shipped_test_instructions_are_valid():
    path = Path(str(resources.files("instruct.data").joinpath("test_instructions.jsonl")))
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for lineno, line in enumerate(lines, start=1):
        where = f"{path.name}:{lineno}"
        record = json.loads(line)
        assert {"id", "domain", "instruction", "checks"} <= set(record), where
        assert set(record) <= {"id", "domain", "instruction", "input", "checks"}, where
        assert isinstance(record["instruction"], str) and record["instruction"].strip(), where
        assert isinstance(record.get("input", "x"), str), where
        assert record["domain"] in DOMAINS, where
        assert 1 <= len(record["checks"]) <= 2, where
        validate_checks(record["checks"], where)
        records.append(record)
    assert len(records) == 36
    assert Counter(r["domain"] for r in records) == {d: 4 for d in DOMAINS}
    assert len({r["id"] for r in records}) == len(records)
    assert {c["type"] for r in records for c in r["checks"]} == set(CHECKS)


def test_shipped_test_instructions_do_not_repeat_training_instructions():
    data = resources.files("instruct.data")
    train = {
        json.loads(line).get("instruction", "").strip().lower()
        for line in data.joinpath("manual.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    }
    lines = data.joinpath("test_instructions.jsonl").read_text(encoding="utf-8").splitlines()
    test = {json.loads(line)["instruction"].strip().lower() for line in lines}
    assert not test & train
