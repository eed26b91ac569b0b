"""Reading back what an offline W&B run recorded: its ``.wandb`` file.

No public or supported reader serves, in wandb 0.31:
- ``wandb.sdk.internal.datastore`` (the Python reader) is gone since the Go core writes the
  files;
- ``wandb.Api`` reads runs from a server, and ``wandb sync`` only uploads;
- ``wandb leet inspect --json`` dumps the records, but as a terminal viewer's output, not a
  documented export: it starts the Go core for each read (0.8 s measured, against
  milliseconds here, and the tests poll a file every 0.1 s while W&B flushes it), and it
  names nested keys with ``.`` where this reader, and so every recorded result, uses ``/``.

So the file is parsed here, with W&B's own protobuf schema (``wandb.proto``, which the SDK
uses to talk to its core). ``tests/compat/test_adapters.py`` writes a real offline run and
reads it back, so a change of format fails there.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from instruct.compat import Private, missing

REQUIRES = (
    Private("wandb", "wandb.proto.wandb_internal_pb2", "Record"),
    Private("wandb", "wandb.proto.wandb_internal_pb2", "Record.DESCRIPTOR"),
)
# The fields of the records read, by message.
FIELDS = {
    "Record": ("history", "summary", "config", "exit", "run"),
    "HistoryRecord": ("item",),
    "SummaryRecord": ("update",),
    "ConfigRecord": ("update",),
    "RunRecord": ("run_id", "display_name", "run_group", "project", "config"),
    "HistoryItem": ("key", "nested_key", "value_json"),
    "SummaryItem": ("key", "nested_key", "value_json"),
    "ConfigItem": ("key", "nested_key", "value_json"),
}


def check() -> list[str]:
    """A message for each private name or record field this reader needs that is gone."""
    messages = missing(REQUIRES)
    if messages:
        return messages
    from importlib.metadata import version

    from wandb.proto import wandb_internal_pb2 as pb

    for message, names in FIELDS.items():
        kind = getattr(pb, message, None)
        fields = kind.DESCRIPTOR.fields_by_name if kind is not None else {}
        messages += [
            f"wandb {version('wandb')}: private wandb.proto.wandb_internal_pb2.{message}.{name} "
            "is gone; instruct.compat.wandb needs another way"
            for name in names
            if name not in fields
        ]
    return messages


# The .wandb file: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log style
# records in 32 KiB blocks: crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last).
HEADER = b":W&B\xe1\xbe\x00"
BLOCK = 32 * 1024
RECORD_HEADER = 7


def record_payloads(data: bytes) -> list[bytes]:
    """The records of a ``.wandb`` file's bytes, each a serialized ``Record``."""
    if not data.startswith(HEADER):
        raise ValueError("not a W&B run file (bad header)")
    payloads, pending, pos = [], b"", len(HEADER)
    while pos + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        chunk = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
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


def read_run_file(run_path: str | Path) -> dict[str, Any]:
    """History rows, summary, config and run info in the ``.wandb`` file of an offline run
    folder (or in the file ``run_path``), and whether its exit record is there (``complete``).

    Private: ``wandb.proto.wandb_internal_pb2.Record``, W&B's record schema, and the file's
    framing, parsed by hand (see :data:`HEADER`).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    run_path = Path(run_path)
    files = sorted(run_path.glob("*.wandb")) if run_path.is_dir() else [run_path]
    if not files:
        raise FileNotFoundError(f"{run_path}: no .wandb file")
    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}, "run": {}}
    out["complete"] = False
    for payload in record_payloads(files[0].read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(
                {item_key(i): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "summary":
            out["summary"].update(
                {item_key(i): json.loads(i.value_json) for i in record.summary.update}
            )
        elif kind == "config":
            out["config"].update(
                {item_key(i): json.loads(i.value_json) for i in record.config.update}
            )
        elif kind == "exit":
            out["complete"] = True
        elif kind == "run":
            r = record.run
            out["config"].update({item_key(i): json.loads(i.value_json) for i in r.config.update})
            out["run"] = {
                "id": r.run_id,
                "name": r.display_name,
                "group": r.run_group,
                "project": r.project,
            }
    return out


def item_key(item: Any) -> str:
    """A history, summary or config item's key; a nested one joined with ``/``."""
    return item.key or "/".join(item.nested_key)
