"""Thread ids the saver refuses: the same on every backend and in both write modes, and
refused before anything is acknowledged (write-behind would otherwise log a step that no
flush could store: Cosmos refuses a partition key value over 2 KB, the emulator does not)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import cast

import pytest
import redis.asyncio as aioredis
from langgraph.checkpoint.base import empty_checkpoint
from redis.crc import key_slot

from state import InvalidValue
from state.checkpoint import TieredCheckpointSaver
from state.checkpoint.saver import MAX_THREAD_ID_BYTES
from state.hot.redis_client import create_redis_client, hot_namespace
from state.ports import SectionWrite
from state.settings import WriteMode
from state.size import ARCHIVE_SEPARATOR
from state.tiered import TieredStateStore
from tests.contract.conftest import OpenBackends, every_configuration
from tests.support.records import unique_thread


@every_configuration
async def test_a_thread_id_too_long_for_cosmos_is_refused_before_anything_is_stored(
    any_backend: str,
    hot: bool,
    mode: WriteMode | None,
    open_tiers: OpenBackends,
) -> None:
    async with open_tiers(any_backend, hot=hot, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        base = unique_thread("long")
        # Multi-byte characters: the limit is in bytes, as Cosmos counts them.
        longest = base + "é" * ((MAX_THREAD_ID_BYTES - len(base)) // 2)
        too_long = longest + "ab"
        assert len(longest.encode()) <= MAX_THREAD_ID_BYTES < len(too_long.encode())

        stored = await saver.aput(
            {"configurable": {"thread_id": longest, "checkpoint_ns": ""}},
            empty_checkpoint(),
            {},
            {},
        )
        await saver.aput_writes(stored, [("a", 1)], "task")
        await saver.aflush(longest)
        found = await saver.aget_tuple(stored)
        assert found is not None and found.pending_writes == [("task", "a", 1)]

        with pytest.raises(InvalidValue, match="thread id"):
            await saver.aput(
                {"configurable": {"thread_id": too_long, "checkpoint_ns": ""}},
                empty_checkpoint(),
                {},
                {},
            )
        refused = {**stored["configurable"], "thread_id": too_long}
        with pytest.raises(InvalidValue, match="thread id"):
            await saver.aput_writes({"configurable": refused}, [("a", 1)], "task")
        await saver.aflush(too_long)
        assert await saver.aget_tuple({"configurable": refused}) is None


async def _hot_keys(redis: aioredis.Redis, namespace: str) -> set[bytes]:
    return {key async for key in redis.scan_iter(match=f"*:{namespace}:*")}


@pytest.mark.parametrize("mode", [WriteMode.WRITE_THROUGH, WriteMode.WRITE_BEHIND])
@pytest.mark.parametrize("prefix", ["}", ""], ids=["closing-brace-first", "empty"])
async def test_a_thread_id_that_would_empty_the_hash_tag_keeps_its_keys_on_one_slot(
    cold_backend: str, mode: WriteMode, prefix: str, open_tiers: OpenBackends
) -> None:
    # `{}` is no hash tag: Redis would hash each whole key, scattering one thread's keys
    # over slots, and a cluster refuses the scripts that touch several (CROSSSLOT).
    async with open_tiers(cold_backend, hot=True, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        thread_id = prefix + unique_thread("tag") if prefix else ""
        await saver.adelete_thread(thread_id)
        namespace = hot_namespace(backends.settings)
        redis = create_redis_client(backends.settings)
        try:
            before = await _hot_keys(redis, namespace)
            stored = await saver.aput(
                {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}},
                empty_checkpoint(),
                {},
                {},
            )
            await saver.aput_writes(stored, [("a", 1)], "task")
            found = await saver.aget_tuple(stored)
            assert found is not None and found.pending_writes == [("task", "a", 1)]
            written = await _hot_keys(redis, namespace) - before
            assert written
            assert len({key_slot(key) for key in written}) == 1, sorted(written)
            await saver.aflush(thread_id)
            await saver.adelete_thread(thread_id)
        finally:
            await redis.aclose()


@pytest.mark.parametrize("mode", [WriteMode.WRITE_THROUGH, WriteMode.WRITE_BEHIND])
async def test_a_closing_brace_in_a_thread_id_never_reaches_another_threads_checkpoints(
    cold_backend: str, mode: WriteMode, open_tiers: OpenBackends
) -> None:
    async with open_tiers(cold_backend, hot=True, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        namespace = hot_namespace(backends.settings)
        base = unique_thread("brace")
        # Spelled so that, joined raw into `{thread}:<store>:cp4:<ns>`, both are one key.
        first = {"thread_id": base, "checkpoint_ns": f"y}}:{namespace}:cp4:z"}
        second = {"thread_id": f"{base}}}:{namespace}:cp4:y", "checkpoint_ns": "z"}
        mine = await saver.aput({"configurable": first}, empty_checkpoint(), {}, {})
        await saver.aput_writes(mine, [("a", 1)], "task")
        theirs = empty_checkpoint()
        theirs["channel_values"], theirs["channel_versions"] = {"x": "theirs"}, {"x": 1}
        stored = await saver.aput({"configurable": second}, theirs, {}, {"x": 1})
        await saver.aput_writes(stored, [("b", 2)], "other")

        found = await saver.aget_tuple({"configurable": first})
        assert found is not None
        assert found.checkpoint["id"] == mine["configurable"]["checkpoint_id"]
        assert found.pending_writes == [("task", "a", 1)]
        found = await saver.aget_tuple({"configurable": second})
        assert found is not None and found.checkpoint["channel_values"] == {"x": "theirs"}
        for thread in (first, second):
            await saver.aflush(thread["thread_id"])
            await saver.adelete_thread(thread["thread_id"])


async def refused_in_every_identifier(
    saver: TieredCheckpointSaver,
    thread_id: str,
    bad: str,
    match: str,
    also_refused: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Puts and writes with `bad` in the thread id, namespace, a channel, the task id or
    path are refused (`InvalidValue` matching `match`) and store nothing; `also_refused`
    (once the thread holds a checkpoint) is refused alike; the thread then works."""
    config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    with_channel = empty_checkpoint()
    channel = f"c{bad}h"
    with_channel["channel_values"], with_channel["channel_versions"] = {channel: 1}, {channel: 1}
    refused_puts = [
        ({"thread_id": thread_id + bad, "checkpoint_ns": ""}, empty_checkpoint(), {}),
        ({"thread_id": thread_id, "checkpoint_ns": f"n{bad}s"}, empty_checkpoint(), {}),
        ({"thread_id": thread_id, "checkpoint_ns": ""}, with_channel, {channel: 1}),
    ]
    for configurable, checkpoint, versions in refused_puts:
        with pytest.raises(InvalidValue, match=match):
            await saver.aput({"configurable": configurable}, checkpoint, {}, versions)
    await saver.aflush(thread_id)
    assert [found async for found in saver.alist(config)] == []

    stored = await saver.aput(config, empty_checkpoint(), {}, {})
    for writes, task_id, task_path in [
        ([(channel, 1)], "task", ""),
        ([("ch", 1)], f"ta{bad}sk", ""),
        ([("ch", 1)], "task", f"pa{bad}th"),
    ]:
        with pytest.raises(InvalidValue, match=match):
            await saver.aput_writes(stored, writes, task_id, task_path)
    if also_refused is not None:
        with pytest.raises(InvalidValue, match=match):
            await also_refused()
    await saver.aput_writes(stored, [("ch", 1)], "task")
    await saver.aflush(thread_id)
    found = await saver.aget_tuple(stored)
    assert found is not None and found.pending_writes == [("task", "ch", 1)]
    await saver.adelete_thread(thread_id)


@every_configuration
async def test_a_nul_character_in_an_identifier_is_refused_before_anything_is_stored(
    any_backend: str,
    hot: bool,
    mode: WriteMode | None,
    open_tiers: OpenBackends,
) -> None:
    # Postgres text and jsonb cannot hold one: write-behind would acknowledge a step whose
    # flush is refused for good, holding back the thread's later steps.
    async with open_tiers(any_backend, hot=hot, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        await refused_in_every_identifier(saver, unique_thread("nul"), "\0", "NUL")


@every_configuration
async def test_a_lone_surrogate_in_an_identifier_is_refused_before_anything_is_stored(
    any_backend: str,
    hot: bool,
    mode: WriteMode | None,
    open_tiers: OpenBackends,
) -> None:
    # JSON's "\\ud800" decodes to one; no store can encode it as UTF-8. Each refused with a
    # plain UnicodeEncodeError from its own client (or the saver's size check), and the
    # in-memory tiers stored a record no other backend could.
    async with open_tiers(any_backend, hot=hot, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        records = TieredStateStore(backends.cold, backends.hot, backends.settings)
        thread_id = unique_thread("surrogate")
        lone = "\ud800"
        with pytest.raises(InvalidValue, match="surrogate"):
            await records.create(thread_id + lone, {"n": 1}, agent_id="test")
        await refused_in_every_identifier(
            saver,
            thread_id,
            lone,
            "surrogate",
            also_refused=lambda: saver.acopy_thread(thread_id, thread_id + lone),
        )


@every_configuration
async def test_a_copy_never_makes_a_thread_whose_id_a_put_would_refuse(
    any_backend: str,
    hot: bool,
    mode: WriteMode | None,
    open_tiers: OpenBackends,
) -> None:
    async with open_tiers(any_backend, hot=hot, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        source = unique_thread("copy-from")
        config = {"configurable": {"thread_id": source, "checkpoint_ns": ""}}
        await saver.aput(config, empty_checkpoint(), {}, {})
        too_long = source + "é" * MAX_THREAD_ID_BYTES
        with pytest.raises(InvalidValue, match="thread id"):
            await saver.acopy_thread(source, too_long)
        assert await saver.aget_tuple({"configurable": {"thread_id": too_long}}) is None
        with pytest.raises(InvalidValue, match="NUL"):
            await saver.acopy_thread(source, source + "\0")
        await saver.adelete_thread(source)


async def test_a_thread_id_shaped_as_another_threads_archive_record_is_refused(
    any_backend: str, open_tiers: OpenBackends
) -> None:
    # Retention takes `<owner>~archive~...` for the owner's archive records and deletes
    # them with it, held or not (see `state.size`): such a thread would go with another.
    async with open_tiers(any_backend, hot=True) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        records = TieredStateStore(backends.cold, backends.hot, backends.settings)
        lookalike = unique_thread("owner") + ARCHIVE_SEPARATOR + "mine"
        config = {"configurable": {"thread_id": lookalike, "checkpoint_ns": ""}}
        with pytest.raises(InvalidValue, match="archive"):
            await saver.aput(config, empty_checkpoint(), {}, {})
        with pytest.raises(InvalidValue, match="archive"):
            await records.create(lookalike, {"n": 1}, agent_id="test")
        await saver.aflush(lookalike)
        assert await saver.aget_tuple(config) is None
        assert await backends.cold.get(lookalike) is None


# Text no store can hold: a lone surrogate (not UTF-8), a NUL character (not in Postgres).
unstorable_text = pytest.mark.parametrize(
    ("bad", "match"), [("\ud800", "surrogate"), ("\0", "NUL")], ids=["surrogate", "nul"]
)


@every_configuration
@unstorable_text
async def test_text_no_store_can_hold_is_an_invalid_value_to_every_call_on_every_backend(
    any_backend: str,
    hot: bool,
    mode: WriteMode | None,
    open_tiers: OpenBackends,
    bad: str,
    match: str,
) -> None:
    # A lone surrogate: Redis and Postgres raised a plain UnicodeEncodeError from their
    # clients where the in-memory tiers answered None; a record's section holding one left
    # its write intent behind, hiding the record's hot copy until the intent expired. A NUL
    # character: Postgres refused every record call naming one, Cosmos and the in-memory
    # tiers stored it (a record that worked on one backend only) or found nothing.
    async with open_tiers(any_backend, hot=hot, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        records = TieredStateStore(backends.cold, backends.hot, backends.settings)
        thread_id = unique_thread(f"{match}-calls")
        named = thread_id + bad
        config = {"configurable": {"thread_id": named, "checkpoint_ns": ""}}
        created = await records.create(thread_id, {"n": 1}, agent_id="test")
        await records.get(thread_id)
        calls = {
            "aget_tuple": lambda: saver.aget_tuple(config),
            "alist": lambda: anext(saver.alist(config), None),
            "adelete_thread": lambda: saver.adelete_thread(named),
            "adelete_for_runs": lambda: saver.adelete_for_runs([f"run{bad}"]),
            "acopy_thread": lambda: saver.acopy_thread(named, thread_id + "-copy"),
            "aprune": lambda: saver.aprune([named]),
            "get": lambda: records.get(named),
            "get_fresh": lambda: records.get_fresh(named),
            "is_cached": lambda: records.is_cached(named),
            "audit_trail": lambda: records.audit_trail(named),
            "create": lambda: records.create(named, {"n": 1}, agent_id="test"),
            "update_section": lambda: records.update_section(
                named, "n", 2, expected_version=1, agent_id="test"
            ),
            "a section's name": lambda: records.update_section(
                thread_id, f"n{bad}", 2, expected_version=1, agent_id="test"
            ),
            "a section's value": lambda: records.update_section(
                thread_id, "n", f"two{bad}", expected_version=1, agent_id="test"
            ),
            "a value deep in a section": lambda: records.update_section(
                thread_id, "n", {"list": [1, {"text": bad}]}, expected_version=1, agent_id="t"
            ),
            "an agent id": lambda: records.update_section(
                thread_id, "n", 2, expected_version=1, agent_id=f"agent{bad}"
            ),
            "an agent id of several sections": lambda: records.update_sections(
                thread_id,
                [SectionWrite("n", 2, "test"), SectionWrite("m", 3, f"agent{bad}")],
                expected_version=1,
            ),
        }
        if hot:  # locks need Redis: without it every lock call is BackendUnavailable
            calls["lock"] = lambda: records.lock(named)
            calls["lock_expires_in"] = lambda: records.lock_expires_in(named)
        for what, call in calls.items():
            try:
                await call()
            except InvalidValue as refused:
                assert match in str(refused), what
            else:
                pytest.fail(f"{what}: not refused")
        assert await records.get(thread_id) == created
        assert await records.is_cached(thread_id) == hot
        # Text that only reads like the escape (a backslash, then "u0000") is stored as is.
        updated = await records.update_section(
            thread_id, "n", "\\u0000", expected_version=1, agent_id="test"
        )
        assert updated.sections == {"n": "\\u0000"}
        fresh = await records.get_fresh(thread_id)
        assert fresh is not None and fresh.sections == {"n": "\\u0000"}
        await saver.adelete_thread(thread_id)


@every_configuration
@unstorable_text
async def test_metadata_no_store_can_hold_is_refused_before_anything_is_acknowledged(
    any_backend: str,
    hot: bool,
    mode: WriteMode | None,
    open_tiers: OpenBackends,
    bad: str,
    match: str,
) -> None:
    # Postgres jsonb refused a NUL in a key or below the top level, and a lone surrogate
    # anywhere: written behind, the put was acknowledged and its flush refused for good
    # (EntryStuck, the thread's later steps held back); Cosmos and the in-memory tiers
    # stored it. A filter naming one: Postgres refused it, the others found nothing.
    async with open_tiers(any_backend, hot=hot, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        thread_id = unique_thread(f"{match}-metadata")
        config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        for metadata in ({f"k{bad}": 1}, {"k": {"deep": [f"v{bad}"]}}, {"k": f"v{bad}"}):
            if bad == "\0" and metadata == {"k": "v\0"}:
                continue  # LangGraph drops a NUL from a top-level string before a saver
            with pytest.raises(InvalidValue, match=match):
                await saver.aput(config, empty_checkpoint(), metadata, {})
            with pytest.raises(InvalidValue, match=match):
                await anext(saver.alist(config, filter=metadata), None)
        through_config = {"configurable": {**config["configurable"], "note": f"n{bad}"}}
        if bad != "\0":  # a config's string joins the metadata, a NUL dropped from it
            with pytest.raises(InvalidValue, match=match):
                await saver.aput(through_config, empty_checkpoint(), {}, {})
        stored = await saver.aput(config, empty_checkpoint(), {"k": "v"}, {})
        await saver.aflush(thread_id)
        found = await saver.aget_tuple(config)
        assert found is not None and found.config == stored
        assert [t.config async for t in saver.alist(config, filter={"k": "v"})] == [stored]
        await saver.adelete_thread(thread_id)


@pytest.mark.parametrize("mode", [WriteMode.WRITE_THROUGH, WriteMode.WRITE_BEHIND])
async def test_a_thread_id_of_none_is_refused_not_read_as_the_thread_named_none(
    any_backend: str, mode: WriteMode, open_tiers: OpenBackends
) -> None:
    # LangGraph's InMemorySaver keeps None a thread of its own and Postgres refuses it: as
    # text it was the thread "None", another caller's checkpoints read and written.
    async with open_tiers(any_backend, hot=True, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        unnamed = {"configurable": {"thread_id": None, "checkpoint_ns": ""}}
        with pytest.raises(InvalidValue, match="thread id of None"):
            await saver.aget_tuple(unnamed)
        with pytest.raises(InvalidValue, match="thread id of None"):
            await anext(saver.alist(unnamed))
        with pytest.raises(InvalidValue, match="thread id of None"):
            await saver.aput(unnamed, empty_checkpoint(), {}, {})
        thread_id = unique_thread("none")
        stored = await saver.aput(
            {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}},
            empty_checkpoint(),
            {},
            {},
        )
        pinned = {**stored["configurable"], "thread_id": None}
        with pytest.raises(InvalidValue, match="thread id of None"):
            await saver.aput_writes({"configurable": pinned}, [("a", 1)], "task")
        await saver.aflush(thread_id)
        await saver.adelete_thread(thread_id)


@every_configuration
async def test_a_thread_id_of_none_is_refused_by_every_call_naming_threads_directly(
    any_backend: str, hot: bool, mode: WriteMode | None, open_tiers: OpenBackends
) -> None:
    # As text None is the thread "None", another caller's perhaps: a config naming it is
    # refused, and so must a delete, copy, prune, flush or fence seed be (they deleted,
    # copied or flushed that caller's thread), in every mode alike.
    async with open_tiers(any_backend, hot=hot, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        thread_id = unique_thread("none-direct")
        stored = await saver.aput(
            {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}},
            empty_checkpoint(),
            {},
            {},
        )
        unnamed = cast("str", None)
        calls = {
            "adelete_thread": lambda: saver.adelete_thread(unnamed),
            "delete_thread": lambda: asyncio.to_thread(saver.delete_thread, unnamed),
            "acopy_thread source": lambda: saver.acopy_thread(unnamed, thread_id + "-copy"),
            "copy_thread source": lambda: asyncio.to_thread(
                saver.copy_thread, unnamed, thread_id + "-copy"
            ),
            "acopy_thread target": lambda: saver.acopy_thread(thread_id, unnamed),
            "aprune": lambda: saver.aprune([thread_id, unnamed]),
            "aprune delete": lambda: saver.aprune([thread_id, unnamed], strategy="delete"),
            "adelete_for_runs": lambda: saver.adelete_for_runs([cast("str", None)]),
            "aflush": lambda: saver.aflush(unnamed),
            "flush": lambda: asyncio.to_thread(saver.flush, unnamed),
            "arefresh": lambda: saver.arefresh(unnamed),
            "aseed_fence": lambda: saver.aseed_fence(unnamed, 1),
            "seed_fence": lambda: asyncio.to_thread(saver.seed_fence, unnamed, 1),
        }
        for what, call in calls.items():
            try:
                await call()
            except InvalidValue as refused:
                assert "of None" in str(refused), what
            else:
                pytest.fail(f"{what}: not refused")
        with pytest.raises(InvalidValue, match="thread id of None"):
            saver.expect_new_thread(unnamed)
        # Nothing of the named thread went with the refused calls.
        found = await saver.aget_tuple(stored)
        assert found is not None and found.config == stored
        await saver.adelete_thread(thread_id)
