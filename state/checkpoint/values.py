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

import threading
import zlib
from collections import OrderedDict
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


# (thread, namespace) pairs whose latest inline values are kept.
KEPT_THREADS = 10_000


class KeptInline:
    """The inline values of the checkpoint each (thread, namespace) was last read or put at,
    serialized as they were stored.

    LangGraph hands the saver its live channel objects, and some change in place after
    the handover without a new version (a join barrier's set of finished nodes, an
    accumulating `Topic`): a put serializing them again would store a value that version
    never had. A put whose parent is kept takes an unchanged channel's value from here
    instead (and only if it was inline there: otherwise its blob holds it). Thread-safe:
    the sync API reads and puts on its callers' threads.
    """

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple[str, str], tuple[str, dict[str, tuple[Any, TypedBytes]]]]
        self._kept = OrderedDict()
        self._lock = threading.Lock()

    def keep(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        values: dict[str, tuple[Any, TypedBytes]],
    ) -> None:
        """`values`: channel -> (version, serialized value) of the checkpoint's inline ones."""
        key = (thread_id, checkpoint_ns)
        with self._lock:
            self._kept[key] = (checkpoint_id, values)
            self._kept.move_to_end(key)
            while len(self._kept) > KEPT_THREADS:
                self._kept.popitem(last=False)

    def of(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> dict[str, tuple[Any, TypedBytes]] | None:
        """The inline values kept for `checkpoint_id`, or None if it is not the one kept."""
        with self._lock:
            kept = self._kept.get((thread_id, checkpoint_ns))
        if kept is None or checkpoint_id is None or kept[0] != checkpoint_id:
            return None
        return kept[1]

    def forget(self, thread_id: str) -> None:
        with self._lock:
            for key in [key for key in self._kept if key[0] == thread_id]:
                del self._kept[key]
