"""The chunk layer on its own (`state.cold.chunks`): a split assembles back byte for byte,
an appended value builds on the previous split and adds only what changed, and every way
a stored chunk or manifest can be wrong is a `CorruptState`."""

from __future__ import annotations

import random

import pytest
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.serde.types import _DeltaSnapshot

from state.cold import chunks
from state.errors import CorruptState
from state.ports import StoredCheckpoint


def packed(value: list[dict[str, str]]) -> bytes:
    """The bytes LangGraph's serde stores for a value."""
    return JsonPlusSerializer().dumps_typed(value)[1]


def messages(count: int) -> list[dict[str, str]]:
    rng = random.Random(count)
    words = "ticket billing refund invoice account customer agent reply".split()  # noqa: SIM905
    return [
        {"role": "user", "content": " ".join(rng.choice(words) for _ in range(170))}
        for _ in range(count)
    ]


def test_an_appended_list_adds_a_bounded_number_of_chunks_and_reads_back() -> None:
    chunker = chunks.Chunker()
    stored: dict[bytes, chunks.Chunk] = {}
    history = messages(1500)
    known = None
    added_per_version = []
    for count in range(20, 1500, 10):  # past one level of nodes (64 leaves of 4 KB)
        value = packed(history[:count])
        manifest, added, known = chunker.split(value, known)
        added_per_version.append(sum(len(chunk.data) for chunk in added))
        stored.update((chunk.digest, chunk) for chunk in added)
        assert chunks.assemble(manifest, stored) == value
    assert chunks.Manifest.decode(manifest).depth >= 1
    # Ten ~1 KB messages per version: what a version adds does not grow with the list.
    late = added_per_version[len(added_per_version) // 2 :]
    assert max(late) < 4 * chunks.LEAF_BYTES


def test_a_split_built_on_a_previous_one_equals_a_split_from_scratch() -> None:
    chunker = chunks.Chunker()
    before = packed(messages(300)[:200])
    after = packed(messages(300))
    _, _, known = chunker.split(before, None)
    incremental, _, _ = chunker.split(after, known)
    scratch, _, _ = chunker.split(after, None)
    assert incremental == scratch


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_value_changed_within_the_remembered_leaves_is_split_anew(where: str) -> None:
    """Any byte of the leaves a remembered split hashed: the first, one inside, the last."""
    chunker = chunks.Chunker()
    value = bytearray(packed(messages(100)))
    _, added, known = chunker.split(bytes(value), None)
    stored = {chunk.digest: chunk for chunk in added}
    last = chunks.HEAD_BYTES + known.full_leaves * chunks.LEAF_BYTES - 1
    at = {"first": chunks.HEAD_BYTES, "middle": chunks.HEAD_BYTES + 10, "last": last}[where]
    value[at] ^= 0xFF
    changed, added, _ = chunker.split(bytes(value), known)
    stored.update((chunk.digest, chunk) for chunk in added)
    assert chunks.assemble(changed, stored) == bytes(value)


@pytest.mark.parametrize("damage", ["leaf", "missing", "manifest_tail", "manifest_length"])
def test_damage_is_corrupt_state(damage: str) -> None:
    value = packed(messages(100))
    manifest, added, _ = chunks.Chunker().split(value, None)
    stored = {chunk.digest: chunk for chunk in added}
    leaf = next(chunk for chunk in added if not chunk.node)
    if damage == "leaf":
        other = chunks.Chunker().split(packed(messages(99)), None)[1][0]
        stored[leaf.digest] = chunks.Chunk(leaf.digest, False, other.data)
    elif damage == "missing":
        del stored[leaf.digest]
    elif damage == "manifest_tail":
        manifest = manifest[:-3]
    else:
        decoded = chunks.Manifest.decode(manifest)
        manifest = chunks.Manifest(
            decoded.total + 1, decoded.depth, decoded.roots, decoded.head, decoded.tail
        ).encode()
    with pytest.raises(CorruptState):
        chunks.assemble(manifest, stored)


def test_reachable_follows_nodes_and_leaves_the_rest() -> None:
    chunker = chunks.Chunker()
    first, added_first, _ = chunker.split(packed(messages(400)), None)
    second, added_second, _ = chunker.split(packed(messages(300)), None)
    nodes = {c.digest: c for c in [*added_first, *added_second] if c.node}
    assert chunks.reachable([first], nodes) == {c.digest for c in added_first}
    assert chunks.reachable([first, second], nodes) == {
        c.digest for c in [*added_first, *added_second]
    }


def test_large_values_and_delta_channel_snapshots_are_chunked_small_ones_stay_whole() -> None:
    serde = JsonPlusSerializer()
    for count in (10, 100, 3000):
        value = ["x" * 1000] * count
        assert chunks.chunked(serde.dumps_typed(value))
        assert chunks.chunked(serde.dumps_typed(_DeltaSnapshot(value)))
    assert not chunks.chunked(serde.dumps_typed(["x" * 1000] * 5))
    assert not chunks.chunked(serde.dumps_typed(_DeltaSnapshot(["x" * 1000] * 5)))


def test_a_delta_channel_snapshot_is_recognised_from_its_manifest_alone() -> None:
    serde = JsonPlusSerializer()
    for count in (10, 100, 3000):  # ext 8, 16 and 32 headers
        value = ["x" * 1000] * count
        for wrapped, expected in ((_DeltaSnapshot(value), True), (value, False)):
            type_, data = serde.dumps_typed(wrapped)
            manifest, _, _ = chunks.Chunker().split(data, None)
            assert chunks.delta_snapshot(type_, chunks.manifest_head(manifest)) is expected
    assert not chunks.delta_snapshot("json", serde.dumps_typed(_DeltaSnapshot(["x"] * 9))[1])


def test_a_small_delta_channel_snapshot_is_recognised_whatever_its_msgpack_header() -> None:
    """Payloads of 1, 2, 4, 8 or 16 bytes (an empty list, a short one) get a fixext header."""
    serde = JsonPlusSerializer()
    for value in ([], None, ["ab"], ["a"], ["abcdefghijklm"], ["x" * 100]):
        type_, data = serde.dumps_typed(_DeltaSnapshot(value))
        assert chunks.delta_snapshot(type_, data[: chunks.HEAD_BYTES]), data[:4]
        type_, data = serde.dumps_typed(value)
        assert not chunks.delta_snapshot(type_, data[: chunks.HEAD_BYTES]), data[:4]


async def test_a_chunk_missing_below_a_node_is_corrupt_state_after_one_fetch_per_level() -> None:
    value = packed(messages(300))
    manifest, added, _ = chunks.Chunker().split(value, None)
    assert chunks.Manifest.decode(manifest).depth == 1
    leaf = next(chunk for chunk in added if not chunk.node)
    stored = {chunk.digest: chunk for chunk in added if chunk.digest != leaf.digest}
    fetches = 0

    async def fetch(digests: list[bytes]) -> dict[bytes, chunks.Chunk]:
        nonlocal fetches
        fetches += 1
        return {digest: stored[digest] for digest in digests if digest in stored}

    with pytest.raises(CorruptState, match=leaf.digest.hex()):
        await chunks.resolve({"m": ("chunked+msgpack", manifest)}, fetch, lambda _: None)
    assert fetches == 2


def put(
    chunker: chunks.Chunker,
    value: bytes | None,
    checkpoint_id: str,
    parent: str | None,
    thread: str = "thread",
) -> tuple[bytes, list[chunks.Chunk]]:
    """A confirmed put of checkpoint `checkpoint_id` that stores `value` as a new version
    of its `messages` channel (None: a small value the chunker never sees)."""
    pending = chunks.PendingSplits(chunker)
    versions: dict[str, str | int | float] = {"messages": checkpoint_id}
    pending.begin(
        StoredCheckpoint(thread, "", checkpoint_id, parent, ("msgpack", b""), {}, versions), []
    )
    manifest, added = (
        (b"", [])
        if value is None
        else pending.split((thread, "", "messages"), ("msgpack", value), checkpoint_id)
    )
    chunker.confirm(pending)
    return manifest, added


async def test_a_written_value_reads_back_without_fetching_until_forgotten() -> None:
    chunker = chunks.Chunker()
    value = packed(messages(200))
    manifest, added, _ = chunks.Chunker().split(value, None)
    stored = {chunk.digest: chunk for chunk in added}
    fetched: list[list[bytes]] = []

    async def fetch(digests: list[bytes]) -> dict[bytes, chunks.Chunk]:
        fetched.append(digests)
        return {digest: stored[digest] for digest in digests}

    values = {"messages": ("chunked+msgpack", manifest)}
    # Not confirmed yet (the write may have failed): fetched and assembled.
    assert await chunks.resolve(values, fetch, chunker.value_of) == {"messages": ("msgpack", value)}
    assert fetched
    fetched.clear()
    assert put(chunker, value, "1", None)[0] == manifest
    assert await chunks.resolve(values, fetch, chunker.value_of) == {"messages": ("msgpack", value)}
    assert fetched == []
    # Another version of the channel replaces the remembered one.
    newer = packed(messages(210))
    newer_manifest, _ = put(chunker, newer, "2", "1")
    assert chunker.value_of(manifest) is None
    assert chunker.value_of(newer_manifest) == newer
    chunker.forget(["thread"])
    assert chunker.value_of(newer_manifest) is None


def test_only_a_put_continuing_the_stores_own_chain_builds_on_what_it_stored() -> None:
    """Chunks a remembered split names are reached from the parent only if the put's
    parent is the last checkpoint written; anywhere else, another process may have
    collected them (a rolled-back run redone), so they are sent again."""
    history = messages(300)
    chunker = chunks.Chunker()
    _, first = put(chunker, packed(history[:200]), "1", None)
    _, continued = put(chunker, packed(history[:210]), "2", "1")
    assert len(continued) < len(first) // 4
    # A branch from "1" repeating what "2" stored: everything again.
    _, branched = put(chunker, packed(history[:210]), "3", "1")
    assert {chunk.digest for chunk in continued} < {chunk.digest for chunk in branched}
    assert len(branched) > len(first)
    # Then the branch is the chain: its next put sends what it adds.
    _, next_on_branch = put(chunker, packed(history[:220]), "4", "3")
    assert len(next_on_branch) < len(first) // 4
    # A step another writer stored ("5", unknown here) breaks the chain too.
    _, after_other = put(chunker, packed(history[:240]), "6", "5")
    assert len(after_other) > len(first)


def test_a_branch_forgets_the_other_channels_of_the_chain_it_left() -> None:
    chunker = chunks.Chunker()
    value = packed(messages(200))
    put(chunker, value, "1", None)
    pending = chunks.PendingSplits(chunker)
    # "2" branches from an unknown checkpoint and does not write `messages`.
    pending.begin(
        StoredCheckpoint("thread", "", "2", "0", ("msgpack", b""), {}, {"messages": "1"}), []
    )
    chunker.confirm(pending)
    grown = packed(messages(200) + messages(3))
    _, added = put(chunker, grown, "3", "2")
    _, from_scratch, _ = chunks.Chunker().split(grown, None)
    assert {chunk.digest for chunk in added} == {chunk.digest for chunk in from_scratch}


def test_a_channel_changed_to_a_small_value_no_longer_builds_on_its_old_chunks() -> None:
    """Found by review: the graph's input (or any channel) is large at one checkpoint and
    small or cleared at the next; another process's prune then collects the large value's
    chunks, which the chain's tip no longer reaches. A large value later must send them."""
    chunker = chunks.Chunker()
    big = packed(messages(200))
    _, first = put(chunker, big, "1", None)
    put(chunker, None, "2", "1")  # small: the tip no longer holds the remembered version
    _, again = put(chunker, big, "3", "2")
    assert {chunk.digest for chunk in again} == {chunk.digest for chunk in first}


def test_equal_values_under_two_keys_are_remembered_and_forgotten_apart() -> None:
    chunker = chunks.Chunker()
    value = packed(messages(100))
    manifest, _ = put(chunker, value, "1", None, thread="thread-a")
    assert put(chunker, value, "1", None, thread="thread-b")[0] == manifest
    chunker.forget(["thread-b"])
    chunker.forget(["thread-a"])
    assert chunker.value_of(manifest) is None
    put(chunker, value, "1", None, thread="thread-a")
    put(chunker, value, "1", None, thread="thread-b")
    chunker.forget(["thread-a"])
    put(chunker, value, "1", None, thread="thread-b")
    chunker.forget(["thread-b"])
    assert chunker.value_of(manifest) is None
