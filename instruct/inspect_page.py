"""The ``inspect.html`` page: one self-contained file (inline CSS, JS and SVG, no network).

The summary (the masking report, the histograms, per-source counts) is written here as HTML;
the examples go into the page as JSON, and its script (``inspect_page.html``, shipped with
the package) draws them as they scroll into view, so 10,000 of them open at once.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from instruct.data.inspection import Lengths, histogram

TEMPLATE = "inspect_page.html"
HIST_W, HIST_H, PAD = 320, 150, 26  # one histogram's size in pixels, and its margin


@dataclass
class SplitReport:
    """One split: the trainer's counts, every example's lengths, its examples' where/ID."""

    name: str
    stats: Any  # PrepareStats (SplitStats when something was dropped)
    lengths: Lengths
    where: list[str]
    ids: list[str]
    sources: dict[str, Any] = field(default_factory=dict)  # label -> PrepareStats
    described: str = ""  # the training log's line for it (instruct.data.features.describe)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def file_link(where: str) -> str:
    """``where`` (``file.jsonl:12``, ``data.parquet[3]``) linked to its file when it is one."""
    path = re.sub(r"(:\d+|\[[^\]]*\])+$", "", where)
    if path and Path(path).is_file():
        return f'<a href="{esc(Path(path).resolve().as_uri())}">{esc(where)}</a>'
    return esc(where)


def share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def stats_row(name: str, s: Any) -> str:
    cells = [
        name,
        s.examples,
        s.kept,
        s.truncated,
        s.dropped,
        s.tokens,
        s.supervised_tokens,
        share(s.supervised_tokens, s.tokens),
    ]
    return "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"


def masking_report(splits: Sequence[SplitReport], max_length: int) -> str:
    """The table of kept, truncated and dropped examples and trained-token share (the
    trainer's own counts), then every truncated or dropped example by file:line."""
    head = [
        "split",
        "examples",
        "kept",
        "truncated",
        "dropped",
        "tokens",
        "trained tokens",
        "trained share",
    ]
    rows = []
    for s in splits:
        rows.append(stats_row(s.name, s.stats))
        rows += [stats_row(f"{s.name} [{k}]", v) for k, v in s.sources.items()]
    table = (
        '<table id="masking"><tr>'
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )
    lines = "".join(f"<p class=log>{esc(s.described)}</p>" for s in splits if s.described)
    return table + lines + problem_list(splits, max_length)


def problem_list(splits: Sequence[SplitReport], max_length: int) -> str:
    """Every example training truncates or drops, by file:line, linked to its card."""
    items = []
    for s in splits:
        for k, (n, dropped) in enumerate(zip(s.lengths.total, s.lengths.dropped, strict=True)):
            if n <= max_length and not dropped:
                continue
            what = "dropped" if dropped else "truncated"
            items.append(
                f'<li class="{what}" data-id="{esc(s.ids[k])}"><b>{what}</b> '
                f'{file_link(s.where[k])} ({n} tokens) <a href="#" class="goto" '
                f'data-split="{esc(s.name)}" data-index="{k}">show</a></li>'
            )
    if not items:
        return f"<p>No example is longer than trainer.max_length={max_length}.</p>"
    return f'<details id="problems"><summary>{len(items)} truncated or dropped</summary><ul>' + (
        "".join(items) + "</ul></details>"
    )


def histogram_svg(title: str, values: Sequence[int], max_length: int, colour: str) -> str:
    """An inline SVG histogram of ``values`` with a red line at ``max_length``."""
    h = histogram(values, max_length)
    top, edges = max(h["counts"] + [1]), h["edges"]
    scale_x = (HIST_W - 2 * PAD) / edges[-1]
    bars = []
    for count, left, right in zip(h["counts"], edges[:-1], edges[1:], strict=True):
        height = (HIST_H - 2 * PAD) * count / top
        bars.append(
            f'<rect x="{PAD + left * scale_x:.1f}" y="{HIST_H - PAD - height:.1f}" '
            f'width="{max((right - left) * scale_x - 1, 1):.1f}" height="{height:.1f}" '
            f'fill="{colour}"><title>{int(left)}-{int(right)}: {count}</title></rect>'
        )
    x = PAD + max_length * scale_x
    return (
        f'<svg class="hist" width="{HIST_W}" height="{HIST_H}" role="img" '
        f'aria-label="{esc(title)}"><text x="{PAD}" y="14">{esc(title)} '
        f"(n={h['n']}, {h['over']} over max_length)</text>{''.join(bars)}"
        f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD - 6}" y2="{HIST_H - PAD}" stroke="#d33" '
        f'stroke-dasharray="4 2"/><text x="{x - 3:.1f}" y="{PAD + 4}" fill="#d33" '
        f'text-anchor="end">max_length {max_length}</text>'
        f'<text x="{PAD}" y="{HIST_H - 8}">0</text>'
        f'<text x="{HIST_W - PAD}" y="{HIST_H - 8}" text-anchor="end">{int(edges[-1])}</text>'
        "</svg>"
    )


def histograms(splits: Sequence[SplitReport], max_length: int) -> str:
    """Prompt (untrained), reply (trained) and total token lengths, every split together."""
    lengths = [s.lengths for s in splits]
    kinds = [
        ("prompt tokens", "prompt", "#8aa4e6"),
        ("reply tokens", "reply", "#5cc489"),
        ("total tokens", "total", "#b08ad8"),
    ]
    return "".join(
        histogram_svg(title, [v for x in lengths for v in getattr(x, key)], max_length, colour)
        for title, key, colour in kinds
    )


def source_counts(splits: Sequence[SplitReport], labels: Mapping[str, list[str | None]]) -> str:
    """Examples per mixture source and split (``labels``: each split's sources in order)."""
    counts: dict[str, dict[str, int]] = {}
    for split, sources in labels.items():
        for label in sources:
            row = counts.setdefault(str(label), {})
            row[split] = row.get(split, 0) + 1
    if list(counts) in ([], ["None"]):
        return ""
    names = [s.name for s in splits]
    head = "".join(f"<th>{esc(n)}</th>" for n in ["source", *names])
    body = "".join(
        f"<tr><td>{esc(label)}</td>" + "".join(f"<td>{row.get(n, 0)}</td>" for n in names) + "</tr>"
        for label, row in counts.items()
    )
    return f'<h2>Sources</h2><table id="sources"><tr>{head}</tr>{body}</table>'


def rejected_table(rejected: Mapping[str, int]) -> str:
    """Self-Instruct: the candidates each filter rejected while the data set was made."""
    if not rejected:
        return ""
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in rejected.items())
    return f'<h2>Self-Instruct rejections</h2><table id="rejected">{rows}</table>'


def render_page(title: str, summary: str, data: Mapping[str, Any]) -> str:
    """The page: the template with ``title``, the ``summary`` HTML and ``data`` (the
    examples) as JSON inside a script element, every ``<`` escaped."""
    template = resources.files("instruct").joinpath(TEMPLATE).read_text(encoding="utf-8")
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    payload = payload.replace("<", "\\u003c")  # no "</script>" or "<!--" can end it early
    parts = {"TITLE": esc(title), "SUMMARY": summary, "DATA": payload}
    return re.sub(r"\{\{(TITLE|SUMMARY|DATA)\}\}", lambda m: parts[m.group(1)], template)
