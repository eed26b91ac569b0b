"""The one table ``bench/gpu.sh`` prints at its end, and the bf16 peak probe it starts with.

    python bench/gpu_table.py probe WORK     # the card's bf16 matmul peak -> WORK/peak.json
    python bench/gpu_table.py table WORK     # the table, from what gpu.sh left in WORK

``WORK`` holds what gpu.sh's steps wrote: ``peak.json`` (this probe), ``steps.tsv`` (one
line per step: name, exit code, seconds), ``gpu-tests.xml`` (pytest's JUnit report of the
tests marked ``gpu``) and ``bench.json`` (``bench_train.py --json``). A step that failed or
never wrote its file shows as such in the table; nothing is left out silently.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train as bt  # noqa: E402  (bench/ is a folder of scripts, not a package)

SIDE_NAMES = {"ours": "ours", "trl": "TRL", "liger": "TRL+Liger", "bare": "bare"}
COLUMNS = (
    ("workload", "<18"),
    ("side", "<10"),
    ("train s", ">8"),
    ("sup tok/s", ">10"),
    ("MFU", ">6"),
    ("peak GiB", ">9"),
    ("mean loss", ">9"),
    ("ours/side", ">9"),
)


def probe(work: Path, device: str = "cuda", n: int | None = None) -> dict[str, Any]:
    """Time a bf16 matmul on ``device`` (:func:`bench_train.matmul_peak_gflops`) and write
    it, with the device's name, to ``work/peak.json``."""
    import torch

    result = {
        "device": bt.device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "size": bt.PEAK_SIZE[device] if n is None else n,
        "bf16_gflops": bt.matmul_peak_gflops("bf16", n=n, device=device),
    }
    (work / "peak.json").write_text(json.dumps(result))
    return result


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_tests(path: Path) -> dict[str, Any] | None:
    """Counts and skip reasons from pytest's JUnit XML, or None when there is none."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases = root.iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    reasons: set[str] = set()
    for case in cases:
        if case.find("skipped") is not None:
            counts["skipped"] += 1
            reasons.add(case.find("skipped").get("message", ""))
        elif case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "skip_reasons": sorted(r for r in reasons if r)}


def read_steps(path: Path) -> dict[str, tuple[int, float]]:
    """``steps.tsv``: each step's exit code and seconds."""
    steps = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, code, seconds = line.split("\t")
            steps[name] = (int(code), float(seconds))
    return steps


def bench_rows(raw: dict[str, Any], peak_gflops: float | None) -> list[dict[str, Any]]:
    """One row per (workload, precision, side) of ``bench_train.py --json``: the medians
    bench_train prints, MFU against ``peak_gflops``, and ours' speed over each side's."""
    device = raw.get("device", "cpu")
    rows = []
    for key, sides in raw.items():
        name, _, precision = key.partition(" ")
        if name not in bt.WORKLOADS or precision not in bt.PRECISIONS:
            continue
        info, workload = raw[name], bt.WORKLOADS[name]
        flops = bt.model_flops(info["dims"], workload.lora, info["tokens"], info["supervised"])
        peak = peak_gflops or raw["peak_gflops"][precision]
        summary = {s: bt.summarise(runs, flops, peak, device) for s, runs in sides.items()}
        for side, s in summary.items():
            ours = summary.get("ours")
            ratio = ours["sup_per_s"] / s["sup_per_s"] if ours and side != "ours" else None
            rows.append({"workload": key, "side": side, **s, "ours_over": ratio})
    return rows


def best_peak(peak: dict[str, Any] | None, raw: dict[str, Any] | None) -> float | None:
    """The highest bf16 matmul peak measured in the run, GFLOP/s (a busy card only lowers a
    measurement, and a peak measured low would inflate every MFU)."""
    found = [peak["bf16_gflops"]] if peak else []
    if raw:
        found.append(raw.get("peak_gflops", {}).get("bf16"))
        found += [v for k, v in raw.get("peak_gflops_by_group", {}).items() if "bf16" in k]
        found.append(raw.get("peak_gflops_after", {}).get("bf16"))
    found = [v for v in found if v]
    return max(found) if found else None


def collect(work: Path) -> dict[str, Any]:
    """Everything the table shows, from the files gpu.sh's steps left in ``work``."""
    peak, raw = read_json(work / "peak.json"), read_json(work / "bench.json")
    best = best_peak(peak, raw)
    notes = list(raw.get("notes", [])) if raw else []
    rows = bench_rows(raw, best) if raw else []
    return {
        "device": (peak or {}).get("device") or (raw or {}).get("device_name", "unknown"),
        "torch": (peak or {}).get("torch", "?"),
        "cuda": (peak or {}).get("cuda", "?"),
        "peak_gflops": best,
        "tests": read_tests(work / "gpu-tests.xml"),
        "steps": read_steps(work / "steps.tsv"),
        "rows": rows,
        "notes": notes,
    }


def cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def row_cells(r: dict[str, Any]) -> list[str]:
    return [
        r["workload"],
        SIDE_NAMES.get(r["side"], r["side"]),
        cell(r["train_s"], ".2f"),
        cell(r["sup_per_s"], ",.0f"),
        cell(r["mfu"], ".1%"),
        cell(r["peak_gib"], ".2f"),
        cell(r["mean_loss"], ".4f"),
        "-" if r["ours_over"] is None else f"{r['ours_over']:.2f}x",
    ]


def step_line(summary: dict[str, Any]) -> str:
    """``tests: ...; bench: ...`` with each step's outcome and time."""
    parts = []
    for name, (code, seconds) in summary["steps"].items():
        outcome = {0: "ok", 124: "TIMED OUT"}.get(code, f"FAILED (exit {code})")
        parts.append(f"{name} {outcome} {seconds:.0f} s")
    return "steps: " + ("; ".join(parts) if parts else "none recorded")


def format_table(summary: dict[str, Any]) -> str:
    """The table, as text: a title line, the steps, the gpu tests, one row per side."""
    peak = summary["peak_gflops"]
    peak_text = "not measured" if peak is None else f"{peak / 1e3:.1f} TFLOP/s"
    lines = [
        f"== bench/gpu.sh on {summary['device']} (torch {summary['torch']}, CUDA "
        f"{summary['cuda']}); bf16 matmul peak {peak_text} ==",
        step_line(summary),
    ]
    tests = summary["tests"]
    if tests is None:
        lines.append("gpu tests: no report (the step failed before pytest wrote one)")
    else:
        lines.append(
            f"gpu tests: {tests['passed']} passed, {tests['failed']} failed, "
            f"{tests['skipped']} skipped"
            + "".join(f"\n  skipped: {reason}" for reason in tests["skip_reasons"])
        )
    header = [format(name, spec) for name, spec in COLUMNS]
    lines.append("  ".join(header))
    if not summary["rows"]:
        lines.append("(no benchmark figures: see the bench step's log)")
    for r in summary["rows"]:
        cells = zip(row_cells(r), COLUMNS, strict=True)
        lines.append("  ".join(format(c, spec) for c, (_, spec) in cells))
    lines += [
        "(train s: training alone, after torch.cuda.synchronize; sup tok/s: supervised tokens a "
        "second; MFU: model FLOPs (bench_train.py's formula) a second over the bf16 peak;",
        " peak GiB: torch.cuda.max_memory_allocated of the side's process; ours/side: ours' "
        "supervised tokens/s over that side's)",
    ]
    lines += [f"note: {note}" for note in summary["notes"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 2 or argv[0] not in ("probe", "table"):
        sys.exit(__doc__)
    work = Path(argv[1])
    if argv[0] == "probe":
        found = probe(work)
        print(f"bf16 matmul peak of {found['device']}: {found['bf16_gflops'] / 1e3:.1f} TFLOP/s")
    else:
        print(format_table(collect(work)))


if __name__ == "__main__":
    main()
