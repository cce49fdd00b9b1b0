"""Read a W&B offline run's `run-<id>.wandb` file: wandb's protobuf `Record`s in LevelDB-log framing.

The file is the 7-byte header `:W&B` + magic + version, then 32 KiB blocks of chunks (CRC32C,
little-endian length, type FULL/FIRST/MIDDLE/LAST, payload); a chunk never spans blocks and a
block tail too short for a chunk header is padding. The payloads are parsed with wandb's own
`wandb.proto.wandb_internal_pb2.Record`, as `wandb sync` reads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from wandb.proto.wandb_internal_pb2 import Record

BLOCK, CHUNK_HEADER, FILE_HEADER = 32 * 1024, 7, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    offset, pending = FILE_HEADER, b""
    while offset + CHUNK_HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < CHUNK_HEADER:  # block padding
            offset += room
            continue
        length, kind = int.from_bytes(data[offset + 4 : offset + 6], "little"), data[offset + 6]
        payload = data[offset + CHUNK_HEADER : offset + CHUNK_HEADER + length]
        offset += CHUNK_HEADER + length
        if kind == 0:  # zero-filled tail of the last block
            continue
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(pending)
            yield record


def items(update) -> dict[str, str]:
    """{key: JSON value} of a history/summary/config update (nested keys joined with '/')."""
    return {item.key or "/".join(item.nested_key): item.value_json for item in update}
