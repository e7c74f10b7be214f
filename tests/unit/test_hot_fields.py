"""The hot checkpoint fields keep their byte layout: entries written by another process (and the
Lua scripts that compare blob prefixes) read them as framed length-prefixed parts."""

from __future__ import annotations

import json
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from state.hot.redis_checkpoints import (
    blob_fields,
    parse_entry,
    parse_write,
    typed_field,
    write_fields,
)
from state.hot.redis_values import REFERENCE_TYPE
from state.ports import StoredBlob, StoredCheckpoint, StoredWrite


def framed(*parts: bytes) -> bytes:
    """The layout by its definition: each part preceded by its length, 4 bytes big-endian."""
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


def pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


names = st.text(min_size=1, max_size=12)
# The serde type a reference to a shared value is stored under is no serializer's name
# (Hypothesis draws the string constants of the code under test, and found it).
serdes = names.filter(lambda name: name != REFERENCE_TYPE)
payloads = st.binary(max_size=3000)


@given(channel=names, version=st.integers(min_value=1), serde=serdes, payload=payloads)
@settings(max_examples=100, deadline=None)
def test_a_blob_field_is_its_framed_version_then_its_framed_typed_value(
    channel: str, version: int, serde: str, payload: bytes
) -> None:
    [name, value] = blob_fields([StoredBlob(channel, version, (serde, payload))])
    assert name == b"b:" + channel.encode()
    assert value == framed(json.dumps(version).encode()) + framed(serde.encode(), payload)

    head = {"id": "1", "parent": None, "metadata": {}, "versions": {channel: version}}
    entry = {
        b"id": b"1",
        b"head": json.dumps(head).encode(),
        b"cp": typed_field(("json", b"{}")),
        name: value,
    }
    parsed = parse_entry("t", "", entry)
    assert parsed.blobs == {channel: (serde, payload)}


@given(task=names, path=st.text(max_size=12), idx=st.integers(-5, 100), channel=names)
@settings(max_examples=100, deadline=None)
def test_a_write_field_is_its_framed_header_then_its_framed_typed_value(
    task: str, path: str, idx: int, channel: str
) -> None:
    payload = task.encode() * 40
    write = StoredWrite(task, path, idx, channel, ("msgpack", payload))
    [name, value] = write_fields([write])
    header = framed(task.encode(), path.encode(), str(idx).encode(), channel.encode())
    assert name == f"w:{task}\0{idx}".encode()
    assert value == framed(header, framed(b"msgpack", payload))
    assert parse_write(value) == write


def test_a_checkpoint_with_a_blob_and_writes_round_trips() -> None:
    checkpoint = StoredCheckpoint(
        thread_id="t",
        checkpoint_ns="ns",
        checkpoint_id="2",
        parent_checkpoint_id="1",
        checkpoint=("json", b'{"v": 1}'),
        metadata={"step": 2},
        channel_versions={"messages": "00002.5", "other": "00001.1"},
    )
    writes = [StoredWrite("a", "p", 0, "messages", ("msgpack", b"x" * 70_000))]
    fields = pairs(blob_fields([StoredBlob("messages", "00002.5", ("msgpack", b"y" * 90_000))]))
    fields |= pairs(write_fields(writes))
    # A blob of another version than the checkpoint's is not the checkpoint's value.
    fields[b"b:other"] = blob_fields([StoredBlob("other", "00000.9", ("json", b"1"))])[1]
    head = {
        "id": "2",
        "parent": "1",
        "metadata": {"step": 2},
        "versions": checkpoint.channel_versions,
    }
    fields |= {
        b"id": b"2",
        b"head": json.dumps(head).encode(),
        b"cp": typed_field(("json", b'{"v": 1}')),
    }
    parsed = parse_entry("t", "ns", fields)
    assert parsed.blobs == {"messages": ("msgpack", b"y" * 90_000)}
    assert parsed.writes == writes
    assert parsed.checkpoint == checkpoint.checkpoint
