"""python -m instruct.inspect: the page shows the trainer's tokens and labels, its counts,
and a review a person saves leaves the rejected examples out of training (in a real
headless Chromium, driven by Playwright through the system's browser)."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from instruct.config import compose
from instruct.data import load_splits
from instruct.data.features import render_split, tokenize_split
from instruct.data.inspection import CONTROL, SHOWN_PAST_CUT, TRAINED, control_ids
from instruct.data.records import DataError
from instruct.data.review import example_id, excluded_ids, read_reviewed
from instruct.data.tokenize import IGNORE_INDEX
from instruct.inspect import inspect, page_of, run_tokenizer

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "apt-get install -y chromium (and pip install playwright; not `playwright install`)"
HIGHLIGHT = (0x9B, 0xE7, 0xB0)
# Scroll to the bottom frame after frame: the page draws more cards on each scroll event.
SCROLL_TO_END = """async () => {
  for (let i = 0; i < 40; i++) {
    window.scrollTo(0, document.body.scrollHeight);
    await new Promise(done => requestAnimationFrame(done));
  }
}"""  # .k.f1, the trained tokens' background in inspect_page.html


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def toy_rows(n: int, long_every: int = 0) -> list[dict]:
    """``n`` examples; every ``long_every``-th a long one (truncated at a small max_length)."""
    rows = []
    for i in range(n):
        long = long_every and i % long_every == 0
        reply = f"Reply number {i}." + (" More words." * 40 if long else "")
        rows.append({"instruction": f"Say something about item {i}.", "output": reply})
    return rows


def inspect_cfg(paths: list[Path], *extra: str):
    listed = ",".join(str(p) for p in paths)
    return compose(
        ["model=tiny", "data=file", f"data.paths=[{listed}]", "logger=none", *extra],
        config_name="inspect",
    )


def page_data(page: str) -> dict:
    raw = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(raw.group(1))


@pytest.fixture(scope="module")
def toy_page(tmp_path_factory):
    """A page of 30 examples, every 5th too long for trainer.max_length=40."""
    folder = tmp_path_factory.mktemp("inspect")
    data = write_jsonl(folder / "toy.jsonl", toy_rows(30, long_every=5))
    cfg = inspect_cfg([data], "trainer.max_length=40", "trainer.tokenized_cache=false")
    tokenizer = run_tokenizer(cfg)
    page = page_of(cfg, tokenizer)
    return cfg, tokenizer, page


def test_trained_tokens_are_the_trainers_labels(toy_page):
    cfg, tokenizer, page = toy_page
    views = page_data(page)["examples"]
    train, val = load_splits(cfg.data, cfg.seed)
    assert [v["split"] for v in views] == ["train"] * len(train) + ["validation"] * len(val)
    controls = control_ids(tokenizer)
    for name, examples in (("train", train), ("validation", val)):
        features, stats = tokenize_split(examples, cfg, tokenizer)
        mine = [v for v in views if v["split"] == name]
        kept = [v for v in mine if not v["dropped"]]
        assert len(kept) == stats.kept == len(features)
        for v, f in zip(kept, features, strict=True):
            flags = np.array([int(c) for c in v["f"]])
            n = v["kept"]
            assert v["ids"][:n] == f.input_ids.tolist()
            assert ((flags[:n] & TRAINED) > 0).tolist() == (f.labels != IGNORE_INDEX).tolist()
            assert [bool(x & CONTROL) for x in flags] == [i in controls for i in v["ids"]]
            assert v["supervised"] == f.supervised
        assert sum(v["cut"] is not None for v in mine) == stats.truncated


def test_pieces_tile_the_text_and_truncation_is_marked(toy_page):
    cfg, tokenizer, page = toy_page
    views = page_data(page)["examples"]
    train, _ = load_splits(cfg.data, cfg.seed)
    texts = [r.text for r in render_split(train, cfg, tokenizer).rendered]
    long = [v for v in views if v["n"] > 40]
    assert long and all(v["cut"] == 40 for v in long)
    assert all(v["cut"] is None for v in views if v["n"] <= 40)
    for v in views:
        assert len(v["t"]) == len(v["ids"]) == len(v["f"]) == min(v["n"], 40 + SHOWN_PAST_CUT)
        if v["split"] == "train" and not v["hidden"]:
            assert "".join(v["t"]) == texts[v["i"]]  # every character, in its token


def test_masking_report_counts(toy_page):
    cfg, tokenizer, page = toy_page
    train, _ = load_splits(cfg.data, cfg.seed)
    _, stats = tokenize_split(train, cfg, tokenizer)
    row = re.search(r"<tr><td>train</td>(.*?)</tr>", page).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[:6] == [
        str(x)
        for x in (
            stats.examples,
            stats.kept,
            stats.truncated,
            stats.dropped,
            stats.tokens,
            stats.supervised_tokens,
        )
    ]
    assert cells[6] == f"{100 * stats.supervised_tokens / stats.tokens:.1f}%"
    # every truncated example listed by file:line, linked to its file
    assert page.count('<li class="truncated"') == 6
    assert re.search(r'<a href="file://[^"]*toy\.jsonl">[^<]*toy\.jsonl:1</a>', page)
    assert page.count('<svg class="hist"') == 3 and "max_length 40" in page


def test_control_tokens_and_dropped(tmp_path):
    """A prompt longer than max_length leaves nothing to train: dropped, and said so."""
    rows = [{"instruction": "word " * 80, "output": "ok"}, *toy_rows(6)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = inspect_cfg(
        [data], "trainer.max_length=32", "data.val_fraction=0.2", "inspect.split=train"
    )
    page = page_of(cfg, run_tokenizer(cfg))
    views = page_data(page)["examples"]
    assert {v["split"] for v in views} == {"train"}
    dropped = [v for v in views if v["dropped"]]
    assert len(dropped) == 1 and dropped[0]["where"].endswith("d.jsonl:1")
    assert '<li class="dropped"' in page
    assert any("2" in v["f"] or "3" in v["f"] for v in views)  # <|im_start|> etc. marked


def test_mixture_per_source_counts(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", toy_rows(10))
    b = write_jsonl(tmp_path / "b.jsonl", toy_rows(20)[10:])
    sources = f"[{{path: {a}, label: alpha}},{{path: {b}, label: beta, weight: 2.0}}]"
    cfg = compose(
        ["model=tiny", "data=mixture", f"data.sources={sources}", "logger=none"],
        config_name="inspect",
    )
    page = page_of(cfg, run_tokenizer(cfg))
    table = re.search(r'<table id="sources">(.*?)</table>', page).group(1)
    train, val = load_splits(cfg.data, cfg.seed)
    for label in ("alpha", "beta"):
        n_train = sum(e["source"] == label for e in train)
        n_val = sum(e["source"] == label for e in val)
        assert f"<tr><td>{label}</td><td>{n_train}</td><td>{n_val}</td></tr>" in table
    assert "<td>train [alpha]</td>" in page  # the masking report per source


def test_self_instruct_verdicts_and_nearest(tmp_path, monkeypatch):
    from instruct.self_instruct.dedup import naive_dedup
    from instruct.self_instruct.provenance import data_set_folder

    monkeypatch.setenv("OPENAI_API_KEY", "unused: the data set is complete")
    rows = [
        ("Write a haiku about the autumn sea.", "Waves fold grey and cold, gulls hang still."),
        ("Write a haiku about the winter sea.", "Ice lines the harbour; the sea breathes slow."),
        ("List three prime numbers above fifty.", "53, 59 and 61."),
    ]
    tasks = [
        {"id": f"si-{k + 1:06d}", "instruction": i, "output": o} for k, (i, o) in enumerate(rows)
    ]
    over = [
        "model=tiny",
        "data=self_instruct",
        f"data.out_dir={tmp_path}",
        "data.num_instructions=3",
        "logger=none",
        "data.val_fraction=0.34",
    ]
    cfg = compose(over, config_name="inspect")
    folder = data_set_folder(cfg.data)
    folder.mkdir(parents=True)
    write_jsonl(folder / "tasks.jsonl", tasks)
    (folder / "meta.json").write_text(json.dumps({"stats": {"rejected": {"similar": 4}}}))
    page = page_of(cfg, run_tokenizer(cfg))
    si = page_data(page)["self_instruct"]
    assert set(si) == {"si-000001", "si-000002", "si-000003"}
    assert all(all(p["filters"].values()) and not p["duplicate"] for p in si.values())
    assert si["si-000002"]["nearest"] == tasks[0]["instruction"]
    seed_file = ROOT / "instruct" / "data" / "seed_tasks.jsonl"
    seeds = [json.loads(x)["instruction"] for x in seed_file.read_text().splitlines() if x.strip()]
    _, score, _ = naive_dedup([tasks[1]["instruction"]], seeds + [tasks[0]["instruction"]])[0]
    assert si["si-000002"]["rouge_l"] == pytest.approx(score)
    assert '<table id="rejected"><tr><td>similar</td><td>4</td>' in page


def test_example_ids_are_stable():
    a = {"instruction": "x", "output": "y", "where": "a.jsonl:1"}
    b = {"instruction": "x", "output": "y", "where": "b.jsonl:7", "source": "b"}
    assert example_id(a) == example_id(b) and example_id(a).startswith("h-")
    assert example_id({**a, "output": "z"}) != example_id(a)
    assert example_id({**a, "id": 12}) == "12"


def test_exclude_ids_leaves_them_out(toy_data, tmp_path, caplog):
    base = compose(["data=file", f"data.paths=[{toy_data}]"]).data
    train, val = load_splits(base, 0)
    gone = [example_id(train[0]), example_id(val[0])]
    reviewed = tmp_path / "reviewed.json"
    reviewed.write_text(json.dumps({"format": "instruct-review", "accepted": [], "rejected": gone}))
    for value in (f"[{','.join(gone)}]", str(reviewed)):
        cfg = compose(["data=file", f"data.paths=[{toy_data}]", f"data.exclude_ids={value}"]).data
        with caplog.at_level(logging.INFO, logger="instruct.data.review"):
            t, v = load_splits(cfg, 0)
        assert t == train[1:] and v == val[1:]
        assert "data.exclude_ids: 2 examples excluded (1 / 1) of 2 IDs listed" in caplog.text
        caplog.clear()


@pytest.mark.parametrize(
    "text,problem",
    [
        ("{not json", "not a JSON file"),
        ('{"rejected": ["a"]}', "expected a reviewed file"),
        ('{"format": "instruct-review", "rejected": "a"}', "must be a list"),
    ],
)
def test_malformed_reviewed_file_is_named(tmp_path, text, problem):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + problem):
        read_reviewed(path)
    with pytest.raises(DataError, match="does not exist"):
        excluded_ids(str(tmp_path / "missing.json"))
    assert excluded_ids(None) is None


@pytest.mark.slow
def test_command_writes_the_page_in_the_run_folder(toy_data, tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "instruct.inspect",
            "model=tiny",
            "data=file",
            f"data.paths=[{toy_data}]",
            "template=alpaca",
            "inspect.examples=5",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    page = (run_dir / "inspect.html").read_text(encoding="utf-8")
    assert len(page_data(page)["examples"]) == 5 and "template alpaca" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched: opens offline
    assert (run_dir / ".hydra" / "config.yaml").is_file()


# --- a real browser -------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip(f"no Chromium: {INSTALL}")
    playwright = pytest.importorskip("playwright.sync_api", reason=f"no Playwright: {INSTALL}")
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


def open_page(browser, path: Path, **kwargs):
    page = browser.new_page(
        viewport={"width": 1200, "height": 900}, accept_downloads=True, **kwargs
    )
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.resolve().as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    return page, errors


def highlight_pixels(png: bytes) -> int:
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    close = np.abs(image - np.array(HIGHLIGHT)).sum(axis=2) <= 6
    return int(close.sum())


@pytest.mark.slow
def test_browser_shows_highlighted_tokens(browser, toy_page, tmp_path):
    _, _, html = toy_page
    path = tmp_path / "inspect.html"
    path.write_text(html, encoding="utf-8")
    page, errors = open_page(browser, path)
    card = page.locator(".card").first
    card.scroll_into_view_if_needed()
    shot = card.screenshot(path=str(tmp_path / "card.png"))
    assert highlight_pixels(shot) > 500  # the trained reply's background
    assert page.locator(".card .k.f1").count() > 0 and page.locator(".cutmark").count() >= 1
    untrained = page.locator(".card").first.locator(".k.f0").first.screenshot()
    assert highlight_pixels(untrained) == 0
    assert errors == []
    page.close()


@pytest.mark.slow
def test_browser_review_round_trip(browser, toy_data, tmp_path):
    cfg = inspect_cfg([toy_data], f"inspect.out={tmp_path / 'inspect.html'}")
    path = inspect(cfg)
    page, errors = open_page(browser, path)
    ids = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")
    rejected, accepted = ids[1:4], ids[:1]
    for i in rejected:
        page.locator(f'.card[data-id="{i}"] button.reject').click()
    page.locator(f'.card[data-id="{accepted[0]}"] button.accept').click()
    assert page.locator(".card.rejected").count() == 3
    with page.expect_download() as download:
        page.locator("#save").click()
    saved = tmp_path / "reviewed.json"
    download.value.save_as(saved)
    review = json.loads(saved.read_text())
    assert sorted(review["rejected"]) == sorted(rejected) and review["accepted"] == accepted
    train, val = load_splits(
        compose(["data=file", f"data.paths=[{toy_data}]", f"data.exclude_ids={saved}"]).data, 0
    )
    left = {example_id(e) for e in train + val}
    assert not left & set(rejected) and set(accepted) <= left
    assert len(train) + len(val) == len(ids) - 3
    assert errors == []
    page.close()


@pytest.mark.slow
def test_browser_holds_ten_thousand_examples(browser, tmp_path):
    data = write_jsonl(tmp_path / "big.jsonl", toy_rows(10_000))
    cfg = inspect_cfg(
        [data],
        "trainer.tokenized_cache=false",
        "inspect.examples=null",
        "inspect.split=train",
        "data.val_fraction=0.01",
        f"inspect.out={tmp_path / 'big.html'}",
    )
    path = inspect(cfg)
    start = time.monotonic()
    page, errors = open_page(browser, path)
    first = time.monotonic() - start
    total = page.evaluate("EX.length")
    assert total == 9900
    assert 0 < page.locator(".card").count() < 500  # drawn as they scroll, not all at once
    assert first < 60, f"the page took {first:.0f} s to become interactive"
    last = f"#ex-{total - 1}"
    deadline = time.monotonic() + 240
    while page.locator(last).count() == 0 and time.monotonic() < deadline:
        page.evaluate(SCROLL_TO_END)
    assert page.locator(last).count() == 1, "scrolling to the end never drew the last example"
    page.locator(f"{last} button.reject").click()
    assert page.locator("#counts").inner_text().startswith("0 accepted, 1 rejected")
    assert errors == []
    page.close()
