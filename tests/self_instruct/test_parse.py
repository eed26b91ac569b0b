"""Self-Instruct pieces that need no server: parsing replies, filters, torn files."""

from __future__ import annotations

import json

import pytest

from instruct.config import compose
from instruct.data import DataError
from instruct.self_instruct.dataset import read_accepted
from instruct.self_instruct.filters import blacklist_pattern, cheap_filter
from instruct.self_instruct.parse import parse_tasks

GOOD = {
    "instruction": "Explain why leaves change colour in autumn.",
    "input": "",
    "output": "In autumn, trees stop making chlorophyll, so yellow and red pigments show.",
}


def test_plain_fenced_and_wrapped_json():
    text = json.dumps([GOOD, {**GOOD, "instruction": "Name two noble gases."}])
    assert len(parse_tasks(text)[0]) == 2
    fenced = f"Sure! Here are the tasks:\n```json\n{text}\n```\nHope this helps."
    tasks, problems = parse_tasks(fenced)
    assert len(tasks) == 2 and not problems
    wrapped = json.dumps({"tasks": [GOOD]})
    assert parse_tasks(wrapped)[0] == [GOOD]


def test_trailing_commas_and_other_key_names():
    text = (
        '[{"instruction": "List three rivers in Africa.", "input": "", '
        '"output": "The Nile, the Congo and the Niger.",},'
        ' {"task": "Say hi politely.", "context": "", "response": "Hello, nice to meet you."}]'
    )
    tasks, problems = parse_tasks(text)
    assert [t["instruction"] for t in tasks] == ["List three rivers in Africa.", "Say hi politely."]
    assert tasks[1]["output"] == "Hello, nice to meet you." and not problems


def test_a_list_cut_off_by_length_keeps_the_complete_items():
    full = json.dumps([GOOD, {**GOOD, "instruction": "Define entropy in one sentence."}, GOOD])
    cut = full[: full.rindex('"output"') + 15]
    tasks, problems = parse_tasks(cut, cut_off=True)
    assert len(tasks) == 2 and problems == {"cut_off": 1}


def test_unusable_replies_are_counted_never_raised():
    assert parse_tasks("I cannot help with that.") == ([], {"unparseable": 1})
    tasks, problems = parse_tasks(
        '[{"instruction": "x"}, {"foo": 1}, "text", {"instruction": "Add 2 and 2.", "output": 4}]'
    )
    assert tasks == [] and problems == {"bad_format": 3}


@pytest.mark.slow
@pytest.mark.parametrize(
    "instruction, output, reason",
    [
        ("Hi.", "Hello there, friend.", "instruction_length"),
        ("Draw a picture of a cat sitting on a mat.", "I would draw...", "blacklist"),
        ("Describe the image below in detail.", "It shows a lake.", "blacklist"),
        ("Please go to the store and buy milk.", "Done.", "blacklist"),
        ('"Quote" this sentence back to me please.', "Quote this.", "starts_with_punctuation"),
        ("Échangez ces deux mots dans la phrase.", "Fait.", "starts_non_ascii"),
        ("Write a short poem about the sea.", "", "output_length"),
        (
            "Write a short poem about the sea.",
            "Write a short poem about the sea.",
            "output_repeats_instruction",
        ),
        (
            "List some fruits that are rich in vitamin C.",
            "Oranges, kiwis, strawberries, etc.",
            "output_truncated",
        ),
        (
            "List some fruits that are rich in vitamin C.",
            "Oranges, kiwis and lemons, and...",
            "output_truncated",
        ),
        (
            "Explain what a prime number is.",
            "A whole number above 1 divisible only by 1 and itself.",
            None,
        ),
        (
            "Explain the difference between a mapping and a filter in Python.",
            "map applies a function to every item; filter keeps the items that pass a test.",
            None,
        ),
    ],
)
def test_cheap_filters(instruction, output, reason):
    cfg = compose(["data=self_instruct"]).data
    task = {"instruction": instruction, "input": "", "output": output}
    assert cheap_filter(task, cfg, blacklist_pattern(list(cfg.blacklist))) == reason


def test_a_torn_last_line_is_dropped_and_the_file_repaired(tmp_path, caplog):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + '{"instruction": "Wri')
    assert len(read_accepted(path)) == 2
    assert "torn last line" in caplog.text
    assert path.read_text().count("\n") == 2 and path.read_text().endswith("}\n")
    path.write_text(json.dumps(GOOD) + "\n{broken\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"tasks\.jsonl:2: corrupt line"):
        read_accepted(path)


@pytest.mark.parametrize(
    "override", ["data.concurrency=0", "data.similarity_threshold=1.5", "data.num_instructions=0"]
)
def test_bad_settings_name_their_key(override):
    from instruct.self_instruct.generate import check_settings

    key = override.split("=")[0]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_settings(compose(["data=self_instruct", override]).data)


def test_a_malformed_object_between_good_ones_is_counted():
    good = json.dumps(GOOD)
    text = f'[{good}, {{"instruction": "Broken, "output": oops}}, {good}]'
    tasks, problems = parse_tasks(text)
    assert len(tasks) == 2 and problems == {"malformed": 1}
    tasks, problems = parse_tasks(text, cut_off=True)  # the failure is not the last item
    assert problems == {"malformed": 1}
