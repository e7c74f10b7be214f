"""Size management for stored values: compress, split into items, reassemble.

Backend-neutral pure functions. A value is compressed (zlib, stdlib) once it
is larger than the compression threshold and compression actually shrinks it;
the result is split into chunks small enough that each fits one stored item
(for Cosmos: one JSON document under the 2 MB limit, after base64). Reading
joins the chunks and decompresses. Nothing is ever dropped: the only failure
is an item envelope that leaves no room for any data at all.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import CorruptState, StateTooLarge

RAW = "raw"
ZLIB = "zlib"
# Level 1: ~4x faster than the default level for a few percent less ratio; values
# over the threshold are re-compressed on every step that changes them.
ZLIB_LEVEL = 1
# Room left in an item for what the store adds around the payload (system properties).
ITEM_MARGIN_BYTES = 1024
# Starts the serde type of a value its writer deflated already (`state.checkpoint.values`):
# a store does not try to deflate it again.
COMPRESSED_TYPE_PREFIX = "zlib+"


@dataclass(frozen=True)
class Encoded:
    """A value as stored: how it is encoded and the chunks, in order."""

    encoding: str
    chunks: tuple[bytes, ...]
    size: int  # bytes before encoding

    @property
    def digest(self) -> str:
        """Short content hash: names a chunk set, so a rewrite never mixes two sets."""
        hasher = hashlib.blake2b(digest_size=8)
        for chunk in self.chunks:
            hasher.update(chunk)
        return hasher.hexdigest()


def stays_raw(size: int, threshold: int) -> bool:
    """Whether `size` bytes are stored raw whatever they hold (not over the threshold)."""
    return size <= threshold


def compress(data: bytes, threshold: int) -> tuple[str, bytes]:
    """`(encoding, payload)`: zlib when `data` is over `threshold` and it helps, else raw."""
    if stays_raw(len(data), threshold):
        return RAW, data
    packed = zlib.compress(data, ZLIB_LEVEL)
    if len(packed) >= len(data):
        return RAW, data
    return ZLIB, packed


def decompress(encoding: str, payload: bytes) -> bytes:
    if encoding == RAW:
        return payload
    if encoding == ZLIB:
        try:
            return zlib.decompress(payload)
        except zlib.error as exc:
            raise CorruptState(f"zlib payload does not decompress: {exc}") from exc
    raise CorruptState(f"unknown value encoding {encoding!r}")


def split(payload: bytes, chunk_bytes: int) -> tuple[bytes, ...]:
    """Consecutive slices of at most `chunk_bytes` (one empty chunk for an empty payload)."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    if not payload:
        return (b"",)
    return tuple(payload[i : i + chunk_bytes] for i in range(0, len(payload), chunk_bytes))


def encode(data: bytes, *, compress_threshold: int, chunk_bytes: int) -> Encoded:
    encoding, payload = compress(data, compress_threshold)
    return Encoded(encoding, split(payload, chunk_bytes), len(data))


def decode(encoding: str, chunks: Sequence[bytes], *, expected_chunks: int | None = None) -> bytes:
    if expected_chunks is not None and len(chunks) != expected_chunks:
        raise CorruptState(f"value has {len(chunks)} of its {expected_chunks} chunks")
    return decompress(encoding, b"".join(chunks))


def base64_chunk_budget(max_item_bytes: int, envelope_bytes: int) -> int:
    """Raw bytes per chunk such that base64(chunk) plus the envelope fits one item.

    Raises `StateTooLarge` when the envelope alone leaves no room: the one case
    that chunking cannot solve.
    """
    room = max_item_bytes - envelope_bytes - ITEM_MARGIN_BYTES
    budget = (room // 4) * 3  # base64 turns every 3 bytes into 4 characters
    if budget <= 0:
        raise StateTooLarge("item envelope", envelope_bytes, max_item_bytes - ITEM_MARGIN_BYTES)
    return budget


def to_text(chunk: bytes) -> str:
    """A chunk as JSON-safe text (base64)."""
    return base64.b64encode(chunk).decode("ascii")


def from_text(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise CorruptState(f"stored chunk is not base64: {exc}") from exc
