"""DeltaChannel state in graph shapes beyond one linear node, on every backend and mode,
against LangGraph's InMemorySaver for the same calls: parallel branches writing the
channel in one step, a persistent subgraph (its own namespace) with its own DeltaChannel,
questions asked in the middle of a snapshot period and answered (late too, after the
thread moved on), answers carrying updates, `Overwrite`, forks from older checkpoints,
two channels at different frequencies, long runs whose flush crosses snapshots, values
large enough to be chunked; then prune, copy and delete_for_runs on such a thread, Redis
evicting any one key of it, and Cosmos reading lineage across many pages. Every
checkpoint of every namespace rebuilds the same channel history, warm and cold."""

from __future__ import annotations

import operator
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, Overwrite, interrupt

from state.cold import cosmos_checkpoints, cosmos_io, cosmos_maintenance
from state.hot.redis_client import create_redis_client
from state.settings import Settings
from tests.integration.delta_graph import (
    STACK_IDS,
    STACKS,
    append,
    delta_graph,
    open_stack,
    settings_for,
    thread_config,
)


def spread(variants: list[tuple[Any, ...]]) -> list[Any]:
    """Every stack with one variant each, in turn: every stack and every variant runs, not
    their product (the suite's time; a variant's effect does not depend on the stack)."""
    cases = []
    for index, (stack, stack_id) in enumerate(zip(STACKS, STACK_IDS, strict=True)):
        variant = variants[index % len(variants)]
        cases.append(pytest.param(*stack, *variant, id="-".join([stack_id, *map(str, variant)])))
    return cases


def shaped_graph(saver: BaseCheckpointSaver[Any], frequency: int, size: int) -> Any:
    # Built at run time: the channels' snapshot frequency is a parameter.
    channel = DeltaChannel(append, snapshot_frequency=frequency)
    Notes = TypedDict("Notes", {"notes": Annotated[list[str], channel]}, total=False)  # type: ignore[misc]  # noqa: UP013
    Conversation = TypedDict(  # type: ignore[misc]  # noqa: UP013
        "Conversation", {"messages": Annotated[list[str], channel]}, total=False
    )

    sub = StateGraph(Notes)
    sub.add_node("first", lambda s: {"notes": [f"n{len(s.get('notes', []))}" + "s" * size]})
    sub.add_node("second", lambda s: {"notes": [f"m{len(s.get('notes', []))}"]})
    sub.add_edge(START, "first")
    sub.add_edge("first", "second")
    sub.add_edge("second", END)
    notes = sub.compile(checkpointer=True)

    def left(state: dict[str, Any]) -> dict[str, Any]:
        return {"messages": [f"left{len(state['messages'])}" + "l" * size]}

    def right(state: dict[str, Any]) -> dict[str, Any]:
        return {"messages": [f"right{len(state['messages'])}", "r2"]}

    def ask(state: dict[str, Any]) -> dict[str, Any]:
        if len(state["messages"]) % 2 == 0:
            answer = interrupt("go on?")
            return {"messages": [f"answer:{answer}"]}
        return {"messages": ["no question"]}

    def summarize(state: dict[str, Any]) -> dict[str, Any]:
        out = notes.invoke({"notes": [f"from{len(state['messages'])}"]})
        return {"messages": [f"notes{len(out['notes'])}"]}

    graph = StateGraph(Conversation)
    graph.add_node("left", left)
    graph.add_node("right", right)
    graph.add_node("ask", ask)
    graph.add_node("summarize", summarize)
    graph.add_edge(START, "left")
    graph.add_edge(START, "right")
    graph.add_edge(["left", "right"], "ask")
    graph.add_edge("ask", "summarize")
    graph.add_edge("summarize", END)
    return graph.compile(checkpointer=saver)


def _value(value: Any) -> Any:
    # A seed may be a `_DeltaSnapshot`: compare what it holds.
    return getattr(value, "value", value)


async def histories(saver: BaseCheckpointSaver[Any], config: RunnableConfig) -> list[Any]:
    """Every checkpoint of the thread (every namespace, newest first per namespace) with the
    history of both delta channels, in a form free of ids."""
    found: dict[str, list[Any]] = {}
    async for item in saver.alist(
        {"configurable": {"thread_id": config["configurable"]["thread_id"]}}
    ):
        ns = item.config["configurable"]["checkpoint_ns"].split(":")[0]
        history = await saver.aget_delta_channel_history(
            config=item.config, channels=["messages", "notes", "facts"]
        )
        found.setdefault(ns, []).append(
            (
                item.metadata.get("step"),
                {
                    ch: (
                        _value(entry.get("seed")),
                        [(w[1], w[2]) for w in entry["writes"]],
                    )
                    for ch, entry in history.items()
                },
            )
        )
    return sorted(found.items())


def without_ids(result: dict[str, Any]) -> dict[str, Any]:
    asked = [i.value for i in result.get("__interrupt__", [])]
    return {**result, "__interrupt__": asked}


async def states(graph: Any, config: RunnableConfig) -> list[Any]:
    found = []
    async for snapshot in graph.aget_state_history(config):
        at = await graph.aget_state(snapshot.config, subgraphs=True)
        tasks = [
            (t.name, getattr(t.state, "values", None), [i.value for i in t.interrupts])
            for t in at.tasks
        ]
        found.append((at.values, at.next, at.metadata["step"], tasks))
    return found


@pytest.mark.parametrize(("backend", "redis", "mode", "frequency"), spread([(1,), (3,), (1000,)]))
async def test_shaped_graph_rebuilds_like_in_memory_saver(
    backend: str, redis: bool, mode: str, frequency: int, stack_env: dict[str, str]
) -> None:
    await shaped_scenario(settings_for(stack_env, backend, redis, mode), redis, frequency)


@pytest.mark.parametrize(
    ("redis", "mode", "frequency"), [(False, "write-through", 3), (True, "write-behind", 1000)]
)
async def test_cosmos_lineage_read_across_many_pages(
    redis: bool,
    mode: str,
    frequency: int,
    stack_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Cosmos history walk and maintenance read a namespace's lineage page by page (a
    thousand rows each): with pages of two rows, every chain crosses page boundaries."""
    monkeypatch.setattr(cosmos_checkpoints, "BULK_PAGE_SIZE", 2)
    monkeypatch.setattr(cosmos_maintenance, "BULK_PAGE_SIZE", 2)
    pages = cosmos_io.PartitionIO.pages
    longest = [0]

    async def counted(*args: Any, **kwargs: Any) -> AsyncIterator[list[Any]]:
        read = 0
        async for page in pages(*args, **kwargs):
            read += 1
            longest[0] = max(longest[0], read)
            yield page

    monkeypatch.setattr(cosmos_io.PartitionIO, "pages", counted)
    await shaped_scenario(settings_for(stack_env, "cosmos", redis, mode), redis, frequency)
    assert longest[0] > 5  # the emulator pages as the service does


async def shaped_scenario(settings: Settings, redis: bool, frequency: int) -> None:
    reference_saver = InMemorySaver()
    reference = shaped_graph(reference_saver, frequency, 20 * 1024)
    ref_cfg = thread_config("ref")
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = shaped_graph(saver, frequency, 20 * 1024)
        cfg = thread_config()
        thread_id = cfg["configurable"]["thread_id"]

        async def both(payload: Any, ours: RunnableConfig, theirs: RunnableConfig) -> None:
            got = await graph.ainvoke(payload, ours)
            want = await reference.ainvoke(payload, theirs)
            assert without_ids(got) == without_ids(want)

        for n in range(5):
            await both({"messages": [f"user {n}"]}, cfg, ref_cfg)
            if (await reference.aget_state(ref_cfg)).next:
                await both(Command(resume=f"yes {n}"), cfg, ref_cfg)
        assert await states(graph, cfg) == await states(reference, ref_cfg)
        assert await histories(saver, cfg) == await histories(reference_saver, ref_cfg)

        # A fork from an older checkpoint, then the run goes on from it.
        ours = [s.config async for s in graph.aget_state_history(cfg)]
        theirs = [s.config async for s in reference.aget_state_history(ref_cfg)]
        fork = await graph.aupdate_state(ours[6], {"messages": ["forked"]}, as_node="left")
        ref_fork = await reference.aupdate_state(
            theirs[6], {"messages": ["forked"]}, as_node="left"
        )
        await both(None, fork, ref_fork)
        if (await reference.aget_state(ref_cfg)).next:
            await both(Command(resume="fork"), cfg, ref_cfg)
        await both({"messages": ["after"]}, cfg, ref_cfg)
        assert await states(graph, cfg) == await states(reference, ref_cfg)
        assert await histories(saver, cfg) == await histories(reference_saver, ref_cfg)

        if redis:
            await saver.aflush(thread_id)
            client = create_redis_client(settings)
            try:
                await client.flushall()
            finally:
                await client.aclose()
            assert await states(graph, cfg) == await states(reference, ref_cfg)
            assert await histories(saver, cfg) == await histories(reference_saver, ref_cfg)
            await both({"messages": ["after loss"]}, cfg, ref_cfg)
            if (await reference.aget_state(ref_cfg)).next:
                await both(Command(resume="loss"), cfg, ref_cfg)
            assert await states(graph, cfg) == await states(reference, ref_cfg)
            assert await histories(saver, cfg) == await histories(reference_saver, ref_cfg)


async def latest(graph: Any, config: RunnableConfig) -> Any:
    at = await graph.aget_state(config, subgraphs=True)
    tasks = [(t.name, getattr(t.state, "values", None)) for t in at.tasks]
    return at.values, at.next, tasks


@pytest.mark.parametrize("maintenance", ["prune", "copy", "delete_for_runs"])
@pytest.mark.parametrize(
    ("backend", "redis", "mode", "frequency", "size"), spread([(3, 100), (1000, 20 * 1024)])
)
async def test_maintenance_on_a_forked_thread_with_a_subgraph(
    backend: str,
    redis: bool,
    mode: str,
    frequency: int,
    size: int,
    maintenance: str,
    stack_env: dict[str, str],
) -> None:
    settings = settings_for(stack_env, backend, redis, mode)
    await maintenance_scenario(settings, redis, frequency, size, maintenance)


@pytest.mark.parametrize("maintenance", ["prune", "copy", "delete_for_runs"])
async def test_cosmos_maintenance_across_many_pages(
    maintenance: str, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cosmos maintenance reads lineage page by page: with pages of two rows, every chain it
    keeps crosses page boundaries."""
    monkeypatch.setattr(cosmos_checkpoints, "BULK_PAGE_SIZE", 2)
    monkeypatch.setattr(cosmos_maintenance, "BULK_PAGE_SIZE", 2)
    settings = settings_for(stack_env, "cosmos", True, "write-behind")
    await maintenance_scenario(settings, True, 1000, 20 * 1024, maintenance)


async def maintenance_scenario(
    settings: Settings, redis: bool, frequency: int, size: int, maintenance: str
) -> None:
    reference = shaped_graph(InMemorySaver(), frequency, size)
    ref_cfg = thread_config("ref")
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = shaped_graph(saver, frequency, size)
        cfg = thread_config()
        thread_id = cfg["configurable"]["thread_id"]
        runs: list[str] = []

        async def both(payload: Any, ours: RunnableConfig, theirs: RunnableConfig) -> None:
            run_id = str(uuid.uuid4())
            runs.append(run_id)
            # The checkpoints' metadata carries the run id (LangGraph copies `configurable`).
            run_cfg: RunnableConfig = {"configurable": {**ours["configurable"], "run_id": run_id}}
            got = await graph.ainvoke(payload, run_cfg)
            want = await reference.ainvoke(payload, theirs)
            assert without_ids(got) == without_ids(want)

        async def step(n: int, ours: RunnableConfig, theirs: RunnableConfig) -> None:
            await both({"messages": [f"user {n}"]}, ours, theirs)
            if (await reference.aget_state(theirs)).next:
                await both(Command(resume=f"yes {n}"), ours, theirs)

        for n in range(4):
            await step(n, cfg, ref_cfg)
        ours = [s.config async for s in graph.aget_state_history(cfg)]
        theirs = [s.config async for s in reference.aget_state_history(ref_cfg)]
        fork = await graph.aupdate_state(ours[9], {"messages": ["forked"]}, as_node="left")
        ref_fork = await reference.aupdate_state(
            theirs[9], {"messages": ["forked"]}, as_node="left"
        )
        await both(None, fork, ref_fork)
        for n in range(4, 6):
            await step(n, cfg, ref_cfg)
        # Paused on a question, the branches' writes stored, when maintenance comes.
        await both({"messages": ["paused", "with two messages"]}, cfg, ref_cfg)
        assert (await reference.aget_state(ref_cfg)).next
        want = await latest(reference, ref_cfg)
        assert await latest(graph, cfg) == want

        target = cfg
        if maintenance == "prune":
            await saver.aprune([thread_id], strategy="keep_latest")
        elif maintenance == "copy":
            target = thread_config("copy")
            await saver.acopy_thread(thread_id, target["configurable"]["thread_id"])
        else:
            # The runs before the fork: the fork's chain rebuilds from their writes.
            before = len([c async for c in saver.alist(cfg)])
            await saver.adelete_for_runs(runs[:4])
            assert len([c async for c in saver.alist(cfg)]) < before
        assert await latest(graph, target) == want
        if redis:
            await saver.aflush(thread_id)
            client = create_redis_client(settings)
            try:
                await client.flushall()
            finally:
                await client.aclose()
            assert await latest(graph, target) == want
        await both(Command(resume="after"), target, ref_cfg)
        for n in range(6, 8):
            await step(n, target, ref_cfg)
        assert await latest(graph, target) == await latest(reference, ref_cfg)


def overwriting_graph(saver: BaseCheckpointSaver[Any], frequency: int) -> Any:
    """Parallel branches appending, every third turn one of them replacing the list."""
    channel = DeltaChannel(append, snapshot_frequency=frequency)
    Conversation = TypedDict(  # type: ignore[misc]  # noqa: UP013
        "Conversation", {"messages": Annotated[list[str], channel]}, total=False
    )

    def left(state: dict[str, Any]) -> dict[str, Any]:
        n = len(state["messages"])
        if n % 3 == 0:
            return {"messages": Overwrite([f"reset{n}"])}
        return {"messages": [f"left{n}"]}

    graph = StateGraph(Conversation)
    graph.add_node("left", left)
    graph.add_node("right", lambda s: {"messages": [f"right{len(s['messages'])}"]})
    graph.add_edge(START, "left")
    graph.add_edge(START, "right")
    graph.add_edge("left", END)
    graph.add_edge("right", END)
    return graph.compile(checkpointer=saver)


@pytest.mark.parametrize("frequency", [1, 3])
@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_write_behind_backlog_crossing_snapshots_flushes_to_the_same_history(
    backend: str, frequency: int, stack_env: dict[str, str]
) -> None:
    settings = settings_for(stack_env, backend, True, "write-behind")
    reference_saver = InMemorySaver()
    reference = shaped_graph(reference_saver, frequency, 20 * 1024)
    ref_other = overwriting_graph(reference_saver, frequency)
    ref_cfg, ref_other_cfg = thread_config("ref"), thread_config("ref")
    async with open_stack(settings) as opened:
        saver = opened.saver
        flusher = opened.backends.flusher
        assert flusher is not None and saver.cache is not None
        await flusher.stop()
        graph = shaped_graph(saver, frequency, 20 * 1024)
        other = overwriting_graph(saver, frequency)
        cfg, other_cfg = thread_config(), thread_config()

        for n in range(7):
            got = await other.ainvoke({"messages": [f"user {n}"]}, other_cfg)
            assert got == await ref_other.ainvoke({"messages": [f"user {n}"]}, ref_other_cfg)
            for payload in ({"messages": [f"user {n}"]}, Command(resume=f"yes {n}")):
                got = await graph.ainvoke(payload, cfg, durability="async")
                want = await reference.ainvoke(payload, ref_cfg)
                assert without_ids(got) == without_ids(want)

        async def compare() -> None:
            assert await states(graph, cfg) == await states(reference, ref_cfg)
            assert await histories(saver, cfg) == await histories(reference_saver, ref_cfg)
            assert await states(other, other_cfg) == await states(ref_other, ref_other_cfg)
            assert await histories(saver, other_cfg) == await histories(
                reference_saver, ref_other_cfg
            )

        await compare()
        for config in (cfg, other_cfg):
            thread_id = config["configurable"]["thread_id"]
            await saver.aflush(thread_id)
            await saver.cache.invalidate(thread_id)
        await compare()


def two_channels_graph(
    saver: BaseCheckpointSaver[Any], size: int, frequencies: tuple[int, int] = (4, 2)
) -> Any:
    """Two DeltaChannels at different frequencies, one written only every third turn, and
    a node that asks a question every other turn between the two writers."""
    Conversation = TypedDict(  # type: ignore[misc]  # noqa: UP013
        "Conversation",
        {
            "messages": Annotated[
                list[str], DeltaChannel(append, snapshot_frequency=frequencies[0])
            ],
            "facts": Annotated[list[str], DeltaChannel(append, snapshot_frequency=frequencies[1])],
            "turn": int,
        },
        total=False,
    )

    def count(state: dict[str, Any]) -> dict[str, Any]:
        return {"turn": state.get("turn", 0) + 1, "messages": [f"c{state.get('turn', 0)}"]}

    def ask(state: dict[str, Any]) -> dict[str, Any]:
        if state["turn"] % 2 == 0:
            return {"messages": [f"answer:{interrupt('why?')}"]}
        return {}

    def learn(state: dict[str, Any]) -> dict[str, Any]:
        if state["turn"] % 3 == 0:
            return {"facts": [f"fact{len(state.get('facts', []))}" + "f" * size]}
        return {}

    graph = StateGraph(Conversation)
    graph.add_node("count", count)
    graph.add_node("ask", ask)
    graph.add_node("learn", learn)
    graph.add_edge(START, "count")
    graph.add_edge("count", "ask")
    graph.add_edge("ask", "learn")
    graph.add_edge("learn", END)
    return graph.compile(checkpointer=saver)


@pytest.mark.parametrize(
    ("backend", "redis", "mode", "size", "frequencies"),
    spread([(10, (4, 2)), (20 * 1024, (4, 2)), (10, (1000, 1))]),
)
async def test_a_channel_written_rarely_rebuilds_like_in_memory_saver(
    backend: str,
    redis: bool,
    mode: str,
    size: int,
    frequencies: tuple[int, int],
    stack_env: dict[str, str],
) -> None:
    settings = settings_for(stack_env, backend, redis, mode)
    reference_saver = InMemorySaver()
    reference = two_channels_graph(reference_saver, size, frequencies)
    ref_cfg = thread_config("ref")
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = two_channels_graph(saver, size, frequencies)
        cfg = thread_config()
        thread_id = cfg["configurable"]["thread_id"]

        async def both(payload: Any) -> None:
            got = await graph.ainvoke(payload, cfg)
            want = await reference.ainvoke(payload, ref_cfg)
            assert without_ids(got) == without_ids(want)

        for n in range(9):
            await both({"messages": [f"user {n}"]})
            # Sometimes a state update while paused, then the answer.
            if n % 3 == 1 and (await reference.aget_state(ref_cfg)).next:
                await graph.aupdate_state(cfg, {"facts": [f"told {n}"]})
                await reference.aupdate_state(ref_cfg, {"facts": [f"told {n}"]})
            if (await reference.aget_state(ref_cfg)).next:
                # Every other answer carries an update of its own (a write of no task).
                update = {"facts": [f"with answer {n}"]} if n % 4 == 1 else None
                await both(Command(resume=f"because {n}", update=update))
            assert await histories(saver, cfg) == await histories(reference_saver, ref_cfg), n
        assert await states(graph, cfg) == await states(reference, ref_cfg)
        if redis:
            await saver.aflush(thread_id)
            assert saver.cache is not None
            await saver.cache.invalidate(thread_id)
            assert await histories(saver, cfg) == await histories(reference_saver, ref_cfg)
            await both({"messages": ["after"]})
            assert await states(graph, cfg) == await states(reference, ref_cfg)


@pytest.mark.parametrize(
    ("backend", "mode"), [("postgres", "write-through"), ("cosmos", "write-behind")]
)
async def test_redis_evicting_any_one_key_of_the_thread(
    backend: str, mode: str, stack_env: dict[str, str]
) -> None:
    """Redis (an eviction policy that spares keys without a TTL) evicts one key of the
    thread at a time, between runs: every checkpoint still rebuilds like InMemorySaver's."""
    settings = settings_for(stack_env, backend, True, mode)
    reference_saver = InMemorySaver()
    reference = shaped_graph(reference_saver, 3, 20 * 1024)
    ref_cfg = thread_config("ref")
    client = create_redis_client(settings)
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = shaped_graph(saver, 3, 20 * 1024)
        cfg = thread_config()
        thread_id = cfg["configurable"]["thread_id"]

        async def turn(n: int) -> None:
            for payload in ({"messages": [f"user {n}"]}, Command(resume=f"yes {n}")):
                got = await graph.ainvoke(payload, cfg)
                want = await reference.ainvoke(payload, ref_cfg)
                assert without_ids(got) == without_ids(want)

        def kind(key: bytes) -> str:
            """A key's role: the per-period blocks are one kind among them."""
            return re.sub(r":ep:[0-9a-f]+$", ":ep:block", key.decode())

        try:
            await turn(0)
            evicted: list[str] = []
            # Each kind of key once, a block twice (the blocks of one thread differ only in
            # their period): repeating a kind re-ran the same case at the suite's expense.
            for n in range(1, 8):
                await saver.aflush(thread_id)
                keys = sorted(
                    [
                        key
                        async for key in client.scan_iter(match=f"*{thread_id}*")
                        if await client.ttl(key) >= 0
                    ]
                )
                fresh = [
                    key
                    for key in keys
                    if evicted.count(kind(key)) < (2 if kind(key).endswith(":ep:block") else 1)
                ]
                if not fresh:
                    break
                key = fresh[0]
                evicted.append(kind(key))
                await client.delete(key)
                assert await states(graph, cfg) == await states(reference, ref_cfg), key
                assert await histories(saver, cfg) == await histories(reference_saver, ref_cfg), key
                await turn(n)
        finally:
            await client.aclose()
        assert {key.split(":", 2)[2] for key in evicted} == {
            "cp-namespaces",
            "cp4:",
            "cp4:summarize",
            "ep-cached",
            "ep:block",
        }


def looping_graph(saver: BaseCheckpointSaver[Any], frequency: int, steps: int) -> Any:
    """One run of many steps (a flush at its end carries a backlog across snapshots)."""
    Conversation = TypedDict(  # type: ignore[misc]  # noqa: UP013
        "Conversation",
        {"messages": Annotated[list[str], DeltaChannel(append, snapshot_frequency=frequency)]},
    )

    def reply(state: dict[str, Any]) -> dict[str, Any]:
        n = len(state["messages"])
        return {"messages": [f"a{n}" + "x" * (20 * 1024 if n % 7 == 0 else 10), f"b{n}"]}

    graph = StateGraph(Conversation)
    graph.add_node("reply", reply)
    graph.add_node("again", lambda s: {"messages": [f"c{len(s['messages'])}"]})
    graph.add_edge(START, "reply")
    graph.add_edge("reply", "again")
    graph.add_conditional_edges(
        "again", lambda s: END if len(s["messages"]) >= 3 * steps else "reply", ["reply", END]
    )
    return graph.compile(checkpointer=saver)


@pytest.mark.parametrize(("backend", "redis", "mode", "frequency"), spread([(3,), (1000,)]))
async def test_a_long_run_rebuilds_like_in_memory_saver(
    backend: str, redis: bool, mode: str, frequency: int, stack_env: dict[str, str]
) -> None:
    settings = settings_for(stack_env, backend, redis, mode)
    reference_saver = InMemorySaver()
    reference = looping_graph(reference_saver, frequency, 40)
    ref_cfg = thread_config("ref")
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = looping_graph(saver, frequency, 40)
        cfg = thread_config()
        thread_id = cfg["configurable"]["thread_id"]
        limit: RunnableConfig = {"recursion_limit": 200}
        for n in range(2):
            got = await graph.ainvoke({"messages": [f"user {n}"]}, {**cfg, **limit})
            assert got == await reference.ainvoke({"messages": [f"user {n}"]}, {**ref_cfg, **limit})
        assert await histories(saver, cfg) == await histories(reference_saver, ref_cfg)
        if saver.cache is not None:
            await saver.aflush(thread_id)
            await saver.cache.invalidate(thread_id)
            assert await histories(saver, cfg) == await histories(reference_saver, ref_cfg)


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_a_delta_thread_continues_as_a_plain_list(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    """A graph that switches its DeltaChannel back to a plain reducer list rebuilds the list
    from the delta history (LangGraph asks it for a plain list with nothing stored)."""
    Plain = TypedDict(  # type: ignore[misc]  # noqa: UP013
        "Plain", {"messages": Annotated[list[str], operator.add]}
    )

    def plain_graph(saver: BaseCheckpointSaver[Any]) -> Any:
        builder = StateGraph(Plain)
        builder.add_node("reply", lambda s: {"messages": [f"a{len(s['messages'])}"]})
        builder.add_edge(START, "reply")
        builder.add_edge("reply", END)
        return builder.compile(checkpointer=saver)

    reference = InMemorySaver()
    ref_cfg = thread_config("ref")
    async with open_stack(settings_for(stack_env, backend, redis, mode)) as opened:
        cfg = thread_config()
        for graph in (delta_graph, plain_graph):
            for n in range(4):
                got = await graph(opened.saver).ainvoke({"messages": [f"user {n}"]}, cfg)
                want = await graph(reference).ainvoke({"messages": [f"user {n}"]}, ref_cfg)
                assert got == want, n
            assert await states(plain_graph(opened.saver), cfg) == await states(
                plain_graph(reference), ref_cfg
            )


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_an_older_question_answered_after_the_thread_moved_on(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    """A question left unanswered, the thread moved on by new input, then the old question
    answered at its own checkpoint: every checkpoint, and the next run from the latest,
    rebuild like InMemorySaver's."""
    settings = settings_for(stack_env, backend, redis, mode)
    reference_saver = InMemorySaver()
    reference = two_channels_graph(reference_saver, 10, (4, 2))
    ref_cfg = thread_config("ref")
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = two_channels_graph(saver, 10, (4, 2))
        cfg = thread_config()

        async def both(payload: Any, ours: RunnableConfig, theirs: RunnableConfig) -> None:
            got = await graph.ainvoke(payload, ours)
            want = await reference.ainvoke(payload, theirs)
            assert without_ids(got) == without_ids(want)

        await both({"messages": ["one"]}, cfg, ref_cfg)
        await both({"messages": ["two"]}, cfg, ref_cfg)  # asks
        asked = (await graph.aget_state(cfg)).config
        ref_asked = (await reference.aget_state(ref_cfg)).config
        assert (await reference.aget_state(ref_asked)).next
        await both({"messages": ["three"]}, cfg, ref_cfg)
        await both({"messages": ["four"]}, cfg, ref_cfg)
        await both(Command(resume="late"), asked, ref_asked)
        for n in range(3):
            await both({"messages": [f"then {n}"]}, cfg, ref_cfg)
            if (await reference.aget_state(ref_cfg)).next:
                await both(Command(resume=f"now {n}"), cfg, ref_cfg)
        assert await states(graph, cfg) == await states(reference, ref_cfg)
        assert await histories(saver, cfg) == await histories(reference_saver, ref_cfg)
