"""Metrics: W&B (offline by default) plus a local ``metrics.jsonl`` beside every run.

:func:`read_offline_run` reads back what an offline W&B run recorded, for tests and reports
that have no W&B account.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any


class Tracker:
    """Logs to W&B (when enabled) and appends every record to ``<run_dir>/metrics.jsonl``."""

    def __init__(self, run_dir: Path, wandb_run: Any | None) -> None:
        self.run = wandb_run
        self.metrics_path = run_dir / "metrics.jsonl"
        self._file = self.metrics_path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table of rows: a W&B Table, and ``<key>.jsonl`` lines beside the metrics."""
        path = self.metrics_path.with_name(key.replace("/", "_") + ".jsonl")
        with path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(
                    json.dumps(
                        {"step": step, **dict(zip(columns, row, strict=True))}, ensure_ascii=False
                    )
                    + "\n"
                )
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        self._file.close()
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def start_tracking(
    cfg: Any, run_dir: Path, config: dict[str, Any], job_type: str = "train"
) -> Tracker:
    """Open the W&B run inside ``run_dir`` (``<run_dir>/wandb``) unless logging is off."""
    if cfg.backend == "none" or cfg.mode == "disabled":
        return Tracker(run_dir, None)
    if cfg.backend != "wandb":
        raise ValueError(f"logger.backend: expected wandb or none, got {cfg.backend!r}")
    if cfg.mode not in ("online", "offline"):
        raise ValueError(f"logger.mode: expected online, offline or disabled, got {cfg.mode!r}")
    import wandb

    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name,
        group=cfg.group,
        tags=list(cfg.tags),
        dir=str(run_dir),
        mode=cfg.mode,
        config=config,
        job_type=job_type,
    )
    return Tracker(run_dir, run)


# The .wandb file: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log style
# records in 32 KiB blocks: crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last).
_HEADER = b":W&B\xe1\xbe\x00"
_BLOCK = 32 * 1024
_RECORD_HEADER = 7


def _record_payloads(data: bytes) -> list[bytes]:
    if not data.startswith(_HEADER):
        raise ValueError("not a W&B run file (bad header)")
    payloads, pending, pos = [], b"", len(_HEADER)
    while pos + _RECORD_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _RECORD_HEADER])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        chunk = data[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        pos += _RECORD_HEADER + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
            pending = b""
    return payloads


def read_offline_run(run_path: str | Path, wait_seconds: float = 0.0) -> dict[str, Any]:
    """History rows, summary, config and run info recorded in an offline W&B run folder.

    ``complete`` says whether the run's exit record is in the file. W&B's writer is another
    process and ``run.finish()`` can return before it has flushed everything, so a reader in
    the same process may wait up to ``wait_seconds`` for the exit record.
    """
    deadline = time.monotonic() + wait_seconds
    while True:
        out = _read_offline_run(run_path)
        if out["complete"] or time.monotonic() >= deadline:
            return out
        time.sleep(0.1)


def _read_offline_run(run_path: str | Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    run_path = Path(run_path)
    files = sorted(run_path.glob("*.wandb")) if run_path.is_dir() else [run_path]
    if not files:
        raise FileNotFoundError(f"{run_path}: no .wandb file")
    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}, "run": {}}
    out["complete"] = False
    for payload in _record_payloads(files[0].read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update(
                {_key(i): json.loads(i.value_json) for i in record.summary.update}
            )
        elif kind == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "exit":
            out["complete"] = True
        elif kind == "run":
            r = record.run
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.config.update})
            out["run"] = {
                "id": r.run_id,
                "name": r.display_name,
                "group": r.run_group,
                "project": r.project,
            }
    return out


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)
