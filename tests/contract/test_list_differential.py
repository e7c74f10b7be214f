"""Differential tests of the read side on direct saver calls: `list` with filters, `before`
and `limit` across namespaces, `get_tuple` with and without an id, pending writes and
metadata round-trips, compared with LangGraph's `InMemorySaver`, read from the saver that
wrote them and again from the cold tier alone once Redis lost everything."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.memory import InMemorySaver

from state.checkpoint import TieredCheckpointSaver
from state.factory import backends_for
from state.settings import Settings, WriteMode
from tests.contract.conftest import OpenBackends, every_configuration
from tests.contract.test_differential import PROGRAMS, Run, counting, difference, expected

SUB = "child:1f0"
METADATAS: list[dict[str, Any]] = [
    {"source": "input", "step": -1, "note": "héllo ✓ 日本", "big": 2**60 + 1, "ratio": 0.1},
    {"source": "loop", "step": 0, "flag": True, "nested": {"a": {"b": [1, None, "x"]}}},
    {"source": "loop", "step": 1, "flag": False, "num": "1", "none": None, "neg": -(2**63)},
    {
        "source": "update",
        "step": 2,
        "num": 1,
        "f": 1.5,
        "nested": {"a": {"b": [1]}},
        "we'ird [key].$": "v",
        "日本": 0,
    },
    {"source": "loop", "step": 3, "big": 2**63 - 1, "f": 1e-300, "empty": ""},
]
QUERIES: list[dict[str, Any]] = [
    {},
    {"limit": 0},
    {"limit": -1},
    {"limit": 1},
    {"limit": 3},
    {"filter": {"source": "loop"}},
    {"filter": {"source": "loop"}, "limit": 1},
    {"filter": {"step": 1}},
    {"filter": {"step": 1.0}},
    {"filter": {"num": 1}},
    {"filter": {"num": "1"}},
    {"filter": {"flag": True}},
    {"filter": {"flag": False}},
    {"filter": {"none": None}},
    {"filter": {"missing": None}},
    {"filter": {"nested": {"a": {"b": [1]}}}},
    {"filter": {"nested": {"a": {"b": [1, None, "x"]}}}},
    {"filter": {"big": 2**60 + 1}},
    {"filter": {"big": 2**60}},
    {"filter": {"big": 2**63 - 1}},
    {"filter": {"neg": -(2**63)}},
    {"filter": {"ratio": 0.1}},
    {"filter": {"f": 1e-300}},
    {"filter": {"note": "héllo ✓ 日本"}},
    {"filter": {"empty": ""}},
    {"filter": {"we'ird [key].$": "v"}},
    {"filter": {"日本": 0}},
    {"filter": {"日本": 0, "source": "update", "missing": None}},
    {"filter": {"source": "loop", "step": 3}},
    {"filter": {"source": None}},
    {"before": 2},
    {"before": 2, "limit": 1},
    {"before": 0},
    {"before": "none"},
    {"before": "empty"},
]


def configurable(thread_id: str, **extra: Any) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, **extra}}


async def seed(saver: BaseCheckpointSaver[Any], thread_id: str, ids: list[str]) -> None:
    """Checkpoints in the root namespace and a subgraph's, interleaved, with writes."""
    parents: dict[str, RunnableConfig] = {}
    for n, metadata in enumerate(METADATAS):
        for ns in ("", SUB):
            checkpoint = empty_checkpoint()
            checkpoint["id"] = ids[2 * n + (ns == SUB)]
            config = parents.get(ns, configurable(thread_id, checkpoint_ns=ns))
            done = await saver.aput(config, checkpoint, {**metadata, "ns": ns}, {})  # type: ignore[arg-type]
            parents[ns] = done
            await saver.aput_writes(
                done,
                [("trail", f"w{n}"), ("__error__", f"err{n}"), ("other", {"n": n})],
                task_id=f"task{n}",
            )
            await saver.aput_writes(
                done,
                [("__interrupt__", [f"int{n}"]), ("__resume__", [f"r{n}"])],
                task_id=f"ask{n}",
            )


def shown(found: Any) -> Any:
    if found is None:
        return None
    # InMemorySaver echoes the caller's config on a read by id, without a namespace if
    # the caller named none.
    configurable = {"checkpoint_ns": "", **found.config["configurable"]}
    return (
        configurable,
        found.parent_config,
        dict(found.metadata),
        found.checkpoint["id"],
        found.pending_writes,
    )


async def observe(saver: BaseCheckpointSaver[Any], thread_id: str, ids: list[str]) -> list[Any]:
    seen: list[Any] = []
    for ns in (None, "", SUB):
        extra = {} if ns is None else {"checkpoint_ns": ns}
        for query in QUERIES:
            if ns is None and query.get("limit", 0) > 0:
                # Across namespaces the order is not part of the contract, so neither is
                # which checkpoints a limit keeps.
                continue
            kwargs = dict(query)
            if "before" in kwargs:
                b = kwargs["before"]
                kwargs["before"] = (
                    configurable(thread_id)
                    if b == "none"
                    else configurable(thread_id, checkpoint_id="")
                    if b == "empty"
                    else configurable(thread_id, checkpoint_ns=ns or "", checkpoint_id=ids[b])
                )
            listed = [
                shown(t) async for t in saver.alist(configurable(thread_id, **extra), **kwargs)
            ]
            if ns is None:
                listed.sort(key=lambda t: (t[0]["checkpoint_ns"], t[3]))
            seen.append((ns, repr(query), listed))
        seen.append((ns, "latest", shown(await saver.aget_tuple(configurable(thread_id, **extra)))))
        # An empty id names none: the latest, as LangGraph's savers read it.
        for checkpoint_id in (ids[3], ids[4], "missing", ""):
            seen.append(
                (
                    ns,
                    checkpoint_id,
                    shown(
                        await saver.aget_tuple(
                            configurable(thread_id, checkpoint_id=checkpoint_id, **extra)
                        )
                    ),
                )
            )
            named = configurable(thread_id, checkpoint_id=checkpoint_id, **extra)
            listed = [shown(t) async for t in saver.alist(named)]
            if ns is None:
                listed.sort(key=lambda t: (t[0]["checkpoint_ns"], t[3]))
            seen.append((ns, "list " + checkpoint_id, listed))
    return seen


@every_configuration
async def test_reads_match_in_memory_saver(
    cold_backend: str, hot: bool, mode: WriteMode | None, open_tiers: OpenBackends
) -> None:
    thread_id = f"diff-list-{uuid.uuid4().hex}"
    ids = [str(uuid6(clock_seq=n)) for n in range(2 * len(METADATAS))]
    memory = InMemorySaver()
    await seed(memory, thread_id, ids)
    want = await observe(memory, thread_id, ids)
    async with open_tiers(cold_backend, hot=hot, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        await seed(saver, thread_id, ids)
        got = await observe(saver, thread_id, ids)
        diffs = [f"{w[:2]} {d}" for g, w in zip(got, want, strict=True) if (d := difference(g, w))]
        assert not diffs, "\n".join(diffs)
        if hot:
            await saver.aflush(thread_id)
            assert backends.hot_checkpoints is not None
            await backends.hot_checkpoints._client.flushall()
            fresh = TieredCheckpointSaver.from_backends(backends)
            got = await observe(fresh, thread_id, ids)
            diffs = [
                f"{w[:2]} {d}" for g, w in zip(got, want, strict=True) if (d := difference(g, w))
            ]
            assert not diffs, "\n".join(diffs)


@pytest.mark.parametrize("mode", [WriteMode.WRITE_THROUGH, WriteMode.WRITE_BEHIND])
async def test_programs_read_back_from_the_cold_tier_match_in_memory_saver(
    cold_backend: str, mode: WriteMode, make_settings: Callable[..., Settings]
) -> None:
    """Each program of the differential tests, then Redis losing everything once the
    thread is flushed: another process reads the thread from the cold tier alone."""
    settings = make_settings(cold_backend, hot=True, state_write_mode=mode)
    found: list[str] = []
    async with backends_for(settings) as backends, backends_for(settings) as others:
        saver = TieredCheckpointSaver.from_backends(backends)
        assert backends.hot_checkpoints is not None
        # One at a time: FLUSHALL would pull the cache from under a program still running.
        for program, steps in PROGRAMS.items():
            run = Run(saver, "sync", sync=False)
            await steps(run)
            await saver.aflush(run.thread_id)
            await backends.hot_checkpoints._client.flushall()
            run.other = TieredCheckpointSaver.from_backends(others)
            await run.observe_other()
            want = await expected(program, "sync", sync=False, flushes=False)
            if (d := difference(run.seen, want)) is not None:
                found.append(f"{program}: {d}")
    assert not found, "\n".join(found)


@every_configuration
async def test_a_run_from_an_empty_checkpoint_id_goes_on_from_the_latest(
    cold_backend: str, hot: bool, mode: WriteMode | None, open_tiers: OpenBackends
) -> None:
    """`checkpoint_id: ""` (as a client sends a field it leaves blank) names no checkpoint:
    the state shown and the run that follows are the thread's latest, not a new thread's."""

    async def states(saver: BaseCheckpointSaver[Any]) -> list[Any]:
        graph = counting(saver)
        thread_id = f"diff-empty-id-{uuid.uuid4().hex}"
        await graph.ainvoke({"n": 1, "trail": []}, configurable(thread_id))
        blank = configurable(thread_id, checkpoint_id="")
        shown = (await graph.aget_state(blank)).values
        done = await graph.ainvoke({"trail": ["again"]}, blank)
        return [shown, done]

    want = await states(InMemorySaver())
    assert want[0] == {"n": 4, "trail": ["inc1", "dbl2"]}
    async with open_tiers(cold_backend, hot=hot, mode=mode) as backends:
        assert await states(TieredCheckpointSaver.from_backends(backends)) == want


@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
@pytest.mark.parametrize(
    ("hot", "mode"), [(False, None), (True, WriteMode.WRITE_BEHIND)], ids=["cold", "flushed"]
)
async def test_whole_floats_read_back_from_the_cold_tier_as_written(
    backend: str, hot: bool, mode: WriteMode | None, open_tiers: OpenBackends
) -> None:
    """A float with no fraction is printed by Cosmos as an integer: 2.0 comes back 2, and
    2.0**60 as the integer of its shortest digits (1152921504606847000), another number.
    Read from the cold tier alone, metadata and filters on it are InMemorySaver's."""
    metadata: Any = {"whole": 2.0, "huge": 2.0**60, "neg": -(2.0**55), "in": [3.0]}
    filters: list[dict[str, Any]] = [{"huge": 2.0**60}, {"huge": 2**60}, {"neg": -(2**55)}]
    thread_id = f"diff-floats-{uuid.uuid4().hex}"
    memory = InMemorySaver()
    await memory.aput(configurable(thread_id, checkpoint_ns=""), empty_checkpoint(), metadata, {})
    async with open_tiers(backend, hot=hot, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        await saver.aput(
            configurable(thread_id, checkpoint_ns=""), empty_checkpoint(), metadata, {}
        )
        if backends.hot_checkpoints is not None:
            await saver.aflush(thread_id)
            await backends.hot_checkpoints._client.flushall()
            saver = TieredCheckpointSaver.from_backends(backends)
        found = await saver.aget_tuple(configurable(thread_id))
        assert found is not None
        # Compared by repr: `==` holds 2 and 2.0 the same.
        assert {k: repr(v) for k, v in found.metadata.items()} == {
            k: repr(v) for k, v in metadata.items()
        }
        for query in filters:
            got = [t async for t in saver.alist(configurable(thread_id), filter=query)]
            want = [t async for t in memory.alist(configurable(thread_id), filter=query)]
            assert len(got) == len(want) == 1, query


BOOL_NUMBER_METADATAS: list[dict[str, Any]] = [
    {"v": True},
    {"v": 1},
    {"v": 1.0},
    {"v": False},
    {"v": 0},
    {"v": -0.0},
    {"v": 2},
    {"v": "1"},
    {"v": None},
    {"v": [True, 0]},
    {"v": [1, False]},
    {"v": {"x": 1.0}},
    {"v": {"x": True}},
]


@every_configuration
async def test_bool_and_number_filters_match_as_python_compares(
    cold_backend: str, hot: bool, mode: WriteMode | None, open_tiers: OpenBackends
) -> None:
    """InMemorySaver filters with `==`, where True == 1 == 1.0 and False == 0 == -0.0, also
    inside lists and objects; JSON (Cosmos SQL, jsonb) holds a boolean and a number apart."""
    thread_id = f"diff-bool-number-{uuid.uuid4().hex}"
    memory = InMemorySaver()
    async with open_tiers(cold_backend, hot=hot, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        for n, metadata in enumerate(BOOL_NUMBER_METADATAS):
            checkpoint = empty_checkpoint()
            checkpoint["id"] = str(uuid6(clock_seq=n))
            for each in (memory, saver):
                await each.aput(configurable(thread_id, checkpoint_ns=""), checkpoint, metadata, {})  # type: ignore[arg-type]
        diffs: list[str] = []
        for query in [*BOOL_NUMBER_METADATAS, {"v": 1, "absent": None}]:
            for limit in (None, 1):
                got, want = [
                    [
                        t.checkpoint["id"]
                        async for t in each.alist(
                            configurable(thread_id), filter=query, limit=limit
                        )
                    ]
                    for each in (saver, memory)
                ]
                if got != want:
                    diffs.append(f"{query} limit={limit}: saver {got} != in-memory {want}")
        assert not diffs, "\n".join(diffs)
