"""Differential tests: LangGraph programs see the same thing through the saver as through
LangGraph's own `InMemorySaver`.

Each program runs once against `InMemorySaver` and once against the saver on real servers
(each cold backend; Redis write-through, Redis write-behind, cold only; and synchronously
through `open_sync`), in each durability, and everything LangGraph exposes is compared:
results, `get_state` (with subgraphs), `get_state_history`, the saver's `list` with
`filter`/`before`/`limit`. Only what legitimately differs is normalised: checkpoint,
task, run and interrupt ids (renumbered in order of appearance), timestamps and channel
version strings, and orders that are races or not part of the contract. In write-behind
each step is observed before the thread's backlog is flushed (reads merge the unflushed
tail), also through another process's saver, and the thread again after `aflush`;
otherwise the other process reads the thread at the end. One program has two processes
take turns running a thread. The programs of one configuration and durability run at once,
each on a thread of its own.
"""

from __future__ import annotations

import asyncio
import operator
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypedDict

import pytest
import pytest_asyncio
from langchain_core.runnables import RunnableConfig
from langgraph._internal._constants import RESUME
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import WRITES_IDX_MAP, BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, Interrupt, Send, StateSnapshot, StateUpdate, interrupt

from state.checkpoint import TieredCheckpointSaver
from state.factory import backends_for
from state.settings import Settings, WriteMode
from tests.integration.delta_graph import append

DURABILITIES = ["exit", "async", "sync"]
CONFIGS = [
    (backend, hot, mode)
    for backend in ("postgres", "cosmos")
    for hot, mode in (
        (True, WriteMode.WRITE_THROUGH),
        (True, WriteMode.WRITE_BEHIND),
        (False, None),
    )
]
CONFIG_IDS = [
    f"{b}-{'cold' if not h else 'wt' if m is WriteMode.WRITE_THROUGH else 'wb'}"
    for b, h, m in CONFIGS
]

# ----------------------------------------------------------------- normalisation

_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\b[0-9a-f]{32}\b")
_DROPPED = {"created_at", "ts", "channel_versions", "versions_seen", "updated_channels"}


class Ids:
    """Renumbers ids in order of first appearance: two runs of one program that saw the
    same things name them alike."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            return _ID.sub(lambda m: self.seen.setdefault(m[0], f"<id{len(self.seen)}>"), value)
        if isinstance(value, dict):
            return {self(k): self(v) for k, v in value.items() if k not in _DROPPED}
        if isinstance(value, list | tuple):
            return [self(v) for v in value]
        if isinstance(value, Interrupt):
            return ("Interrupt", self(value.value), self(value.id))
        if isinstance(value, BaseException):
            return f"{type(value).__name__}({value})"
        return value


def snapshot(ids: Ids, state: StateSnapshot) -> dict[str, Any]:
    return ids(
        {
            "values": state.values,
            "next": state.next,
            # InMemorySaver echoes the caller's whole config on a read by id.
            "config": state.config["configurable"],
            "metadata": state.metadata,
            "parent_config": state.parent_config,
            "tasks": [
                {
                    "id": t.id,
                    "name": t.name,
                    "path": t.path,
                    "error": t.error,
                    "interrupts": [(i.value, i.id) for i in t.interrupts],
                    "state": snapshot(ids, t.state)
                    if isinstance(t.state, StateSnapshot)
                    else t.state,
                    "result": t.result,
                }
                for t in state.tasks
            ],
            "interrupts": [(i.value, i.id) for i in state.interrupts],
        }
    )


def pending_writes(writes: list[tuple[str, str, Any]]) -> list[tuple[str, str, Any]]:
    """A checkpoint's pending writes, in no order (order among tasks is not part of the
    contract), without a finished task's `__resume__` list: LangGraph saves the last one
    with the task's results in one call, which replaces nothing in the saver as in
    LangGraph's Postgres saver (test_a_finished_tasks_resume_list_is_its_last below), and
    no run reads it again once the task has results."""
    finished = {task for task, channel, _ in writes if channel not in WRITES_IDX_MAP}
    kept = [w for w in writes if not (w[1] == RESUME and w[0] in finished)]
    return sorted(kept, key=lambda w: repr(w[1:]))


# ----------------------------------------------------------------- drivers


@dataclass
class Run:
    """One program's run on one saver: drives the graph (async, or sync on a worker
    thread) and records what LangGraph shows after each step."""

    saver: BaseCheckpointSaver[Any]
    durability: str
    sync: bool
    other: BaseCheckpointSaver[Any] | None = None
    flushes: bool = False  # write-behind: observe again after `aflush`
    graph: Any = None  # the graph last observed
    thread_id: str = field(default_factory=lambda: f"diff-{uuid.uuid4().hex}")
    seen: list[Any] = field(default_factory=list)
    ids: Ids = field(default_factory=Ids)

    def config(self, **extra: Any) -> RunnableConfig:
        return {"configurable": {"thread_id": self.thread_id, **extra}}

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.sync:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return await fn(*args, **kwargs)

    async def invoke(
        self,
        graph: Any,
        value: Any,
        config: RunnableConfig | None = None,
        *,
        elsewhere: bool = False,
    ) -> Any:
        """`elsewhere`: in another process (`other`), as when a request lands on another
        worker; the next step runs here again."""
        if elsewhere and self.other is not None:
            graph = graph.copy({"checkpointer": self.other})
        fn = graph.invoke if self.sync else graph.ainvoke
        try:
            result = await self._call(
                fn, value, config or self.config(), durability=self.durability
            )
        except Exception as exc:  # what the caller saw is the observation
            result = exc
        if isinstance(result, dict) and "__interrupt__" in result:
            # Parallel tasks' interrupts come back in the order the tasks stopped: a race.
            result["__interrupt__"] = sorted(result["__interrupt__"], key=lambda i: repr(i.value))
        self.seen.append(("invoke", self.ids(result)))
        if elsewhere:
            graph = graph.copy({"checkpointer": self.saver})
        await self.observe(graph, config)
        return result

    async def update(
        self, graph: Any, config: RunnableConfig, values: Any, as_node: str | None = None
    ) -> RunnableConfig:
        fn = graph.update_state if self.sync else graph.aupdate_state
        done: RunnableConfig = await self._call(fn, config, values, as_node=as_node)
        self.seen.append(("update", self.ids(done)))
        await self.observe(graph, None)
        return done

    async def state(self, graph: Any, config: RunnableConfig | None = None) -> StateSnapshot:
        fn = graph.get_state if self.sync else graph.aget_state
        got: StateSnapshot = await self._call(fn, config or self.config(), subgraphs=True)
        return got

    async def history(self, graph: Any, config: RunnableConfig | None = None) -> list[Any]:
        if self.sync:
            return await asyncio.to_thread(
                lambda: list(graph.get_state_history(config or self.config()))
            )
        return [s async for s in graph.aget_state_history(config or self.config())]

    async def history_window(self, graph: Any) -> list[Any]:
        """History filtered, and paged with `before` and `limit`."""
        latest = await self.history(graph)
        kwargs: dict[str, Any] = {"filter": {"source": "loop"}, "limit": 2}
        if len(latest) > 2:
            kwargs["before"] = latest[1].config
        if self.sync:
            return await asyncio.to_thread(
                lambda: list(graph.get_state_history(self.config(), **kwargs))
            )
        return [s async for s in graph.aget_state_history(self.config(), **kwargs)]

    async def listed(
        self,
        config: RunnableConfig | None,
        saver: BaseCheckpointSaver[Any] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        saver = saver or self.saver
        if self.sync:
            return await asyncio.to_thread(lambda: list(saver.list(config, **kwargs)))
        return [t async for t in saver.alist(config, **kwargs)]

    async def observe(self, graph: Any, config: RunnableConfig | None) -> None:
        """Everything LangGraph shows of the thread through the saver that wrote it; in
        write-behind also through another process's (`other`, its own backends) while the
        backlog may be unflushed."""
        self.graph = graph
        await self._observe(graph, config)
        if self.flushes:
            await self.observe_other(config)

    async def observe_flushed(self) -> None:
        if isinstance(self.saver, TieredCheckpointSaver):
            await self.saver.aflush(self.thread_id)
        await self._observe(self.graph, None)

    async def observe_other(self, config: RunnableConfig | None = None) -> None:
        assert self.graph is not None
        await self._observe(self.graph.copy({"checkpointer": self.other or self.saver}), config)

    async def _observe(self, graph: Any, config: RunnableConfig | None) -> None:
        ids = self.ids
        state = await self.state(graph, config)
        history = await self.history(graph)
        root = self.config(checkpoint_ns="")
        tuples = await self.listed(root, graph.checkpointer)
        loops = await self.listed(root, graph.checkpointer, filter={"source": "loop"})
        older = (
            await self.listed(root, graph.checkpointer, before=tuples[1].config, limit=2)
            if len(tuples) > 1
            else []
        )
        self.seen.append(
            {
                "state": snapshot(ids, state),
                "history": [snapshot(ids, s) for s in history],
                "list": [
                    ids(
                        {
                            "config": t.config,
                            "parent": t.parent_config,
                            "metadata": t.metadata,
                            "values": t.checkpoint["channel_values"],
                            "channels": sorted(t.checkpoint["channel_versions"]),
                            "writes": pending_writes(t.pending_writes or []),
                        }
                    )
                    for t in tuples
                ],
                "loops": [ids(t.config) for t in loops],
                "older": [ids(t.config) for t in older],
            }
        )


# ----------------------------------------------------------------- programs


class Fan(TypedDict, total=False):
    items: list[int]
    trail: Annotated[list[str], operator.add]
    total: Annotated[int, operator.add]


def parallel_branches(saver: Any) -> Any:
    g = StateGraph(Fan)
    g.add_node("a", lambda s: {"trail": ["a"], "total": 1})
    g.add_node("b", lambda s: {"trail": ["b"], "total": 10})
    g.add_node("join", lambda s: {"trail": [f"join:{s['total']}"]})
    g.add_edge(START, "a")
    g.add_edge(START, "b")
    g.add_edge(["a", "b"], "join")
    g.add_edge("join", END)
    return g.compile(checkpointer=saver)


async def prog_parallel(run: Run) -> None:
    graph = parallel_branches(run.saver)
    await run.invoke(graph, {"trail": ["in"]})
    await run.invoke(graph, {"trail": ["again"]})


def map_reduce(saver: Any) -> Any:
    g = StateGraph(Fan)
    g.add_node("work", lambda s: {"trail": [f"w{s['items'][0]}"], "total": s["items"][0]})
    g.add_node("reduce", lambda s: {"trail": [f"sum:{s['total']}"]})
    g.add_conditional_edges(
        START, lambda s: [Send("work", {"items": [i]}) for i in s["items"]], ["work"]
    )
    g.add_edge("work", "reduce")
    g.add_edge("reduce", END)
    return g.compile(checkpointer=saver)


async def prog_send(run: Run) -> None:
    graph = map_reduce(run.saver)
    await run.invoke(graph, {"items": [1, 2, 3, 4], "total": 0})


class Draft(TypedDict, total=False):
    topic: str
    trail: Annotated[list[str], operator.add]


def drafting(saver: Any) -> Any:
    def review(state: Draft) -> Draft:
        return {"trail": [f"review:{interrupt({'ask': 'review', 'topic': state['topic']})}"]}

    inner = StateGraph(Draft)
    inner.add_node("draft", lambda s: {"trail": ["draft"]})
    inner.add_node("review", review)
    inner.add_edge(START, "draft")
    inner.add_edge("draft", "review")
    inner.add_edge("review", END)
    outer = StateGraph(Draft)
    outer.add_node("start", lambda s: {"trail": ["start"]})
    outer.add_node("writer", inner.compile(checkpointer=True))
    outer.add_node("finish", lambda s: {"trail": ["finish"]})
    outer.add_edge(START, "start")
    outer.add_edge("start", "writer")
    outer.add_edge("writer", "finish")
    outer.add_edge("finish", END)
    return outer.compile(checkpointer=saver)


async def prog_subgraph(run: Run) -> None:
    graph = drafting(run.saver)
    await run.invoke(graph, {"topic": "refund", "trail": []})
    inner = (await run.state(graph)).tasks[0].state
    assert isinstance(inner, StateSnapshot)
    run.seen.append(("inner", snapshot(run.ids, inner)))
    run.seen.append(
        ("inner-history", [snapshot(run.ids, s) for s in await run.history(graph, inner.config)])
    )
    await run.invoke(graph, Command(resume="ok"))
    # checkpointer=True: the subgraph's state carries over into the next run.
    await run.invoke(graph, {"topic": "again", "trail": []})


class Asked(TypedDict, total=False):
    answers: Annotated[list[str], operator.add]


def asking(saver: Any) -> Any:
    g = StateGraph(Asked)
    g.add_node("first", lambda s: {"answers": [f"1:{interrupt('first?')}"]})
    g.add_node("second", lambda s: {"answers": [f"2:{interrupt('second?')}"]})
    g.add_edge(START, "first")
    g.add_edge("first", "second")
    g.add_edge("second", END)
    return g.compile(checkpointer=saver)


async def prog_interrupts_in_a_row(run: Run) -> None:
    graph = asking(run.saver)
    await run.invoke(graph, {"answers": []})
    await run.invoke(graph, Command(resume="yes"))
    await run.invoke(graph, Command(resume="no"))


def asking_in_parallel(saver: Any) -> Any:
    g = StateGraph(Asked)
    g.add_node("left", lambda s: {"answers": [f"L:{interrupt('left?')}"]})
    g.add_node("right", lambda s: {"answers": [f"R:{interrupt('right?')}"]})
    g.add_node("done", lambda s: {"answers": ["done"]})
    g.add_edge(START, "left")
    g.add_edge(START, "right")
    g.add_edge(["left", "right"], "done")
    g.add_edge("done", END)
    return g.compile(checkpointer=saver)


async def prog_parallel_interrupts(run: Run) -> None:
    graph = asking_in_parallel(run.saver)
    await run.invoke(graph, {"answers": []})
    pending = {i.value: i.id for i in (await run.state(graph)).interrupts}
    # Answer one, then the other.
    await run.invoke(graph, Command(resume={pending["left?"]: "l"}))
    await run.invoke(graph, Command(resume={pending["right?"]: "r"}))


class Counted(TypedDict, total=False):
    n: int
    trail: Annotated[list[str], operator.add]


def counting(saver: Any) -> Any:
    g = StateGraph(Counted)
    g.add_node("inc", lambda s: {"n": s["n"] + 1, "trail": [f"inc{s['n']}"]})
    g.add_node("double", lambda s: {"n": s["n"] * 2, "trail": [f"dbl{s['n']}"]})
    g.add_edge(START, "inc")
    g.add_edge("inc", "double")
    g.add_edge("double", END)
    return g.compile(checkpointer=saver)


async def prog_update_and_fork(run: Run) -> None:
    graph = counting(run.saver)
    await run.invoke(graph, {"n": 1, "trail": []})
    await run.update(graph, run.config(), {"n": 100, "trail": ["patched"]}, as_node="inc")
    await run.invoke(graph, None)
    # Fork from the checkpoint before `double` first ran, and continue from the fork.
    history = await run.history(graph)
    older = next(s for s in reversed(history) if s.next == ("double",))
    fork = await run.update(graph, older.config, {"n": 7})
    await run.invoke(graph, None, fork)
    await run.invoke(graph, {"n": 0, "trail": ["new"]})


class Flaky(TypedDict, total=False):
    trail: Annotated[list[str], operator.add]


def flaky(saver: Any, calls: dict[str, int]) -> Any:
    good_done = threading.Event()

    def good(state: Flaky) -> Flaky:
        calls["good"] = calls.get("good", 0) + 1
        good_done.set()
        return {"trail": ["good"]}

    def bad(state: Flaky) -> Flaky:
        calls["bad"] = calls.get("bad", 0) + 1
        if calls["bad"] == 1:
            # Fails once `good` has finished and its writes are saved, as a slower branch
            # would: otherwise which of the two ends first is a race.
            good_done.wait(5)
            time.sleep(0.05)
            raise ValueError("first try fails")
        return {"trail": ["bad-retried"]}

    g = StateGraph(Flaky)
    g.add_node("good", good)
    g.add_node("bad", bad)
    g.add_node("after", lambda s: {"trail": ["after"]})
    g.add_edge(START, "good")
    g.add_edge(START, "bad")
    g.add_edge(["good", "bad"], "after")
    g.add_edge("after", END)
    return g.compile(checkpointer=saver)


async def prog_error(run: Run) -> None:
    calls: dict[str, int] = {}
    graph = flaky(run.saver, calls)
    await run.invoke(graph, {"trail": []})
    await run.invoke(graph, None)
    run.seen.append(("calls", dict(calls)))


class Conversation(TypedDict, total=False):
    messages: Annotated[list[str], DeltaChannel(append, snapshot_frequency=2)]


def delta_conversation(saver: Any) -> Any:
    g = StateGraph(Conversation)
    g.add_node("reply", lambda s: {"messages": [f"reply{len(s['messages'])}"]})
    g.add_edge(START, "reply")
    g.add_edge("reply", END)
    return g.compile(checkpointer=saver)


async def prog_delta(run: Run) -> None:
    graph = delta_conversation(run.saver)
    for n in range(4):
        await run.invoke(graph, {"messages": [f"user{n}" + "x" * 300 * (n % 2)]})
    history = await run.history(graph)
    for past in history:
        run.seen.append(("at", snapshot(run.ids, await run.state(graph, past.config))))
    older = next(s for s in history if s.metadata and s.metadata["step"] == 4)
    fork = await run.update(graph, older.config, {"messages": ["forked"]}, as_node="reply")
    await run.invoke(graph, {"messages": ["after fork"]}, fork)


async def prog_replay(run: Run) -> None:
    """Time travel: run again from past checkpoints, one with a branch's writes pending."""
    calls: dict[str, int] = {}
    graph = flaky(run.saver, calls)
    await run.invoke(graph, {"trail": []})
    await run.invoke(graph, None)
    history = await run.history(graph)
    for past in [s for s in history if s.next][::-1]:
        await run.invoke(graph, None, past.config)
    run.seen.append(("calls", dict(calls)))
    run.seen.append(
        ("history-window", [snapshot(run.ids, s) for s in await run.history_window(graph)])
    )


class Kinds(TypedDict, total=False):
    none: Any
    flag: bool
    ratio: float
    big: int
    pair: tuple[int, str]
    tags: set[str]
    raw: bytes
    long_text: str
    many: list[int]
    nested: dict[str, Any]
    trail: Annotated[list[str], operator.add]


def kinds(saver: Any) -> Any:
    """Values of every shape the saver stores differently (inline or as blobs), changed in
    some steps and left alone in others."""
    g = StateGraph(Kinds)
    g.add_node(
        "first",
        lambda s: {
            "none": None,
            "flag": False,
            "ratio": 0.1 + 0.2,
            "big": 2**62,
            "pair": (1, "a"),
            "tags": {"x", "y"},
            "raw": b"\x00\xff",
            "long_text": "t" * 300,
            "many": list(range(40)),
            "nested": {"a": [1, {"b": None}], "c": "d" * 400},
            "trail": ["first"],
        },
    )
    g.add_node("second", lambda s: {"flag": True, "many": [*s["many"], 40], "trail": ["2"]})
    g.add_node("third", lambda s: {"none": {"now": "set"}, "long_text": "", "trail": ["3"]})
    g.add_edge(START, "first")
    g.add_edge("first", "second")
    g.add_edge("second", "third")
    g.add_edge("third", END)
    return g.compile(checkpointer=saver, interrupt_before=["third"])


async def prog_kinds(run: Run) -> None:
    graph = kinds(run.saver)
    await run.invoke(graph, {"trail": []})
    await run.update(graph, run.config(), {"pair": (2, "b"), "ratio": None})
    await run.invoke(graph, None)


def fanning_wide(saver: Any) -> Any:
    g = StateGraph(Fan)
    g.add_node("work", lambda s: {"trail": [f"w{s['items'][0]}"], "total": s["items"][0]})
    g.add_node("check", lambda s: {"trail": [f"check:{interrupt(s['total'])}"]})
    g.add_conditional_edges(
        START, lambda s: [Send("work", {"items": [i, "p" * 100]}) for i in s["items"]], ["work"]
    )
    g.add_edge("work", "check")
    g.add_edge("check", END)
    return g.compile(checkpointer=saver)


async def prog_send_wide(run: Run) -> None:
    """A fan-out too wide and large for inline values, paused after the reduce."""
    graph = fanning_wide(run.saver)
    await run.invoke(graph, {"items": list(range(20)), "total": 0})
    await run.invoke(graph, Command(resume="fine"))


def inherited_subgraph(saver: Any) -> Any:
    def review(state: Draft) -> Any:
        verdict = interrupt("verdict?")
        return Command(update={"trail": [f"review:{verdict}"]}, goto="polish")

    inner = StateGraph(Draft)
    inner.add_node("draft", lambda s: {"trail": ["draft"]})
    inner.add_node("review", review)
    inner.add_node("polish", lambda s: {"trail": ["polish"]})
    inner.add_edge(START, "draft")
    inner.add_edge("draft", "review")
    inner.add_edge("polish", END)
    outer = StateGraph(Draft)
    outer.add_node("writer", inner.compile())
    outer.add_node("finish", lambda s: {"trail": ["finish"]})
    outer.add_edge(START, "writer")
    outer.add_edge("writer", "finish")
    outer.add_edge("finish", END)
    return outer.compile(checkpointer=saver)


async def prog_subgraph_update(run: Run) -> None:
    """A subgraph in its task's namespace: its state updated while paused, then resumed."""
    graph = inherited_subgraph(run.saver)
    await run.invoke(graph, {"topic": "t", "trail": []})
    inner = (await run.state(graph)).tasks[0].state
    assert isinstance(inner, StateSnapshot)
    await run.update(graph, inner.config, {"trail": ["edited"]}, as_node="draft")
    await run.invoke(graph, Command(resume="ok"))


def asking_twice_in_one_node(saver: Any, calls: dict[str, int]) -> Any:
    def ask(state: Asked) -> Asked:
        calls["ask"] = calls.get("ask", 0) + 1
        if calls["ask"] == 1:
            raise ValueError("not yet")
        first = interrupt("a?")
        second = interrupt({"q": "b?", "after": first})
        return {"answers": [f"{first}+{second}"]}

    g = StateGraph(Asked)
    g.add_node("ask", ask)
    g.add_edge(START, "ask")
    g.add_edge("ask", END)
    return g.compile(checkpointer=saver)


async def prog_one_node_asks_twice(run: Run) -> None:
    """An error, then two interrupts, all pending writes of one task at one checkpoint."""
    graph = asking_twice_in_one_node(run.saver, {})
    await run.invoke(graph, {"answers": []})
    await run.invoke(graph, None)
    await run.invoke(graph, Command(resume="x"))
    await run.invoke(graph, Command(resume="y"))


async def prog_copy_and_bulk(run: Run) -> None:
    """State written outside any run: a first update on an empty thread, a copy of an older
    checkpoint, and a bulk update of several supersteps."""
    graph = counting(run.saver)
    await run.update(graph, run.config(), {"n": 5, "trail": ["seed"]}, as_node="inc")
    await run.invoke(graph, None)
    first = (await run.history(graph))[-1]
    await run.update(graph, first.config, None, as_node="__copy__")
    await run.invoke(graph, None)
    bulk = graph.bulk_update_state if run.sync else graph.abulk_update_state
    done = await run._call(
        bulk,
        run.config(),
        [
            [StateUpdate({"n": 1, "trail": ["b1"]}, "inc")],
            [StateUpdate({"n": 2, "trail": ["b2"]}, "double")],
        ],
    )
    run.seen.append(("bulk", run.ids(done)))
    await run.observe(graph, None)


class Trail(TypedDict, total=False):
    trail: Annotated[list[str], operator.add]


def parallel_subgraphs(saver: Any) -> Any:
    inner = StateGraph(Draft, output_schema=Trail)
    inner.add_node("ask", lambda s: {"trail": [f"{s['topic']}:{interrupt(s['topic'])}"]})
    inner.add_edge(START, "ask")
    inner.add_edge("ask", END)
    outer = StateGraph(Draft)
    outer.add_node("sub", inner.compile())
    outer.add_node("done", lambda s: {"trail": ["done"]})
    outer.add_conditional_edges(
        START, lambda s: [Send("sub", {"topic": t, "trail": []}) for t in ("x", "y")], ["sub"]
    )
    outer.add_edge("sub", "done")
    outer.add_edge("done", END)
    return outer.compile(checkpointer=saver)


async def prog_parallel_subgraphs(run: Run) -> None:
    """Two runs of one subgraph in parallel, in their tasks' namespaces, each paused."""
    graph = parallel_subgraphs(run.saver)
    await run.invoke(graph, {"topic": "", "trail": []})
    pending = {i.value: i.id for i in (await run.state(graph)).interrupts}
    await run.invoke(graph, Command(resume={pending["y"]: "Y"}))
    await run.invoke(graph, Command(resume={pending["x"]: "X"}))


async def prog_delete_and_reuse(run: Run) -> None:
    """A thread deleted right after a run (in write-behind, its backlog maybe unflushed),
    then run again under the same id."""
    graph = asking(run.saver)
    await run.invoke(graph, {"answers": ["old"]})
    await run.invoke(graph, Command(resume="yes"))
    delete = run.saver.delete_thread if run.sync else run.saver.adelete_thread
    await run._call(delete, run.thread_id)
    await run.observe(graph, None)
    await run.invoke(graph, {"answers": ["new"]})
    await run.invoke(graph, Command(resume="again"))


async def prog_workers_take_turns(run: Run) -> None:
    """Steps of one thread run by two processes in turn, each with what it remembers of
    the thread from its last turn (in write-behind, the other's backlog maybe unflushed)."""
    graph = asking(run.saver)
    await run.invoke(graph, {"answers": ["start"]})
    await run.invoke(graph, Command(resume="one"), elsewhere=True)
    await run.invoke(graph, Command(resume="two"))
    # Another graph on the thread, without `answers`: it keeps its value.
    conversation = delta_conversation(run.saver)
    for n in range(3):
        await run.invoke(conversation, {"messages": [f"turn{n}"]}, elsewhere=n % 2 == 0)


FILTERS: list[dict[str, Any]] = [
    {"source": "loop"},
    {"source": "loop", "step": 1},
    {"user": "alice"},
    {"tag": "t1"},
    {"parents": {}},
    {"absent": None},
]


async def prog_filters(run: Run) -> None:
    """Metadata from the run's config, and `list` filters across namespaces."""
    graph = drafting(run.saver)
    config = run.config(user="alice")
    config["metadata"] = {"tag": "t1", "run": run.thread_id}
    await run.invoke(graph, {"topic": "refund", "trail": []}, config)
    await run.invoke(graph, Command(resume="ok"), config)
    # Every thread's checkpoints, this run's picked out by a metadata value of its own.
    # Across namespaces the order is not part of the contract (InMemorySaver goes
    # namespace by namespace, so a `limit` keeps other checkpoints than LangGraph's
    # Postgres saver and this one, newest first): compared as sets, without a limit.
    everywhere = sorted(
        await run.listed(None, filter={"run": run.thread_id}),
        key=lambda t: (t.config["configurable"]["checkpoint_ns"], t.checkpoint["id"]),
    )
    run.seen.append(("everywhere", [run.ids((t.config, t.metadata)) for t in everywhere]))
    for filter_ in FILTERS:
        found = sorted(
            await run.listed(run.config(), filter=filter_),
            key=lambda t: (t.config["configurable"]["checkpoint_ns"], t.checkpoint["id"]),
        )
        run.seen.append((filter_, [run.ids((t.config, t.metadata)) for t in found]))


PROGRAMS: dict[str, Callable[[Run], Awaitable[None]]] = {
    "parallel": prog_parallel,
    "send": prog_send,
    "subgraph": prog_subgraph,
    "interrupts-in-a-row": prog_interrupts_in_a_row,
    "parallel-interrupts": prog_parallel_interrupts,
    "update-and-fork": prog_update_and_fork,
    "error": prog_error,
    "delta": prog_delta,
    "filters": prog_filters,
    "one-node-asks-twice": prog_one_node_asks_twice,
    "copy-and-bulk": prog_copy_and_bulk,
    "parallel-subgraphs": prog_parallel_subgraphs,
    "delete-and-reuse": prog_delete_and_reuse,
    "workers-take-turns": prog_workers_take_turns,
    "replay": prog_replay,
    "kinds": prog_kinds,
    "send-wide": prog_send_wide,
    "subgraph-update": prog_subgraph_update,
}


async def run_program(
    name: str,
    saver: BaseCheckpointSaver[Any],
    durability: str,
    *,
    sync: bool = False,
    other: BaseCheckpointSaver[Any] | None = None,
    flushes: bool = False,
) -> list[Any]:
    run = Run(saver, durability, sync, other, flushes)
    await PROGRAMS[name](run)
    if flushes:
        await run.observe_flushed()
    else:
        await run.observe_other()  # what a run there would start from
    return run.seen


# What InMemorySaver shows of each program, by (program, durability, sync, flushes): the
# same for every configuration (ids are renumbered), so each is run once per module.
_EXPECTED: dict[tuple[str, str, bool, bool], list[Any]] = {}


async def expected(name: str, durability: str, *, sync: bool, flushes: bool) -> list[Any]:
    key = (name, durability, sync, flushes)
    if key not in _EXPECTED:
        _EXPECTED[key] = await run_program(
            name, InMemorySaver(), durability, sync=sync, flushes=flushes
        )
    return _EXPECTED[key]


def difference(got: Any, want: Any, path: str = "") -> str | None:
    """Where two observations first differ, and how."""
    if isinstance(got, dict) and isinstance(want, dict) and got.keys() == want.keys():
        found = (difference(got[k], want[k], f"{path}.{k}") for k in got)
        return next((d for d in found if d), None)
    if isinstance(got, list | tuple) and type(got) is type(want) and len(got) == len(want):
        found = (
            difference(g, w, f"{path}[{n}]") for n, (g, w) in enumerate(zip(got, want, strict=True))
        )
        return next((d for d in found if d), None)
    return None if got == want else f"{path}: saver {got!r} != in-memory {want!r}"


# ----------------------------------------------------------------- tests


@pytest.fixture(scope="module", params=CONFIGS, ids=CONFIG_IDS)
def config_(request: pytest.FixtureRequest) -> tuple[str, bool, WriteMode | None]:
    config: tuple[str, bool, WriteMode | None] = request.param
    return config


@pytest_asyncio.fixture(scope="module")
async def savers(
    config_: tuple[str, bool, WriteMode | None], make_settings: Callable[..., Settings]
) -> AsyncIterator[tuple[TieredCheckpointSaver, TieredCheckpointSaver]]:
    """The saver the programs run on, and another process's on the same servers."""
    backend, hot, mode = config_
    settings = make_settings(backend, hot=hot, state_write_mode=mode)
    async with backends_for(settings) as backends, backends_for(settings) as others:
        yield (
            TieredCheckpointSaver.from_backends(backends),
            TieredCheckpointSaver.from_backends(others),
        )


@pytest.mark.parametrize("durability", DURABILITIES)
async def test_programs_match_in_memory_saver(
    savers: tuple[TieredCheckpointSaver, TieredCheckpointSaver], durability: str
) -> None:
    """Every program, each on a thread of its own, all at once (as a worker runs threads)."""
    saver, other = savers
    flushes = saver.flusher is not None

    async def differences(program: str) -> str | None:
        want = await expected(program, durability, sync=False, flushes=flushes)
        got = await run_program(program, saver, durability, other=other, flushes=flushes)
        found = difference(got, want)
        return f"{program}: {found}" if found else None

    found = await asyncio.gather(*(differences(program) for program in PROGRAMS))
    assert not any(found), "\n".join(f for f in found if f)


@pytest.mark.parametrize(
    ("backend", "hot"),
    [("postgres", True), ("postgres", False), ("cosmos", True)],
    ids=["postgres-wb", "postgres-cold", "cosmos-wb"],
)
async def test_sync_programs_match_in_memory_saver(
    backend: str, hot: bool, make_settings: Callable[..., Settings]
) -> None:
    """The sync API on `open_sync`'s private loop thread (Postgres alone: its blocking
    store), each program driven from a worker thread."""
    settings = make_settings(
        backend, hot=hot, state_write_mode=WriteMode.WRITE_BEHIND if hot else None
    )
    with TieredCheckpointSaver.open_sync(settings) as saver:

        async def differences(program: str) -> str | None:
            want = await expected(program, "async", sync=True, flushes=hot)
            got = await run_program(program, saver, "async", sync=True, flushes=hot)
            found = difference(got, want)
            return f"{program}: {found}" if found else None

        found = await asyncio.gather(*(differences(program) for program in PROGRAMS))
    assert not any(found), "\n".join(f for f in found if f)


@pytest.mark.parametrize(
    "filter_",
    [{"parents": {}}, {"tags": ["a"]}, {"absent": None}, {"note": None}, {"step": 1}],
    ids=["empty-dict", "list-prefix", "absent-none", "null", "scalar"],
)
async def test_list_filter_compares_metadata_values_by_equality(
    any_backend: str, filter_: dict[str, Any], open_tiers: Callable[..., Any]
) -> None:
    """A metadata filter matches a value equal to it, as InMemorySaver compares (==): not
    one that merely contains it, and None matches a missing key too (every cold store,
    and the fakes)."""
    metadatas: list[dict[str, Any]] = [
        {"step": 1, "parents": {}, "tags": ["a"], "note": None},
        {"step": 1, "parents": {"": "p"}, "tags": ["a", "b"]},
        {"step": 2, "parents": {}, "tags": [], "absent": "here", "note": "n"},
    ]

    async def matching(saver: BaseCheckpointSaver[Any], thread_id: str) -> list[int]:
        config: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        for n, metadata in enumerate(metadatas):
            checkpoint = empty_checkpoint()
            checkpoint["id"] = str(uuid6(clock_seq=n))
            config = await saver.aput(config, checkpoint, metadata, {})  # type: ignore[arg-type]
        listed: RunnableConfig = {"configurable": {"thread_id": thread_id}}
        found = [t async for t in saver.alist(listed, filter=filter_)]
        return sorted(metadatas.index(dict(t.metadata)) for t in found)

    thread_id = f"diff-filter-{uuid.uuid4().hex}"
    async with open_tiers(any_backend, hot=False) as backends:
        got = await matching(TieredCheckpointSaver.from_backends(backends), thread_id)
    assert got == await matching(InMemorySaver(), thread_id)


@pytest.mark.xfail(
    strict=True,
    reason="a put_writes mixing special and ordinary channels inserts only, as LangGraph's "
    "Postgres saver does; InMemorySaver replaces the special ones",
)
async def test_a_finished_tasks_resume_list_is_its_last(
    open_tiers: Callable[..., Any],
) -> None:
    """A task resumed twice saves its resume list [x, y] with its results in one call: the
    [x] it saved at its second interrupt is replaced, as InMemorySaver does."""

    async def resume_lists(saver: BaseCheckpointSaver[Any]) -> list[Any]:
        graph = asking_twice_in_one_node(saver, {"ask": 1})
        config: RunnableConfig = {"configurable": {"thread_id": f"diff-{uuid.uuid4().hex}"}}
        await graph.ainvoke({"answers": []}, config)
        await graph.ainvoke(Command(resume="x"), config)
        await graph.ainvoke(Command(resume="y"), config)
        return [
            value
            async for t in saver.alist(config)
            for task, channel, value in t.pending_writes or []
            if channel == RESUME and isinstance(value, list)
        ]

    assert await resume_lists(InMemorySaver()) == [["x", "y"]]
    async with open_tiers("postgres", hot=False) as backends:
        assert await resume_lists(TieredCheckpointSaver.from_backends(backends)) == [["x", "y"]]


@pytest.mark.parametrize("hot", [True, False], ids=["redis-wb", "cold-only"])
async def test_a_channel_another_graph_has_not_keeps_its_value(
    cold_backend: str, hot: bool, open_tiers: Callable[..., Any]
) -> None:
    """A thread run by a graph without one of its channels (another graph on the thread, or
    a release without that key): the channel keeps its version, so its value, and the
    first graph finds it again, as with InMemorySaver."""

    async def values_again(saver: BaseCheckpointSaver[Any]) -> dict[str, Any]:
        config: RunnableConfig = {"configurable": {"thread_id": f"diff-{uuid.uuid4().hex}"}}
        await counting(saver).ainvoke({"n": 1, "trail": ["x"]}, config)
        await parallel_branches(saver).ainvoke({"trail": ["y"]}, config)
        values: dict[str, Any] = (await counting(saver).aget_state(config)).values
        return values

    want = await values_again(InMemorySaver())
    assert want["n"] == 4
    async with open_tiers(cold_backend, hot=hot) as backends:
        assert await values_again(TieredCheckpointSaver.from_backends(backends)) == want
