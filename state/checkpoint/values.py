"""How the saver turns LangGraph's checkpoints and pending writes into stored bytes.

Both are stored once per step, so what each costs adds up with the thread: a
thousand-message conversation keeps a thousand writes and a checkpoint record
per step. Two savings, invisible to the stores (they keep the bytes opaque):

- a checkpoint record leaves out `channel_versions`: every store keeps them
  beside it (`StoredCheckpoint.channel_versions`, which queries and pruning
  need as data), and they come back from there on read; a record stored with
  them (before this) still reads as it was;
- a record or a write value of `COMPRESS_MIN_BYTES` or more is deflated when
  that shrinks it, its type prefixed `COMPRESSED_TYPE_PREFIX` (chat text shrinks
  to a third; the stores do not deflate such a value again). Channel values
  (blobs) are left to the stores, which split large ones into shared chunks
  (`state.cold.chunks`) and recognise DeltaChannel snapshots by their serde
  bytes.
"""

from __future__ import annotations

import zlib
from typing import Any

from langgraph.checkpoint.base import Checkpoint
from langgraph.checkpoint.serde.base import SerializerProtocol

from ..codec import COMPRESSED_TYPE_PREFIX
from ..errors import CorruptState
from ..ports import StoredCheckpoint, TypedBytes

COMPRESS_MIN_BYTES = 256
# Values are compressed once, on the write; level 6 costs ~15 us for a 2 KB message pair.
COMPRESS_LEVEL = 6


def dump_value(serde: SerializerProtocol, value: Any) -> TypedBytes:
    """A pending write's value as stored."""
    return _deflated(serde.dumps_typed(value))


def load_value(serde: SerializerProtocol, stored: TypedBytes) -> Any:
    return serde.loads_typed(_inflated(stored))


def dump_checkpoint(
    serde: SerializerProtocol, checkpoint: Checkpoint, inline: dict[str, Any]
) -> TypedBytes:
    """The checkpoint record: its inline values only, without `channel_versions`."""
    record = {
        key: value
        for key, value in checkpoint.items()
        if key not in ("channel_values", "channel_versions")
    }
    record["channel_values"] = inline
    return _deflated(serde.dumps_typed(record))


def load_checkpoint(serde: SerializerProtocol, stored: StoredCheckpoint) -> Checkpoint:
    checkpoint: Checkpoint = serde.loads_typed(_inflated(stored.checkpoint))
    if "channel_versions" not in checkpoint:
        checkpoint["channel_versions"] = dict(stored.channel_versions)
    return checkpoint


def _deflated(value: TypedBytes) -> TypedBytes:
    type_, data = value
    if len(data) < COMPRESS_MIN_BYTES:
        return value
    packed = zlib.compress(data, COMPRESS_LEVEL)
    return (COMPRESSED_TYPE_PREFIX + type_, packed) if len(packed) < len(data) else value


def _inflated(value: TypedBytes) -> TypedBytes:
    type_, data = value
    if not type_.startswith(COMPRESSED_TYPE_PREFIX):
        return value
    try:
        return type_.removeprefix(COMPRESSED_TYPE_PREFIX), zlib.decompress(data)
    except zlib.error as exc:
        raise CorruptState(f"a stored {type_} value does not decompress") from exc
