"""Metrics: W&B (offline by default) plus a local ``metrics.jsonl`` beside every run.

:func:`read_offline_run` reads back what an offline W&B run recorded, for tests and reports
that have no W&B account.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from instruct.compat.wandb import read_run_file
from instruct.config import LoggerBackend, LoggerMode

log = logging.getLogger(__name__)


TABLE = "table:"  # marks a table's rows among the records rewind() sends again


def wandb_holds_through(run: Any, run_dir: Path) -> int:
    """The last step the W&B run ``run`` (just resumed) already holds; -1 for none.

    Online, the server says (``starting_step``: the step after its last). Offline, the
    earlier offline files of the same run id under ``run_dir/wandb`` are read.
    """
    if not run.offline:
        return int(getattr(run, "starting_step", 0) or 0) - 1
    latest = -1
    current = Path(run.dir).parent  # .../wandb/offline-run-<time>-<id>/files
    for folder in (run_dir / "wandb").glob(f"offline-run-*-{run.id}"):
        if folder == current:
            continue
        for run_file in folder.glob("run-*.wandb"):
            try:
                history = read_run_file(run_file)["history"]
            except (OSError, ValueError):
                continue
            steps = [int(row["_step"]) for row in history if "_step" in row]
            latest = max([latest, *steps])
    return latest


class Tracker:
    """Logs to W&B (when enabled) and appends every record to ``<run_dir>/metrics.jsonl``.

    ``run_id`` is the W&B run's id (None without W&B), kept so a resumed run continues it.
    """

    def __init__(self, run_dir: Path | None, wandb_run: Any | None) -> None:
        self.run = wandb_run
        self.run_id: str | None = wandb_run.id if wandb_run is not None else None
        if run_dir is None:  # silent: a process that is not the one writer
            self.metrics_path, self._file = None, open(os.devnull, "w", encoding="utf-8")
        else:
            self.metrics_path = run_dir / "metrics.jsonl"
            self._file = self.metrics_path.open("a", encoding="utf-8")
        self.sent_through = -1  # W&B already holds the steps up to here (see rewind)

    @classmethod
    def silent(cls) -> Tracker:
        """A tracker that records nothing (every process of a multi-process run but one)."""
        return cls(None, None)

    def rewind(self, step: int) -> None:
        """Go on from ``step`` after a resume from a checkpoint taken there.

        A killed run may have logged steps after its last checkpoint: those lines are dropped
        from the local ``.jsonl`` files, as the resumed run logs them again (with the same
        values: the resume is exact). W&B may hold more or fewer steps than were logged: its
        service buffers records, and a SIGKILL can lose them. Steps up to ``step`` that W&B
        lacks are sent again from the local files, steps it holds are not sent twice, so
        the run's history has every step once.
        """
        self._file.close()
        records: dict[int, dict[str, Any]] = {}
        for path in sorted(self.metrics_path.parent.glob("*.jsonl")):
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    at = int(record.pop("step"))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a line cut off by the kill
                if at <= step:
                    kept.append(line + "\n")
                    if path == self.metrics_path:
                        records.setdefault(at, {}).update(record)
                    else:  # a table: one line per row
                        table = records.setdefault(at, {}).setdefault(TABLE + path.stem, [])
                        table.append(record)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(path)
        self._file = self.metrics_path.open("a", encoding="utf-8")
        if self.run is None:
            return
        import wandb

        self.sent_through = wandb_holds_through(self.run, self.metrics_path.parent)
        for at in sorted(k for k in records if k > self.sent_through):
            values = {}
            for key, value in records[at].items():
                if key.startswith(TABLE):
                    columns = list(value[0])
                    rows = [[row.get(c) for c in columns] for row in value]
                    values[key.removeprefix(TABLE)] = wandb.Table(columns=columns, data=rows)
                else:
                    values[key] = value
            self.run.log(values, step=at)
        if records:
            self.sent_through = max(self.sent_through, max(records))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self.run is not None and step > self.sent_through:
            self.run.log(metrics, step=step)

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table of rows: a W&B Table, and ``<key>.jsonl`` lines beside the metrics."""
        if self.metrics_path is None:
            return
        path = self.metrics_path.with_name(key.replace("/", "_") + ".jsonl")
        with path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(
                    json.dumps(
                        {"step": step, **dict(zip(columns, row, strict=True))}, ensure_ascii=False
                    )
                    + "\n"
                )
        if self.run is not None and step > self.sent_through:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def where(self) -> str | None:
        """Where the W&B run is: its URL online, its folder offline (to ``wandb sync``)."""
        run = self.run
        if run is None:
            return None
        offline = getattr(run, "offline", None)
        if offline is None:
            offline = getattr(getattr(run, "settings", None), "mode", "") == "offline"
        if offline:
            folder = Path(run.dir).parent  # offline-run-<time>-<id>
            return f"{folder} (offline; upload with: wandb sync {folder})"
        return run.url

    def finish(self, exit_code: int = 0) -> None:
        self._file.close()
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def start_tracking(
    cfg: Any,
    run_dir: Path,
    config: dict[str, Any],
    job_type: str = "train",
    run_id: str | None = None,
) -> Tracker:
    """Open the W&B run inside ``run_dir`` (``<run_dir>/wandb``) unless logging is off.

    ``run_id`` continues that W&B run (``resume="allow"``), for a resumed training run. In
    online mode, a server that cannot be reached or that refuses the run (no network, no or a
    wrong API key) costs a warning, not the run: it is logged offline in the same folder, to
    upload later with ``wandb sync``. The API key comes from the environment (or
    ``wandb login``); none is passed or written here.
    """
    if cfg.backend == LoggerBackend.none or cfg.mode == LoggerMode.disabled:
        return Tracker(run_dir, None)
    import wandb

    kwargs: dict[str, Any] = {
        "project": cfg.project,
        "entity": cfg.entity,
        "name": cfg.name,
        "group": cfg.group,
        "tags": list(cfg.tags),
        "dir": str(run_dir),
        "config": with_overrides(config),
        "job_type": job_type,
    }
    if run_id is not None:
        kwargs.update(id=run_id, resume="allow")
    if cfg.mode == LoggerMode.offline:
        return Tracker(run_dir, wandb.init(mode="offline", **kwargs))
    return Tracker(run_dir, init_online(kwargs, cfg.init_timeout))


def with_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the job's overrides (``logger.overrides``) moved to a top-level
    ``overrides`` dict: in the W&B UI, ``overrides.lora.rank``, ``overrides.template``, ...
    are exactly the keys set on the command line (a sweep's varied ones among them), ready
    for grouping and parallel coordinates."""
    logger = config.get("logger")
    if not isinstance(logger, dict) or not logger.get("overrides"):
        return config
    rest = {k: v for k, v in logger.items() if k != "overrides"}
    return {"overrides": logger["overrides"], **config, "logger": rest}


def init_online(kwargs: dict[str, Any], timeout: float) -> Any:
    """``wandb.init(mode="online", **kwargs)``; an offline run, with a warning, when the W&B
    server does not answer or the online start fails within ``timeout`` seconds."""
    import wandb
    from wandb.sdk import wandb_setup

    settings = wandb_setup.singleton().settings  # WANDB_BASE_URL, `wandb login --host`, ...
    reason = None
    if not (settings.http_proxy or settings.https_proxy):  # W&B's own proxy: cannot probe
        reason = silent_server(settings.base_url, min(timeout, 10))
    if reason is None:
        try:
            return wandb.init(
                mode="online", settings=wandb.Settings(init_timeout=timeout), **kwargs
            )
        except Exception as e:  # CommError, AuthenticationError, UsageError (no key), ...
            reason = f"{type(e).__name__}: {e}"
            # The offline run starts on a fresh W&B service: after a failed online start, an
            # offline one could time out too (wandb/wandb#9865).
            wandb.teardown()
    log.warning(
        "W&B online logging is unavailable (%s); logging offline in %s/wandb instead. "
        "Upload it later with: wandb sync %s/wandb/offline-run-*",
        reason,
        kwargs["dir"],
        kwargs["dir"],
    )
    # Offline for this process's W&B as a whole, not only this run: its telemetry would
    # otherwise try the server again at exit, waiting on a silent one.
    # (measured: docs/performance.md, "Measurements behind design choices")
    wandb.setup(wandb.Settings(mode="offline"))
    return wandb.init(mode="offline", **kwargs)


def silent_server(url: str, timeout: float) -> str | None:
    """Why ``url`` gives no HTTP answer within ``timeout`` seconds; None when it answers.

    Asked first because ``wandb.init`` would retry a refused or silent server until its
    ``init_timeout``, and W&B's telemetry would wait on it again at exit
    (measured: docs/performance.md, "Measurements behind design choices").
    Any HTTP status is an answer, and so is a TLS error (a private CA that only W&B is told
    of): ``wandb.init`` then says what is wrong. Proxies in the environment are used.
    """
    try:
        urlopen(Request(url, method="HEAD"), timeout=timeout).close()
    except HTTPError:
        return None
    except URLError as e:
        if isinstance(e.reason, ssl.SSLError):
            return None
        return f"no answer from {url}: {e.reason}"
    except OSError as e:  # a timeout once connected
        return f"no answer from {url}: {e}"
    return None


def read_offline_run(run_path: str | Path, wait_seconds: float = 0.0) -> dict[str, Any]:
    """History rows, summary, config and run info recorded in an offline W&B run folder.

    ``complete`` says whether the run's exit record is in the file. W&B's writer is another
    process and ``run.finish()`` can return before it has flushed everything, so a reader in
    the same process may wait up to ``wait_seconds`` for the exit record.
    """
    deadline = time.monotonic() + wait_seconds
    while True:
        out = read_run_file(run_path)
        if out["complete"] or time.monotonic() >= deadline:
            return out
        time.sleep(0.1)
