"""bench_train.py --data: a user's file reaches every side, read by the project's own code.

The same records in JSONL, JSON, CSV and Parquet (Dolly's keys), and conversations as
OpenAI messages and ShareGPT, give the features our trainer computes for ``data=file``; a
bad file ends the run with the project's error (file:line and key) before anything is
measured; end to end (slow), ours, TRL and the bare loop train on the same examples with the
same token counts. ``bench/make_public_style.py`` writes Dolly-15k's format and mix.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from tests.bench.test_gpu_script import bench_module, restored_cache_env  # noqa: F401

DOLLY_RECORDS = [
    {"instruction": f"Name {k} things found in a {place}.", "context": context,
     "response": f"Here are {k}: " + ", ".join(f"item {j}" for j in range(k)) + ".",
     "category": "brainstorming" if not context else "closed_qa"}
    for k, (place, context) in enumerate(
        [("kitchen", ""), ("garden", "Gardens hold plants, tools and paths."), ("library", ""),
         ("museum", "A museum keeps old things, with labels, in rooms."), ("river", ""),
         ("market", ""), ("school", "Schools have desks, books and a bell."), ("forest", ""),
         ("station", ""), ("bakery", "Bread, ovens and flour.")],
        start=2,
    )
]  # fmt: skip
CONVERSATIONS = [
    [("system", "You are brief."), ("user", f"What is {k} + {k}?"), ("assistant", f"{2 * k}."),
     ("user", "And doubled?"), ("assistant", f"{4 * k}.")]
    for k in range(1, 11)
]  # fmt: skip


@pytest.fixture(scope="module")
def bt():
    return bench_module("bench_train")


@pytest.fixture(scope="module")
def mps():
    return bench_module("make_public_style")


@pytest.fixture(scope="module")
def smol_folder(bt) -> Path:
    """SmolLM2's converted folder: its tokenizer, whose EOS is ChatML's end of turn."""
    return bt.smollm2_folder()


def write_formats(folder: Path, mps) -> dict[str, Path]:
    """The Dolly records in every format the generator writes, plus the conversations as
    OpenAI messages (JSONL) and ShareGPT (JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for suffix in ("jsonl", "json", "csv", "parquet"):
        paths[suffix] = folder / f"dolly.{suffix}"
        mps.write(paths[suffix], DOLLY_RECORDS)
    paths["messages"] = folder / "messages.jsonl"
    mps.write(
        paths["messages"],
        [{"messages": [{"role": r, "content": c} for r, c in turns]} for turns in CONVERSATIONS],
    )
    paths["sharegpt"] = folder / "sharegpt.json"
    gpt = {"system": "system", "user": "human", "assistant": "gpt"}
    mps.write(paths["sharegpt"], [
        {"conversations": [{"from": gpt[r], "value": c} for r, c in turns]}
        for turns in CONVERSATIONS])  # fmt: skip
    return paths


def ours_features(bt, data, examples: int, tokenizer) -> list[dict]:
    """What our trainer computes for data=file with ``data``'s overrides: the config it
    composes, the train split load_splits gives with the run's seed, tokenize_split."""
    from instruct.data import load_splits
    from instruct.data.features import tokenize_split

    cfg = bt.compose_run(*data.overrides(examples))
    cfg.trainer.tokenized_cache = False
    train, _ = load_splits(cfg.data, cfg.seed)
    features, _ = tokenize_split(train, cfg, tokenizer)
    return [{"input_ids": f.input_ids.tolist(), "labels": f.labels.tolist()} for f in features]


def test_every_format_gives_the_features_our_trainer_computes(tmp_path, bt, mps, smol_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_folder)
    paths = write_formats(tmp_path / "data", mps)
    got = {}
    for name, path in paths.items():
        data = bt.DataFile(path)
        assert f"data.paths=['{path.resolve()}']" in data.overrides(6)
        feats, rows, stats = data.features(6, tokenizer)
        assert feats == ours_features(bt, data, 6, tokenizer)  # the trainer's own, exactly
        assert len(feats) == 6 and stats.dropped == 0  # 10 records: 6 train, 4 validate
        got[name] = (feats, rows)
    dolly = [got[s] for s in ("jsonl", "json", "csv", "parquet")]
    assert all(d == dolly[0] for d in dolly)  # the same records in four formats: one data set
    feats, rows = dolly[0]
    assert set(rows[0]) == {"prompt", "completion"}  # one reply each: TRL tokenises the text
    for f, r in zip(feats, rows, strict=True):  # TRL's text is exactly what ours tokenised
        assert tokenizer(r["prompt"] + r["completion"])["input_ids"] == f["input_ids"]
        assert r["completion"].endswith("<|im_end|>") and "<|im_start|>user" in r["prompt"]
    contexts = [r for r in rows if "Gardens" in r["prompt"] or "Bread" in r["prompt"]]
    assert contexts  # Dolly's context reaches the prompt (context -> input)
    assert got["messages"] == got["sharegpt"]  # ShareGPT's from/value read as messages
    conv_feats, conv_rows = got["messages"]
    assert set(conv_rows[0]) == {"input_ids", "completion_mask"}  # two replies: pre-tokenised
    for f, r in zip(conv_feats, conv_rows, strict=True):
        assert r["input_ids"] == f["input_ids"]
        assert r["completion_mask"] == [int(x != bt.IGNORE_INDEX) for x in f["labels"]]
        trained = [t for t, m in zip(r["input_ids"], r["completion_mask"], strict=True) if m]
        assert tokenizer.decode(trained).count("<|im_end|>") == 2  # both replies trained


def test_prepare_workload_with_data_trains_on_the_kept_examples(tmp_path, bt, mps, smol_folder):
    path = write_formats(tmp_path / "data", mps)["csv"]
    folder = bt.build_tiny_folder(tmp_path / "tiny", smol_folder)
    workload = replace(bt.WORKLOADS["tiny"], examples=5)
    p = bt.prepare_workload(workload, folder, tmp_path / "work", bt.DataFile(path, seed=3))
    assert p.workload.examples == 5 and p.data == bt.DataFile(path, seed=3).overrides(5)
    feats = json.loads(p.features.read_text())
    assert len(feats) == 5 and len(bt.read_jsonl(p.trl_data)) == 5
    assert p.tokens == sum(len(f["input_ids"]) for f in feats)
    assert "data.max_examples=9" in p.data and "data=file" in p.data


def test_a_file_shorter_than_asked_trains_on_what_it_has(tmp_path, bt, mps, smol_folder):
    from transformers import AutoTokenizer

    path = write_formats(tmp_path / "data", mps)["jsonl"]
    feats, _, _ = bt.DataFile(path).features(48, AutoTokenizer.from_pretrained(smol_folder))
    assert len(feats) == 10 - 1  # 10 records, 10 x 4/52 rounds to 1 validation example


def run_main_expecting_exit(bt, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        bt.main(argv)
    return str(info.value.code)


BAD = [
    # (file name, content, what the error must name)
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
     ["bad.jsonl:2", "expected instruction + output"]),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 7}\n',
     ["bad.jsonl:2", "'output' must be a string"]),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\nnot json\n', ["bad.jsonl:2"]),
    ("bad.csv", "question,answer\nWhat?,That.\n", ["bad.csv:2", "data.columns"]),
    ("bad.jsonl", '{"messages": [{"role": "robot", "content": "hi"}]}\n',
     ["bad.jsonl:1", "role 'robot'"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "named"), BAD)
def test_a_bad_file_ends_the_run_with_the_projects_error(tmp_path, bt, name, content, named):
    path = tmp_path / name
    path.write_text(content)
    message = run_main_expecting_exit(bt, ["--data", str(path), "--workloads", "tiny"])
    assert message.startswith(f"--data {path}: ")
    for part in named:
        assert part in message, message


def test_data_settings_reach_the_reader_and_are_checked(tmp_path, bt):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\n" + "".join(f"Q{k}?,A{k}.\n" for k in range(8)))
    mapped = ["--data-set", "+data.columns={question:instruction,answer:output}"]
    data = bt.DataFile(path, tuple(mapped[1:]))
    assert [e["instruction"] for e in data.train_examples(2)]  # read through the mapping
    missing = run_main_expecting_exit(bt, ["--data", str(tmp_path / "none.jsonl")])
    assert "none.jsonl" in missing
    assert "only data.* keys" in run_main_expecting_exit(
        bt, ["--data", str(path), "--data-set", "trainer.epochs=2"])  # fmt: skip
    assert "give --data FILE" in run_main_expecting_exit(bt, ["--data-set", "data.format=csv"])
    wrong = run_main_expecting_exit(bt, ["--data", str(path), "--data-set", "data.format=xml"])
    assert wrong.startswith(f"--data {path}: ") and "xml" in wrong


# ---------------------------------------------------------------- make_public_style.py


def test_the_public_style_file_is_deterministic_and_read_as_dolly(tmp_path, mps):
    from instruct.data import load_records

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    mps.main([str(a), "-n", "300"])
    mps.main([str(b), "-n", "300"])
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert all(set(r) == {"instruction", "context", "response", "category"} for r in rows)
    examples = load_records([a])  # exactly what data=file reads
    assert len(examples) == 300
    for r, e in zip(rows, examples, strict=True):
        assert e["output"] == r["response"] and e.get("input", "") == r["context"]
        assert bool(r["context"]) == (r["category"] in mps.WITH_CONTEXT)


def test_the_public_style_mix_and_means_follow_the_published_figures(mps):
    rows = list(mps.records(mps.DOLLY_RECORDS))
    for category, count in mps.CATEGORIES.items():
        share = sum(1 for r in rows if r["category"] == category) / len(rows)
        assert share == pytest.approx(count / mps.DOLLY_RECORDS, abs=0.01), category
    words = {k: [len(r[k].split()) for r in rows] for k in ("instruction", "response")}
    prompt = [len(r["instruction"].split()) + len(r["context"].split()) for r in rows]
    target = mps.PROMPT_TOKENS * mps.WORDS_PER_TOKEN
    assert statistics.fmean(prompt) == pytest.approx(target, rel=0.05)
    response = mps.COMPLETION_TOKENS * mps.WORDS_PER_TOKEN
    assert statistics.fmean(words["response"]) == pytest.approx(response, rel=0.05)
    assert statistics.median(words["response"]) < 0.75 * response  # right-skewed, as assumed


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.usefixtures("restored_cache_env")  # bench_train sets $INSTRUCT_CACHE
@pytest.mark.parametrize("kind", ["parquet", "messages"])
def test_data_reaches_every_side_with_the_same_token_counts(tmp_path, bt, mps, kind, capsys):
    """One repeat of the tiny workload on a small real file, ours, TRL and the bare loop:
    one reply each (TRL gets prompt/completion text) and two-reply conversations (TRL gets
    our ids + completion_mask)."""
    path = write_formats(tmp_path / "data", mps)[kind]
    out = tmp_path / "bench.json"
    bt.main(["--workloads", "tiny", "--examples", "6", "--precisions", "fp32", "--repeats",
             "1", "--peak-size", "64", "--data", str(path), "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert f"[tiny] --data {path}: 6 training examples" in printed
    assert "== tiny fp32: full fine-tuning, 6 examples" in printed
    assert "DIFFER" not in printed
    raw = json.loads(out.read_text())
    tokens, supervised = raw["tiny"]["tokens"], raw["tiny"]["supervised"]
    sides = raw["tiny fp32"]
    assert set(sides) == {"ours", "trl", "bare"}
    for side, (run,) in sides.items():
        assert (run["tokens"], run["supervised"]) == (tokens, supervised), side
        assert run["steps"] == 1, side  # 6 examples, batch 8
    assert not any(sides["trl"][0]["vs_ours"].values())  # TRL's ids and labels are ours
    assert sides["ours"][0]["mean_loss"] == pytest.approx(sides["bare"][0]["mean_loss"],
                                                          rel=1e-4)  # fmt: skip
