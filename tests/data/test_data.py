"""Loading, normalising, selecting and splitting examples; bad records name file and line."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from instruct.config import compose
from instruct.data import (
    TASK_TYPES,
    DataError,
    load_records,
    load_splits,
    manual_path,
    normalise,
    split,
)

DOMAINS = set(TASK_TYPES)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


def test_manual_set_is_large_curated_and_covers_every_domain():
    examples = load_records([manual_path()])
    assert len(examples) >= 60
    counts = Counter(e["domain"] for e in examples)
    assert set(counts) == DOMAINS and min(counts.values()) >= 5
    assert len({e["id"] for e in examples}) == len(examples)
    assert any("messages" in e for e in examples)  # multi-turn examples too
    assert any(e.get("input") for e in examples)  # instruction + input examples too


def test_domain_selection_and_unknown_domains():
    cfg = compose(["data.domains=[code,math]"]).data
    train, val = load_splits(cfg, seed=0)
    assert {e["domain"] for e in train + val} == {"code", "math"}
    cfg = compose(["data.domains=[cooking]"]).data
    with pytest.raises(DataError, match="cooking"):
        load_splits(cfg, seed=0)


def test_split_is_deterministic_from_the_seed_and_disjoint():
    examples = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)]
    a_train, a_val = split(examples, 0.25, seed=3)
    b_train, b_val = split(examples, 0.25, seed=3)
    c_train, c_val = split(examples, 0.25, seed=4)
    assert (a_train, a_val) == (b_train, b_val)
    assert a_val != c_val
    assert len(a_val) == 10 and len(a_train) == 30
    assert {e["instruction"] for e in a_train}.isdisjoint(e["instruction"] for e in a_val)


def test_public_layouts_normalise(tmp_path):
    records = [
        {"instruction": "Alpaca", "input": "", "output": "yes"},
        {"instruction": "Dolly", "context": "ctx", "response": "ok", "category": "qa"},
        {"prompt": "Complete", "completion": "done"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    ]
    examples = load_records([write_jsonl(tmp_path / "d.jsonl", records)])
    assert examples[0] == {"instruction": "Alpaca", "output": "yes"}  # empty input dropped
    assert examples[1] == {"instruction": "Dolly", "input": "ctx", "output": "ok"}
    assert examples[2] == {"instruction": "Complete", "output": "done"}
    assert examples[4]["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    (tmp_path / "list.json").write_text(json.dumps(records[:2]), "utf-8")
    assert load_records([tmp_path / "list.json"]) == examples[:2]


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Why?", "answer": "Because."}])
    assert load_records([path], {"question": "instruction", "answer": "output"}) == [
        {"instruction": "Why?", "output": "Because."}
    ]


def test_file_source_with_its_own_validation_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a", "output": "b"}] * 3)
    val = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "c", "output": "d"}])
    cfg = compose(["data=file", f"data.paths=[{train}]", f"data.val_paths=[{val}]"]).data
    tr, va = load_splits(cfg, seed=0)
    # Each example keeps its origin, as errors and the masking report name it.
    assert len(tr) == 3 and va == [{"instruction": "c", "output": "d", "where": f"{val}:1"}]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"instruction": "x", "output": ', r"bad\.jsonl:2: invalid JSON"),
        ('{"question": "x"}', r"bad\.jsonl:2: record has keys \['question'\]"),
        ('{"instruction": "x", "output": 3}', r"bad\.jsonl:2: field 'output' must be a string"),
        ('["x"]', r"bad\.jsonl:2: expected a JSON object"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', r"bad\.jsonl:2: message 0 has role"),
        ('{"messages": [{"role": "user", "content": "x"}]}', r"bad\.jsonl:2: .*no assistant"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "ok", "output": "fine"}\n' + line + "\n", "utf-8")
    with pytest.raises(DataError, match=message):
        load_records([path])


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good, bad = b'{"instruction": "a", "output": "b"}', b'{"instruction": "caf\xe9", "output": "b"}'
    path.write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        load_records([path])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such data file"):
        load_records([tmp_path / "nope.jsonl"])


def test_normalise_keeps_id_and_domain():
    out = normalise({"id": "x-1", "domain": "math", "instruction": "1+1", "output": "2"}, "here")
    assert out == {"id": "x-1", "domain": "math", "instruction": "1+1", "output": "2"}
