"""Size management of stored values: compression, splitting, reassembly, limits."""

from __future__ import annotations

import base64
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from state import codec
from state.errors import CorruptState, StateTooLarge


@given(
    data=st.binary(max_size=5000),
    threshold=st.integers(min_value=1, max_value=2000),
    chunk_bytes=st.integers(min_value=1, max_value=700),
)
@settings(max_examples=200, deadline=None)
def test_any_value_round_trips_through_encode_and_decode(
    data: bytes, threshold: int, chunk_bytes: int
) -> None:
    encoded = codec.encode(data, compress_threshold=threshold, chunk_bytes=chunk_bytes)
    assert all(len(chunk) <= chunk_bytes for chunk in encoded.chunks)
    assert encoded.size == len(data)
    decoded = codec.decode(encoded.encoding, encoded.chunks, expected_chunks=len(encoded.chunks))
    assert decoded == data


def test_values_at_or_under_the_threshold_are_stored_raw() -> None:
    data = b"a" * 1000
    assert codec.compress(data, 1000) == (codec.RAW, data)


def test_values_over_the_threshold_are_compressed_when_that_helps() -> None:
    data = b"the same support transcript line\n" * 2000
    encoding, payload = codec.compress(data, 1000)
    assert encoding == codec.ZLIB
    assert len(payload) < len(data) // 10
    assert codec.decompress(encoding, payload) == data


def test_incompressible_values_stay_raw_rather_than_grow() -> None:
    data = os.urandom(50_000)
    assert codec.compress(data, 1000) == (codec.RAW, data)


def test_a_5_mb_value_splits_into_items_that_fit_the_limit() -> None:
    max_item = 1_800_000
    envelope = {"id": "blob:ns:channel:1", "thread_id": "t", "data": ""}
    budget = codec.base64_chunk_budget(max_item, len(json.dumps(envelope)))
    data = os.urandom(5 * 1024 * 1024)
    encoded = codec.encode(data, compress_threshold=16 * 1024, chunk_bytes=budget)
    assert len(encoded.chunks) == 4  # base64 leaves ~1.35 MB of raw bytes per item
    for chunk in encoded.chunks:
        item = {**envelope, "data": codec.to_text(chunk)}
        assert len(json.dumps(item).encode()) <= max_item
    texts = [codec.to_text(chunk) for chunk in encoded.chunks]
    assert codec.decode(encoded.encoding, [codec.from_text(t) for t in texts]) == data


def test_the_chunk_budget_accounts_for_base64_and_the_envelope() -> None:
    budget = codec.base64_chunk_budget(100_000, 5_000)
    assert len(base64.b64encode(b"x" * budget)) + 5_000 <= 100_000 - codec.ITEM_MARGIN_BYTES


def test_an_envelope_leaving_no_room_is_the_one_impossible_case() -> None:
    with pytest.raises(StateTooLarge):
        codec.base64_chunk_budget(10_000, 9_500)


def test_a_missing_chunk_is_reported_not_misread() -> None:
    encoded = codec.encode(os.urandom(3000), compress_threshold=100_000, chunk_bytes=1000)
    with pytest.raises(CorruptState):
        codec.decode(encoded.encoding, encoded.chunks[:-1], expected_chunks=len(encoded.chunks))


def test_corrupt_payloads_raise_corrupt_state() -> None:
    with pytest.raises(CorruptState):
        codec.decompress(codec.ZLIB, b"not zlib at all")
    with pytest.raises(CorruptState):
        codec.decompress("rot13", b"")
    with pytest.raises(CorruptState):
        codec.from_text("not base64!")


def test_chunk_sets_of_different_values_have_different_digests() -> None:
    first = codec.encode(b"a" * 3000, compress_threshold=100_000, chunk_bytes=1000)
    second = codec.encode(b"b" * 3000, compress_threshold=100_000, chunk_bytes=1000)
    again = codec.encode(b"a" * 3000, compress_threshold=100_000, chunk_bytes=1000)
    assert first.digest != second.digest
    assert first.digest == again.digest
