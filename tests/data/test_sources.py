"""Data as published: Parquet, CSV/TSV, JSON/JSONL (each also .gz/.zst), save_to_disk folders,
Hub-style datasets; mixtures of sources; preparation a batch at a time.

Every error names its row as the readers do (``file:line``, ``file[row]``,
``dataset[split][row]``). Nothing here reaches the network: Hub datasets are folders built
in the test (Parquet files and a README.md card with configs), loaded by path.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instruct.config import compose
from instruct.data import (
    DataError,
    Location,
    Source,
    load_records,
    load_splits,
    read_batches,
    read_records,
)
from instruct.data.stream import prepare_stream
from instruct.data.templates import render_many, to_messages
from instruct.data.tokenize import cache_key, prepare

ALPACA = [
    {"instruction": f"Question {i}?", "input": f"context {i}" if i % 3 == 0 else "",
     "output": f"Answer {i}, with a comma and \"quotes\"\nand a second line."}
    for i in range(12)
]  # fmt: skip


def expected_examples() -> list[dict]:
    out = []
    for r in ALPACA:
        e = {"instruction": r["instruction"], "output": r["output"]}
        if r["input"]:
            e["input"] = r["input"]
        out.append(e)
    return out


def write(path: Path, data: bytes) -> Path:
    """``data`` written to ``path``, compressed as its suffix says (.gz, .zst)."""
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    elif path.suffix == ".zst":
        with pa.output_stream(str(path), compression="zstd") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def encode(fmt: str, records: list[dict]) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records).encode()
    if fmt == "json":
        return json.dumps(records).encode()
    if fmt in ("csv", "tsv"):
        import io

        text = io.StringIO()
        writer = csv.DictWriter(
            text, fieldnames=list(records[0]), delimiter="," if fmt == "csv" else "\t"
        )
        writer.writeheader()
        writer.writerows(records)
        return text.getvalue().encode()
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records), sink)
    return sink.getvalue().to_pybytes()


FORMATS = ["jsonl", "json", "csv", "tsv", "parquet"]


@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_examples(tmp_path, fmt, compression):
    path = write(tmp_path / f"data.{fmt}{compression}", encode(fmt, ALPACA))
    assert load_records([path]) == expected_examples()


def test_csv_keeps_every_value_a_string_and_names_lines(tmp_path):
    # "42" stays text (no type guessing); a quoted field spans two lines, so the record after
    # it starts on line 4.
    text = 'instruction,output\n"Multi\nline",ok\nWhat is 6 x 7?,42\nempty,\n'
    path = write(tmp_path / "d.csv", text.encode())
    rows = list(read_records(path))
    assert [w for w, _ in rows] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert rows[1][1] == {"instruction": "What is 6 x 7?", "output": "42"}
    with pytest.raises(DataError, match=r"d\.csv:5: instruction and output must not be empty"):
        load_records([path])
    bad = write(tmp_path / "bad.tsv", b"instruction\toutput\na\tb\tc\n")
    with pytest.raises(DataError, match=r"bad\.tsv:2: 3 fields; the header line has 2"):
        load_records([bad])


def test_parquet_streams_in_record_batches_and_names_rows(tmp_path):
    records = [*ALPACA, {"instruction": "x", "input": None, "output": None}]
    path = write(tmp_path / "d.parquet", encode("parquet", records))
    sizes = [len(b) for b in read_batches(Location(str(path)), rows=5)]
    assert sizes == [5, 5, 3]  # never more than a batch of rows as Python objects
    with pytest.raises(DataError, match=r"d\.parquet\[12\]: field 'output' must be a string"):
        load_records([path])


def test_column_mapping_and_conversations_from_parquet(tmp_path):
    qa = write(tmp_path / "qa.parquet", encode("parquet", [{"q": "Why?", "a": "Because."}]))
    assert load_records([qa], {"q": "instruction", "a": "output"}) == [
        {"instruction": "Why?", "output": "Because."}
    ]
    chats = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    path = write(tmp_path / "chat.parquet", encode("parquet", chats))
    assert load_records([path])[0]["messages"][1] == {"role": "assistant", "content": "yo"}


def test_compressed_jsonl_keeps_the_jsonl_errors(tmp_path):
    path = write(tmp_path / "bad.jsonl.zst", b'{"instruction": "a", "output": "b"}\n{"x": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl\.zst:2: invalid JSON"):
        load_records([path])
    path = write(tmp_path / "latin1.jsonl.gz", b'{"instruction": "a", "output": "b"}\n"caf\xe9"\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl\.gz:2: not valid UTF-8 .* at byte 40"):
        load_records([path])
    empty = write(tmp_path / "empty.jsonl.gz", b"\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl\.gz: the file is empty"):
        load_records([empty])


def test_unknown_paths_are_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.parquet: no such data file"):
        load_records([tmp_path / "nope.parquet"])
    with pytest.raises(DataError, match="no such data file or folder, and not a Hub dataset id"):
        load_records([tmp_path / "no" / "folder"])


# ---------------------------------------------------------------- datasets: saved and Hub


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """datasets' cache in the test's folder (load_dataset writes Arrow files there)."""
    import datasets

    # datasets' own process state, not ours: it reads HF_DATASETS_CACHE once, at import.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache"


@pytest.fixture
def hub_folder(tmp_path) -> Path:
    """A dataset as the Hub lays one out: Parquet files per config and split, and a card."""
    root = tmp_path / "hub-dataset"
    qa = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    chat = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    for rel, rows in [
        ("data/qa/train-00000-of-00001.parquet", qa[:8]),
        ("data/qa/test-00000-of-00001.parquet", qa[8:]),
        ("data/chat/train-00000-of-00001.parquet", chat * 4),
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / rel)
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: qa\n  data_files:\n"
        "  - split: train\n    path: data/qa/train-*.parquet\n"
        "  - split: test\n    path: data/qa/test-*.parquet\n"
        "- config_name: chat\n  data_files:\n"
        "  - split: train\n    path: data/chat/train-*.parquet\n"
        "---\n# A toy dataset\n",
        "utf-8",
    )
    return root


def test_hub_style_folder_through_data_hf(hub_folder, datasets_cache):
    cfg = compose(
        ["data=hf", f"data.path={hub_folder}", "data.name=qa", "data.val_split=test",
         "+data.columns={question:instruction,answer:output}"]
    ).data  # fmt: skip
    train, val = load_splits(cfg, seed=0)
    assert [e["instruction"] for e in train] == [f"q{i}" for i in range(8)]
    assert val[1] == {"instruction": "q9", "output": "a9", "where": f"{hub_folder}:qa[test][1]"}
    chat = Source((Location(str(hub_folder), name="chat"),)).examples()
    assert chat[3]["where"] == f"{hub_folder}:chat[train][3]" and len(chat) == 4


def test_hub_errors_name_dataset_split_and_row(hub_folder, datasets_cache):
    cfg = compose(["data=hf", f"data.path={hub_folder}", "data.name=qa"]).data
    with pytest.raises(DataError, match=rf"{hub_folder}:qa\[train\]\[0\]: record has keys"):
        load_splits(cfg, seed=0)
    cfg = compose(["data=hf", f"data.path={hub_folder}", "data.name=qa", "data.split=dev"]).data
    with pytest.raises(DataError, match=r"could not load the dataset: .*split"):
        load_splits(cfg, seed=0)


def test_an_uncached_hub_id_offline_is_an_error_saying_so(tmp_path, monkeypatch, datasets_cache):
    """HF_HUB_OFFLINE=1 is honoured as datasets reads it: the cache only, no download."""
    import datasets
    import huggingface_hub.constants

    # datasets' and huggingface_hub's process state, not ours: both read HF_HUB_OFFLINE once,
    # at import, and the reader honours it as datasets does.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    cfg = compose(["data=hf", "data.path=nobody/no-such-dataset"]).data
    with pytest.raises(DataError, match=r"nobody/no-such-dataset: could not load .*HF_HUB_OFFLINE"):
        load_splits(cfg, seed=0)


def test_save_to_disk_folders(tmp_path, datasets_cache):
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)]
    single = tmp_path / "single"
    datasets.Dataset.from_list(rows).save_to_disk(str(single))
    both = tmp_path / "both"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
    ).save_to_disk(str(both))
    cfg = compose(["data=file", f"data.paths=[{single}]"]).data
    train, val = load_splits(cfg, seed=0)
    assert len(train) + len(val) == 6 and {"instruction", "output", "where"} <= set(train[0])
    val = Source((Location(str(both), split="test"),)).examples()
    assert [e["where"] for e in val] == [f"{both}[test][0]", f"{both}[test][1]"]
    with pytest.raises(
        DataError, match=r"no split 'dev'; the saved dataset has \['test', 'train'\]"
    ):
        Source((Location(str(both), split="dev"),)).examples()


# ---------------------------------------------------------------- mixtures


def mixture(tmp_path: Path, *sources: str, extra: tuple[str, ...] = ()):
    return compose(["data=mixture", f"data.sources=[{','.join(sources)}]", *extra]).data


@pytest.fixture
def two_files(tmp_path) -> tuple[Path, Path]:
    a = write(tmp_path / "a.parquet", encode("parquet", [
        {"instruction": f"a{i}", "output": f"A{i}"} for i in range(40)]))  # fmt: skip
    b = write(tmp_path / "b.jsonl", encode("jsonl", [
        {"messages": [{"role": "user", "content": f"b{i}"},
                      {"role": "assistant", "content": f"B{i}"}]} for i in range(20)]))  # fmt: skip
    return a, b


def test_mixture_applies_each_sources_settings(tmp_path, two_files):
    a, b = two_files
    cfg = mixture(
        tmp_path,
        f"{{path: {a}, max_examples: 30, val_fraction: 0.2, weight: 2.0, label: alpaca}}",
        f"{{path: {b}, system: 'Answer briefly.', weight: 0.5}}",
    )
    train, val = load_splits(cfg, seed=0)
    from_a = [e for e in train if e["source"] == "alpaca"]
    from_b = [e for e in train if e["source"] == str(b)]
    assert len(from_a) == 2 * 24 and len({e["where"] for e in from_a}) == 24  # each twice
    assert len(from_b) == 9 and len({e["where"] for e in from_b}) == 9  # half of 18, once each
    assert [e["source"] for e in val].count("alpaca") == 6  # 0.2 of 30, never weighted
    assert [e["source"] for e in val].count(str(b)) == 2  # data.val_fraction 0.1 of 20
    assert all(e["messages"][0] == {"role": "system", "content": "Answer briefly."}
               for e in from_b)  # fmt: skip
    assert all("messages" not in e for e in from_a)  # no system prompt: left as it was
    train_val_wheres = {e["where"] for e in train} & {e["where"] for e in val}
    assert not train_val_wheres


def test_weight_with_replacement_is_seeded(tmp_path, two_files):
    a, b = two_files
    source = f"{{path: {a}, weight: 1.5, replacement: true}}"
    first, _ = load_splits(mixture(tmp_path, source), seed=0)
    again, _ = load_splits(mixture(tmp_path, source), seed=0)
    other, _ = load_splits(mixture(tmp_path, source), seed=1)
    assert len(first) == round(36 * 1.5) and first == again and first != other
    assert len({e["where"] for e in first}) < len(first)  # drawn with replacement


def test_appending_a_source_leaves_the_others_split_alone(tmp_path, two_files):
    a, b = two_files
    c = write(tmp_path / "c.csv", encode("csv", [{"instruction": f"c{i}", "output": "C"}
                                                for i in range(10)]))  # fmt: skip
    before_train, before_val = load_splits(mixture(tmp_path, f"{{path: {a}}}"), seed=3)
    after_train, after_val = load_splits(
        mixture(tmp_path, f"{{path: {c}}}", f"{{path: {a}}}", f"{{path: {b}}}"), seed=3
    )
    assert [e["where"] for e in after_val if e["source"] == str(a)] == [
        e["where"] for e in before_val
    ]
    assert [e["where"] for e in after_train if e["source"] == str(a)] == [
        e["where"] for e in before_train
    ]


@pytest.mark.slow
def test_mixture_config_errors_name_the_source(tmp_path, two_files):
    a, b = two_files
    with pytest.raises(DataError, match=r"data\.sources\[1\]: label .* is already"):
        load_splits(mixture(tmp_path, f"{{path: {a}}}", f"{{path: {a}}}"), seed=0)
    with pytest.raises(DataError, match=r"data\.sources\[0\]\.weight must be positive, got 0"):
        load_splits(mixture(tmp_path, f"{{path: {a}, weight: 0}}"), seed=0)
    with pytest.raises(DataError, match=r"data\.sources: no source given"):
        load_splits(compose(["data=mixture"]).data, seed=0)
    with pytest.raises(DataError, match=r"no validation example"):
        load_splits(mixture(tmp_path, f"{{path: {a}, val_fraction: 0}}"), seed=0)


def test_where_and_source_change_nothing_rendered_or_tokenised(tmp_path, two_files, tokenizer):
    a, b = two_files
    train, _ = load_splits(mixture(tmp_path, f"{{path: {a}}}", f"{{path: {b}}}"), seed=0)
    template = compose(["template=chatml"]).template
    bare = [{k: v for k, v in e.items() if k not in ("where", "source")} for e in train]
    with_origin = render_many([to_messages(e, template) for e in train], template, tokenizer)
    without = render_many([to_messages(e, template) for e in bare], template, tokenizer)
    assert with_origin == without
    assert cache_key(with_origin, tokenizer, 64) == cache_key(without, tokenizer, 64)


def test_counts_per_source_in_the_split_stats(tmp_path, two_files, tokenizer):
    """Kept, truncated and dropped examples are counted per source (into results.json)."""
    from instruct.data.features import tokenize_by_source

    a, b = two_files
    long = write(tmp_path / "long.jsonl", encode("jsonl", [
        {"instruction": "word " * 80, "output": "too late"} for _ in range(5)]))  # fmt: skip
    cfg = compose(
        ["template=chatml", "trainer.tokenized_cache=false", "trainer.max_length=48",
         "data=mixture", f"data.sources=[{{path: {a}}},{{path: {long}, val_fraction: 0.4}}]"]
    )  # fmt: skip
    train, _ = load_splits(cfg.data, cfg.seed)
    features, total, per = tokenize_by_source(train, cfg, tokenizer)
    assert set(per) == {str(a), str(long)}
    assert per[str(long)].dropped == 3 and per[str(long)].truncated == 3
    assert per[str(long)].dropped_examples[0].startswith(f"{long}:")
    assert per[str(a)].kept == 36 and per[str(a)].dropped == 0
    assert total.kept == len(features) == 36 and total.dropped == 3


# ---------------------------------------------------------------- a batch at a time


def test_streamed_preparation_equals_preparing_everything_at_once(tmp_path, tokenizer):
    rows = [
        {"instruction": f"Task {i}: " + "w " * (i % 40), "input": "x" if i % 4 else "",
         "output": "reply " * (1 + i % 30)}
        for i in range(100)
    ]  # fmt: skip
    path = write(tmp_path / "rows.parquet", encode("parquet", rows))
    template = compose(["template=chatml"]).template
    streamed = prepare_stream(Source((Location(str(path)),)).batches(rows=16), template,
                              tokenizer, 40)  # fmt: skip
    examples = load_records([path])
    whole, stats = prepare(
        render_many([to_messages(e, template) for e in examples], template, tokenizer),
        tokenizer,
        40,
    )
    assert streamed.stats == stats and stats.truncated > 0 and stats.dropped > 0
    assert len(streamed) == len(whole) and list(streamed) == whole
    assert len(streamed.ids) == 7  # batches of 16 rows: 7 arrays, no object per example


@pytest.mark.slow
def test_a_run_on_a_mixture_stores_counts_per_source(tmp_path, two_files):
    """The tiny model on a Parquet + JSONL mixture: results.json counts each source apart."""
    from instruct.train import train

    a, b = two_files
    cfg = compose(
        ["model=tiny", "lora=none", "logger=none", "template=chatml", "trainer.max_steps=2",
         "trainer.eval_every=2", "trainer.batch_size=8", "trainer.samples=0",
         "trainer.save_best=false", "eval=none", f"run_dir={tmp_path / 'run'}",
         "data=mixture", f"data.sources=[{{path: {a}, label: alpaca}},{{path: {b}, weight: 2}}]"]
    )  # fmt: skip
    train(cfg)
    data = json.loads((tmp_path / "run" / "results.json").read_text())["data"]
    per = data["sources"]
    assert list(per) == ["alpaca", str(b)]
    assert per["alpaca"]["train"]["kept"] == 36 and per[str(b)]["train"]["kept"] == 36
    assert per["alpaca"]["validation"]["kept"] == 4 and per[str(b)]["validation"]["kept"] == 2
    assert data["train"]["kept"] == 72 and data["train"]["dropped"] == 0
