"""The shipped IFEval-format set: reproducible from its script, well formed, free of conflicts.

When lm-evaluation-harness is installed, its IFEval registry is the reference for the ids,
their kwargs and the pairs that conflict; the rest of the checks run without it.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_ifeval_set.py"
SHIPPED = ROOT / "instruct" / "data" / "ifeval.jsonl"
FIELDS = ["key", "prompt", "instruction_id_list", "kwargs"]  # IFEval's order


@pytest.fixture(scope="module")
def script() -> ModuleType:
    """scripts/make_ifeval_set.py, imported from its path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_ifeval_set", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def records() -> list[dict]:
    with SHIPPED.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def registry() -> ModuleType:
    """lm-eval's instructions_registry, imported without letting nltk reach the network."""
    pytest.importorskip("lm_eval")
    nltk = pytest.importorskip("nltk")
    # instructions_util calls nltk.download("punkt_tab") at import when the data is missing;
    # none of the checks below tokenize, so the download is never needed. (nltk's process
    # state, not ours.)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nltk, "download", lambda *args, **kwargs: True)
        from lm_eval.tasks.ifeval import instructions_registry
    return instructions_registry


def test_script_reproduces_shipped_file(script: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "ifeval.jsonl"
    assert script.main(["--out", str(out)]) == 0
    assert out.read_bytes() == SHIPPED.read_bytes()


def test_output_does_not_depend_on_hash_seed(tmp_path: Path) -> None:
    """A fresh interpreter with another string-hash seed writes the same bytes."""
    out = tmp_path / "ifeval.jsonl"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, env=env)
    assert out.read_bytes() == SHIPPED.read_bytes()


def test_seed_and_count_change_the_set(script: ModuleType) -> None:
    small = script.build(seed=7, count=40)
    assert len(small) == 40
    assert [r["key"] for r in small] == list(range(1001, 1041))
    assert [r["prompt"] for r in small] != [r["prompt"] for r in script.build(count=40)]


def test_records_are_in_ifeval_format(records: list[dict]) -> None:
    assert len(records) >= 300
    assert [r["key"] for r in records] == list(range(1001, 1001 + len(records)))
    for record in records:
        assert list(record) == FIELDS
        assert isinstance(record["prompt"], str) and record["prompt"].strip()
        assert len(record["kwargs"]) == len(record["instruction_id_list"]) >= 1
        assert len(set(record["instruction_id_list"])) == len(record["instruction_id_list"])


def test_no_duplicate_prompts(records: list[dict]) -> None:
    prompts = Counter(r["prompt"] for r in records)
    assert [p for p, n in prompts.items() if n > 1] == []


def test_every_id_is_used_often(script: ModuleType, records: list[dict]) -> None:
    counts = Counter(i for r in records for i in r["instruction_id_list"])
    assert set(counts) == set(script.INSTRUCTION_IDS)
    assert len(script.INSTRUCTION_IDS) == 25
    assert min(counts.values()) >= 8, counts
    sizes = Counter(len(r["instruction_id_list"]) for r in records)
    assert sizes[1] > len(records) / 2 and sizes[2] > 0 and sizes[3] > 0
    assert set(sizes) == {1, 2, 3}


def test_kwargs_keys_are_exactly_the_allowed_ones(script: ModuleType, records: list[dict]) -> None:
    for record in records:
        for instruction_id, kwargs in zip(
            record["instruction_id_list"], record["kwargs"], strict=True
        ):
            assert list(kwargs) == list(script.ALLOWED_KWARGS[instruction_id]), record["key"]
            # lm-eval drops falsy kwargs before build_description, so none may be falsy.
            assert all(kwargs.values()), record["key"]


def test_kwargs_values_are_valid(script: ModuleType, records: list[dict]) -> None:
    for record in records:
        for kwargs in record["kwargs"]:
            for name in ("relation", "let_relation", "capital_relation"):
                if name in kwargs:
                    assert kwargs[name] in ("less than", "at least")
            for name, value in kwargs.items():
                if name.startswith(("num_", "frequency", "let_frequency", "capital_freq")):
                    assert isinstance(value, int) and value >= 1
            if "nth_paragraph" in kwargs:
                assert 1 <= kwargs["nth_paragraph"] <= kwargs["num_paragraphs"]
            if "language" in kwargs:
                assert kwargs["language"] in script.LANGUAGES
            if "letter" in kwargs:
                assert len(kwargs["letter"]) == 1 and kwargs["letter"].islower()
            if "section_spliter" in kwargs:
                assert kwargs["section_spliter"] in ("Section", "SECTION")
            if "postscript_marker" in kwargs:
                assert kwargs["postscript_marker"] in ("P.S.", "P.P.S")
            for name in ("keywords", "forbidden_words"):
                if name in kwargs:  # lm-eval sorts these, so sorted lists round-trip
                    assert kwargs[name] == sorted(set(kwargs[name]))
        words = [w for k in record["kwargs"] for w in [*k.get("keywords", []), k.get("keyword")]]
        banned = [w for k in record["kwargs"] for w in k.get("forbidden_words", [])]
        assert not set(words) & set(banned), record["key"]


def test_prompt_states_every_value(script: ModuleType, records: list[dict]) -> None:
    for record in records:
        prompt = record["prompt"]
        for kwargs in record["kwargs"]:
            for name, value in kwargs.items():
                if name == "prompt_to_repeat":
                    # lm-eval checks the response starts with it: it must lead the prompt.
                    assert prompt.startswith(value) and len(prompt) > len(value)
                elif name == "language":
                    assert script.LANGUAGES[value] in prompt
                elif isinstance(value, list):
                    assert all(f"'{v}'" in prompt for v in value), record["key"]
                else:
                    assert str(value) in prompt, (record["key"], name)


def test_repeat_prompt_comes_last(records: list[dict]) -> None:
    for record in records:
        ids = record["instruction_id_list"]
        if "combination:repeat_prompt" in ids:
            assert ids[-1] == "combination:repeat_prompt"


def test_no_conflicting_instructions_share_a_prompt(
    script: ModuleType, records: list[dict]
) -> None:
    for record in records:
        for a, b in itertools.combinations(record["instruction_id_list"], 2):
            assert script.compatible(a, b), (record["key"], a, b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("change_case:english_lowercase", "change_case:english_capital"),
        ("change_case:english_capital", "change_case:capital_word_frequency"),
        ("detectable_format:json_format", "detectable_format:multiple_sections"),
        ("detectable_format:json_format", "startend:quotation"),
        ("detectable_format:constrained_response", "punctuation:no_comma"),
        ("combination:two_responses", "length_constraints:number_paragraphs"),
        ("combination:repeat_prompt", "punctuation:no_comma"),
        ("length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word"),
        ("language:response_language", "keywords:existence"),
        ("detectable_format:title", "startend:quotation"),
    ],
)
def test_known_contradictions_are_forbidden(script: ModuleType, a: str, b: str) -> None:
    assert not script.compatible(a, b)
    assert not script.compatible(b, a)


def test_ids_and_kwargs_match_reference(script: ModuleType, registry: ModuleType) -> None:
    assert set(registry.INSTRUCTION_DICT) == set(script.ALLOWED_KWARGS)
    for instruction_id, allowed in script.ALLOWED_KWARGS.items():
        checker = registry.INSTRUCTION_DICT[instruction_id](instruction_id)
        assert checker.get_instruction_args_keys() == list(allowed), instruction_id


def test_kwargs_round_trip_through_reference(registry: ModuleType, records: list[dict]) -> None:
    """build_description accepts every kwargs dict and get_instruction_args returns it as is."""
    for record in records:
        for instruction_id, kwargs in zip(
            record["instruction_id_list"], record["kwargs"], strict=True
        ):
            checker = registry.INSTRUCTION_DICT[instruction_id](instruction_id)
            checker.build_description(**kwargs)
            assert (checker.get_instruction_args() or {}) == kwargs, (record["key"], kwargs)
            if instruction_id == "combination:repeat_prompt":
                # A response that repeats the prompt verbatim passes the reference check.
                assert checker.check_following(record["prompt"] + "\n\nMy answer.")


def test_table_is_stricter_than_reference(script: ModuleType, registry: ModuleType) -> None:
    conflicts = registry.conflict_make(
        {k: set(v) for k, v in registry.INSTRUCTION_CONFLICTS.items()}
    )
    allowed_by_us = [
        (a, b)
        for a, b in itertools.combinations(script.INSTRUCTION_IDS, 2)
        if script.compatible(a, b)
    ]
    assert [(a, b) for a, b in allowed_by_us if b in conflicts[a]] == []


def test_languages_are_reference_codes(script: ModuleType, registry: ModuleType) -> None:
    from lm_eval.tasks.ifeval import instructions_util

    for code, name in script.LANGUAGES.items():
        assert instructions_util.LANGUAGE_CODES[code] == name
