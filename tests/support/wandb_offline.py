"""Read back what an offline W&B run logged: the history rows of its run-<id>.wandb file.

wandb (0.31) has no reader of its own for these files, so this follows their format: a 7-byte header
(":W&B", magic 0xBEE1, version 0) and then LevelDB log records (4-byte checksum, 2-byte length, 1-byte
type: full, first, middle, last) in 32 KiB blocks, each record a serialized `wandb_internal_pb2.Record`; a
history record holds (key, JSON value) items of one logged step.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:              # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        body = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            out.append(body)
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            out.append(pending + body)
        elif kind == 0 and length == 0:   # zero padding at the end
            break
    return out


def history(path: Path) -> list[dict]:
    """The logged rows, in order: {key: value} with `_step` and wandb's own `_runtime`/`_timestamp`."""
    from wandb.proto import wandb_internal_pb2 as pb
    rows = []
    for raw in records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows
