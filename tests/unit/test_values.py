"""What the saver stores for a checkpoint record and a pending write (`state.checkpoint.values`):
smaller than the serde's bytes, read back equal, and records stored before still readable."""

from __future__ import annotations

import zlib
from typing import Any

import pytest
from langgraph.checkpoint.base import Checkpoint, empty_checkpoint
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from state import codec
from state.checkpoint import values
from state.errors import CorruptState
from state.ports import StoredCheckpoint

SERDE = JsonPlusSerializer()
MESSAGES = [{"role": "user", "content": " ".join(["charged twice"] * 80)}] * 2


def stored(record: tuple[str, bytes], versions: dict[str, Any]) -> StoredCheckpoint:
    return StoredCheckpoint("t", "", "c1", None, record, {}, versions)


def checkpoint() -> Checkpoint:
    cp = empty_checkpoint()
    versions = {"messages": f"{7:032}.{0.25:016}", "__start__": f"{6:032}.{0.5:016}"}
    cp["channel_versions"] = versions
    cp["versions_seen"] = {"agent": dict(versions), "__input__": {}}
    cp["channel_values"] = {"messages": MESSAGES, "step": 3}
    return cp


def test_a_write_value_is_stored_deflated_and_reads_back() -> None:
    type_, data = values.dump_value(SERDE, MESSAGES)
    plain = SERDE.dumps_typed(MESSAGES)[1]
    assert type_ == codec.COMPRESSED_TYPE_PREFIX + "msgpack"
    assert len(data) < len(plain) / 3
    assert values.load_value(SERDE, (type_, data)) == MESSAGES


def test_small_values_and_values_stored_before_stay_as_the_serde_wrote_them() -> None:
    assert values.dump_value(SERDE, "yes") == SERDE.dumps_typed("yes")
    assert values.load_value(SERDE, SERDE.dumps_typed(MESSAGES)) == MESSAGES


def test_a_checkpoint_record_leaves_out_versions_and_values_and_reads_back_whole() -> None:
    cp = checkpoint()
    record = values.dump_checkpoint(SERDE, cp, {"step": 3})
    assert record[0] == codec.COMPRESSED_TYPE_PREFIX + "msgpack"
    as_stored = SERDE.loads_typed(("msgpack", zlib.decompress(record[1])))
    assert "channel_versions" not in as_stored
    assert as_stored["channel_values"] == {"step": 3}
    loaded = values.load_checkpoint(SERDE, stored(record, dict(cp["channel_versions"])))
    assert loaded == {**cp, "channel_values": {"step": 3}}


def test_a_checkpoint_record_stored_with_its_versions_reads_as_it_was() -> None:
    cp = checkpoint()
    legacy = SERDE.dumps_typed({**cp, "channel_values": {}})
    loaded = values.load_checkpoint(SERDE, stored(legacy, {"messages": "ignored"}))
    assert loaded["channel_versions"] == cp["channel_versions"]


def test_a_deflated_value_that_does_not_inflate_is_corrupt_state() -> None:
    with pytest.raises(CorruptState):
        values.load_value(SERDE, (codec.COMPRESSED_TYPE_PREFIX + "msgpack", b"not zlib"))
