"""``python -m instruct.report <folder> [--metric M]``: a sweep (or one run) ranked by one
yardstick, with intervals.

``<folder>`` is a Hydra multirun folder (``outputs/multirun/<date>/<time>/``, one numbered
subfolder per job) or a single run folder. Jobs are ranked by ``--metric`` (``report.metric``):
by default the eval suites' headline score (``ifeval/prompt_strict`` with ``eval=quick``) when
the jobs were evaluated, else the best validation loss, with a warning whenever the jobs'
validation tokens differ (another template or data set: their losses measure different
things). Each job is compared with the best one by a paired bootstrap on the prompts both
answered: ``tied with best`` where the interval of the difference contains 0, with the number
of prompts that would separate them. The base model is a row of its own (one per template).

Written into the folder: ``report.md`` and ``report.csv`` (one row per job, unfinished ones
after the ranked ones with their status), ``val_loss.png`` (every job's validation curve),
``best_<metric>_by_<key>.png`` for every swept key and ``<metric>.png`` (each job's score with
its interval). A single run folder gets ``loss.png`` too.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from instruct.reporting import report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m instruct.report", description=__doc__)
    parser.add_argument("folder", type=Path, help="a Hydra multirun folder or one run folder")
    parser.add_argument(
        "--metric",
        default="auto",
        help="the ranking column (report.metric): auto (the eval headline score when the jobs "
        "were evaluated, else val_loss), val_loss, or <suite>/<figure> such as "
        "ifeval/inst_loose",
    )
    args = parser.parse_args(argv)
    try:
        written = report(args.folder, args.metric)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
