"""How the Cosmos layout encodes one stored value: deflated over the threshold when that
helps, and a value its writer deflated already (a pending write's `zlib+` value) stored as
it is, never deflated a second time."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from state import codec
from state.checkpoint import values
from state.cold import cosmos_layout as layout

SERDE = JsonPlusSerializer()
THRESHOLD = 1024


@pytest.fixture
def deflate_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the buffers the codec deflates from here on."""
    calls: list[int] = []
    real: Callable[..., bytes] = zlib.compress

    def counting(data: bytes, level: int = -1) -> bytes:
        calls.append(len(data))
        return real(data, level)

    monkeypatch.setattr(codec.zlib, "compress", counting)
    return calls


def test_a_value_its_writer_deflated_is_stored_as_it_is(deflate_calls: list[int]) -> None:
    # Varied text: still over the threshold once deflated.
    deflated = values.dump_value(SERDE, [f"message {n}: {n * 7919 % 104729}" for n in range(4000)])
    assert deflated[0].startswith(codec.COMPRESSED_TYPE_PREFIX)
    assert len(deflated[1]) > THRESHOLD
    packer = layout.Packer(max_item_bytes=2_000_000, compress_threshold=THRESHOLD)
    deflate_calls.clear()

    entry = packer.entry(deflated)

    assert deflate_calls == [] and entry["enc"] == codec.RAW
    assert layout.decode("owner", entry, {}) == deflated


def test_a_plain_value_over_the_threshold_is_deflated_once(deflate_calls: list[int]) -> None:
    plain = ("msgpack", b"the same words " * 1000)
    packer = layout.Packer(max_item_bytes=2_000_000, compress_threshold=THRESHOLD)

    entry = packer.entry(plain)

    assert deflate_calls == [len(plain[1])] and entry["enc"] == codec.ZLIB
    assert layout.decode("owner", entry, {}) == plain
