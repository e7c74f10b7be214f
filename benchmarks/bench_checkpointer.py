"""Benchmark: the tiered checkpoint saver against LangGraph's savers and langgraph-checkpoint-cosmosdb.

One run, one machine. Starts its own Redis, Cosmos emulator and Postgres on free
loopback ports (scripts/devstack), measures every contender with the same
workload through LangGraph's sync API (`graph.invoke`) and its async API
(`graph.ainvoke`), writes benchmarks/RESULTS.md (every ratio and every target
verdict computed in this run) and stops the servers.

    .venv/bin/python benchmarks/bench_checkpointer.py [--quick] [--only TEXT ...] [--output PATH]

A full run sweeps every contender twice, the second sweep in reverse order, and pools
the samples (see `Scale.rounds`). `--quick` is a smoke run (about a minute, one sweep);
`--only` keeps the contenders whose
name contains one of the texts (targets whose reference is left out read "not
measured"). Progress goes to stderr, one line per contender, API and phase.

Workload: a 4-node sequential graph, each node appending one ~1 KB
message to `messages: Annotated[list, operator.add]`, invoked with one new ~1 KB
user message on fresh threads and on threads already holding 10 / 100 / 1000
messages; then get_tuple, put and list on their own; the write-behind flusher's
drain rate against the put rate; stored bytes of a growing conversation. Then
a DeltaChannel conversation (async API): one node appending two ~1 KB messages
per invoke to a `DeltaChannel` list (snapshot every 50 updates), invoked on one
thread until it holds 300 messages; on Cosmos also the same graph with
`operator.add` (the request count a DeltaChannel adds) and a cold `get_state`
of the DeltaChannel thread (nothing cached) at its newest checkpoint whose value
is rebuilt from history. langgraph-checkpoint-cosmosdb is left out of it (no
DeltaChannel fast path: one get_tuple per ancestor).

Contenders: InMemorySaver; LangGraph's PostgresSaver (sync API) and
AsyncPostgresSaver (async API); langgraph-checkpoint-cosmosdb on the emulator;
this project's saver on Postgres, Postgres + Redis, Cosmos and Cosmos + Redis in
write-through, and on Postgres + Redis and Cosmos + Redis in write-behind. The
project's contenders are built as an app builds them, `open_backends(Settings(...))`
then `TieredCheckpointSaver.from_backends(...)`: on the benchmark's loop for the
async API, on a private loop thread for the sync API (what `open_sync` does; in
write-behind mode a sync put, put_writes or cache hit is read and written on the
calling thread, with a blocking Redis client).

Counting: Cosmos HTTP requests at the azure-core transport, Redis round trips at
the connection (one per command or pipeline sent), Postgres statements at the
psycopg cursor (a pipelined batch counts each statement). Each request is charged
to the saver call (get_tuple, put, put_writes, list, flush) whose context made
it, so a background flusher's requests are never counted as request-path work.
Redis commands are the server's own count (INFO commandstats, all clients).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import itertools
import json
import operator
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypedDict, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "scripts")]

import psycopg  # noqa: E402
import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from langchain_core.runnables import RunnableConfig  # noqa: E402
from langgraph.channels.delta import DeltaChannel  # noqa: E402
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.checkpoint.postgres import PostgresSaver  # noqa: E402
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402
from psycopg.rows import dict_row  # noqa: E402
from urllib3.exceptions import InsecureRequestWarning  # noqa: E402

from devstack import Stack  # noqa: E402
from state.checkpoint import TieredCheckpointSaver  # noqa: E402
from state.checkpoint.loop_thread import LoopThread  # noqa: E402
from state.cold.cosmos_client import CosmosConnection  # noqa: E402
from state.factory import Backends, open_backends  # noqa: E402
from state.hot import redis_client  # noqa: E402
from state.settings import ColdBackend, Settings, WriteMode  # noqa: E402

T = TypeVar("T")
Api = Literal["sync", "async"]
APIS: tuple[Api, ...] = ("sync", "async")
Key = tuple[str, Api]

# Redis client of the harness itself (INFO, SCAN, PING baseline): never counted.
OBSERVER = "bench-observer"


class BenchmarkError(RuntimeError):
    """A contender gave a wrong answer or lacks what its row measures."""


def log(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- workload


class ChatState(TypedDict):
    messages: Annotated[list[dict[str, str]], operator.add]


NODES = ("triage", "billing", "account", "response")

WORDS = [
    "refund", "charge", "account", "login", "password", "duplicate", "card", "merchant",
    "invoice", "customer", "support", "ticket", "billing", "statement", "reset", "verify",
    "the", "a", "was", "and", "to", "my", "twice", "cannot", "please", "help", "order",
]  # fmt: skip


def message(rng: random.Random, index: int) -> dict[str, str]:
    """A ~1 KB chat message of plausible text (compresses like real text, not like zeros)."""
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < 1000:
        words.append(rng.choice(WORDS))
    return {"role": "user" if index % 2 == 0 else "assistant", "content": " ".join(words)}


def chat_graph(checkpointer: BaseCheckpointSaver[Any], replies: dict[str, dict[str, str]]) -> Any:
    """triage -> billing -> account -> response, each appending one ~1 KB message."""
    graph = StateGraph(ChatState)
    for name in NODES:
        reply = replies[name]
        graph.add_node(name, lambda _state, reply=reply: {"messages": [reply]})
    graph.add_edge(START, NODES[0])
    for before, after in itertools.pairwise(NODES):
        graph.add_edge(before, after)
    graph.add_edge(NODES[-1], END)
    return graph.compile(checkpointer=checkpointer)


DELTA_SNAPSHOT_FREQUENCY = 50


def append_batches(
    state: list[dict[str, str]], batches: list[list[dict[str, str]]]
) -> list[dict[str, str]]:
    return [*state, *(item for batch in batches for item in batch)]


class DeltaChatState(TypedDict):
    messages: Annotated[
        list[dict[str, str]],
        DeltaChannel(append_batches, snapshot_frequency=DELTA_SNAPSHOT_FREQUENCY),
    ]


def pair_graph(
    checkpointer: BaseCheckpointSaver[Any], replies: list[dict[str, str]], *, delta: bool
) -> Any:
    """One node appending two ~1 KB messages per invoke, to a DeltaChannel list or (for
    comparison) an `operator.add` one."""
    graph = StateGraph(DeltaChatState if delta else ChatState)
    graph.add_node("reply", lambda _state: {"messages": list(replies)})
    graph.add_edge(START, "reply")
    graph.add_edge("reply", END)
    return graph.compile(checkpointer=checkpointer)


def growing_delta_graph(
    checkpointer: BaseCheckpointSaver[Any], messages: list[dict[str, str]]
) -> Any:
    """One node appending the next two distinct messages per invoke to a DeltaChannel list."""

    def reply(state: DeltaChatState) -> dict[str, Any]:
        held = len(state["messages"])
        return {"messages": messages[held : held + 2]}

    graph = StateGraph(DeltaChatState)
    graph.add_node("reply", reply)
    graph.add_edge(START, "reply")
    graph.add_edge("reply", END)
    return graph.compile(checkpointer=checkpointer)


def config_for(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


def new_thread(kind: str) -> str:
    return f"bench-{kind}-{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- counting

# The saver call a request is made for; context variables follow the call into the
# tasks and loop threads it hands work to, and nowhere else.
_CALL: ContextVar[Call | None] = ContextVar("bench_call", default=None)


@dataclass
class Call:
    kind: str  # get_tuple | put | put_writes | list | flush
    cosmos: int = 0
    redis: int = 0
    postgres: int = 0
    open: bool = True

    @property
    def cold(self) -> int:
        return self.cosmos + self.postgres


class Meter:
    """Counts requests at the clients, charging each to the saver call that made it."""

    def __init__(self) -> None:
        self.totals = {"cosmos": 0, "redis": 0, "postgres": 0}
        self.calls: list[Call] | None = None
        # (sent, answered) of each Cosmos request while `spans()` collects them.
        self.cosmos_spans: list[tuple[float, float]] | None = None
        self._lock = threading.Lock()  # requests come from several threads
        self._undo: list[Callable[[], None]] = []

    def count(self, backend: Literal["cosmos", "redis", "postgres"]) -> None:
        with self._lock:
            self.totals[backend] += 1
            call = _CALL.get()
            if call is not None and call.open:
                setattr(call, backend, getattr(call, backend) + 1)

    @contextmanager
    def call(self, kind: str) -> Iterator[Call]:
        current = _CALL.get()
        if current is not None and current.open and current.kind == kind:
            # aput running put (InMemorySaver, the cosmosdb package): one call, not two.
            yield current
            return
        call = Call(kind)
        if self.calls is not None:
            self.calls.append(call)
        token = _CALL.set(call)
        try:
            yield call
        finally:
            # A task the call started (a flusher, say) keeps the context: charge it nothing more.
            call.open = False
            _CALL.reset(token)

    @contextmanager
    def window(self) -> Iterator[list[Call]]:
        """Collects the calls started inside it (in start order)."""
        calls: list[Call] = []
        self.calls = calls
        try:
            yield calls
        finally:
            self.calls = None

    @contextmanager
    def spans(self) -> Iterator[list[tuple[float, float]]]:
        """Collects when each Cosmos request made inside was sent and answered."""
        spans: list[tuple[float, float]] = []
        self.cosmos_spans = spans
        try:
            yield spans
        finally:
            self.cosmos_spans = None

    def cold_total(self) -> int:
        return self.totals["cosmos"] + self.totals["postgres"]

    def install(self) -> None:
        from azure.core.pipeline.transport import AioHttpTransport, RequestsTransport
        from redis.asyncio.client import Pipeline

        meter = self
        aio_send = AioHttpTransport.send
        requests_send = RequestsTransport.send

        async def counted_aio_send(transport: Any, request: Any, **kwargs: Any) -> Any:
            meter.count("cosmos")
            spans, sent = meter.cosmos_spans, time.perf_counter()
            try:
                return await aio_send(transport, request, **kwargs)
            finally:
                if spans is not None:
                    spans.append((sent, time.perf_counter()))

        def counted_requests_send(transport: Any, request: Any, **kwargs: Any) -> Any:
            meter.count("cosmos")
            return requests_send(transport, request, **kwargs)

        patches: list[tuple[Any, str, Any]] = [
            (AioHttpTransport, "send", counted_aio_send),
            (RequestsTransport, "send", counted_requests_send),
        ]
        # Redis round trips as the client makes them: a command (a script call included),
        # a pipeline, a WATCH. A new connection's handshake is not counted.
        for owner, name in (
            (aioredis.Redis, "execute_command"),
            (Pipeline, "execute"),
            (Pipeline, "immediate_execute_command"),
        ):
            patches.append((owner, name, self._counted_redis(owner, name)))
        # The sync API's calls made on the caller's thread (cache-hit reads; write-behind appends).
        for blocking_owner, name in (
            (redis.Redis, "execute_command"),
            (redis.client.Pipeline, "execute"),
            (redis.client.Pipeline, "immediate_execute_command"),
        ):
            patches.append(
                (blocking_owner, name, self._counted_blocking_redis(blocking_owner, name))
            )
        for cursor_class in (psycopg.Cursor, psycopg.AsyncCursor):
            for name in ("execute", "executemany"):
                patches.append((cursor_class, name, self._counted_statement(cursor_class, name)))
        # And the hot path's lean round trips, which bypass both.
        patches.append(
            (redis_client, "round_trip", self._counted_redis(redis_client, "round_trip"))
        )
        patches.append(
            (
                redis_client,
                "round_trip_blocking",
                self._counted_blocking_redis(redis_client, "round_trip_blocking"),
            )
        )
        for owner, name, replacement in patches:
            original = owner.__dict__[name]
            setattr(owner, name, replacement)
            self._undo.append(partial(setattr, owner, name, original))

    def _counted_redis(self, owner: type, name: str) -> Any:
        original = getattr(owner, name)
        meter = self

        async def counted(client: Any, *args: Any, **kwargs: Any) -> Any:
            if client.connection_pool.connection_kwargs.get("client_name") != OBSERVER:
                meter.count("redis")
            return await original(client, *args, **kwargs)

        return counted

    def _counted_blocking_redis(self, owner: type, name: str) -> Any:
        original = getattr(owner, name)
        meter = self

        def counted(client: Any, *args: Any, **kwargs: Any) -> Any:
            meter.count("redis")
            return original(client, *args, **kwargs)

        return counted

    def _counted_statement(self, cursor_class: type, name: str) -> Any:
        original = getattr(cursor_class, name)
        meter = self
        if cursor_class is psycopg.AsyncCursor:

            async def counted_async(cursor: Any, *args: Any, **kwargs: Any) -> Any:
                meter.count("postgres")
                return await original(cursor, *args, **kwargs)

            return counted_async

        def counted(cursor: Any, *args: Any, **kwargs: Any) -> Any:
            meter.count("postgres")
            return original(cursor, *args, **kwargs)

        return counted

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()


def sequential(spans: list[tuple[float, float]]) -> int:
    """The longest run of requests each sent after the previous one was answered: the
    round trips a caller waited for one after the other."""
    ordered = sorted(spans)
    longest: list[int] = []
    for n, (sent, _) in enumerate(ordered):
        before = [longest[m] for m in range(n) if ordered[m][1] <= sent]
        longest.append(1 + max(before, default=0))
    return max(longest, default=0)


def trace(saver: BaseCheckpointSaver[Any], meter: Meter) -> None:
    """Make each get_tuple / put / put_writes / delta history read a call of its own (on
    this instance only)."""
    for kind in ("get_tuple", "put", "put_writes", "get_delta_channel_history"):
        original = getattr(saver, kind)
        async_original = getattr(saver, f"a{kind}")

        def traced(*args: Any, _original: Any = original, _kind: str = kind, **kwargs: Any) -> Any:
            with meter.call(_kind):
                return _original(*args, **kwargs)

        async def async_traced(
            *args: Any, _original: Any = async_original, _kind: str = kind, **kwargs: Any
        ) -> Any:
            with meter.call(_kind):
                return await _original(*args, **kwargs)

        setattr(saver, kind, traced)
        setattr(saver, f"a{kind}", async_traced)


# --------------------------------------------------------------------------- samples


@dataclass
class Sample:
    seconds: list[float] = field(default_factory=list)
    # Requests on the request path (charged to saver calls), summed over the sample.
    cosmos: int = 0
    redis: int = 0
    postgres: int = 0
    redis_commands: int = 0  # server-side, every client
    # Cold requests made by put / put_writes calls other than the run's final put.
    intermediate_cold: int = 0
    write_calls: int = 0
    write_redis: int = 0
    max_write_redis: int = 0  # most Redis round trips one put / put_writes made
    max_intermediate_write_redis: int = 0
    # Write-behind: the explicit flush after each invoke (the app's boundary).
    flush_seconds: list[float] = field(default_factory=list)
    flush_cold: int = 0
    # Cosmos requests waited for one after the other, per operation (where measured).
    cosmos_sequential: list[int] = field(default_factory=list)

    @property
    def operations(self) -> int:
        return len(self.seconds)

    def absorb(self, calls: list[Call]) -> None:
        for call in calls:
            self.cosmos += call.cosmos
            self.redis += call.redis
            self.postgres += call.postgres

    def add_invoke(self, seconds: float, calls: list[Call], commands: int) -> None:
        self.seconds.append(seconds)
        self.absorb(calls)
        self.redis_commands += commands
        writes = [c for c in calls if c.kind in ("put", "put_writes")]
        puts = [c for c in writes if c.kind == "put"]
        final = puts[-1] if puts else None
        for call in writes:
            self.write_calls += 1
            self.write_redis += call.redis
            self.max_write_redis = max(self.max_write_redis, call.redis)
            if call is not final:
                self.intermediate_cold += call.cold
                self.max_intermediate_write_redis = max(
                    self.max_intermediate_write_redis, call.redis
                )

    def add_flush(self, seconds: float, calls: list[Call]) -> None:
        self.flush_seconds.append(seconds)
        self.flush_cold += sum(c.cold for c in calls)

    def per_op(self, total: int) -> float:
        return total / self.operations if self.operations else 0.0

    def pooled(self, other: Sample) -> Sample:
        """This sample and `other` (the same measurement in another round) as one."""
        return Sample(
            seconds=[*self.seconds, *other.seconds],
            cosmos=self.cosmos + other.cosmos,
            redis=self.redis + other.redis,
            postgres=self.postgres + other.postgres,
            redis_commands=self.redis_commands + other.redis_commands,
            intermediate_cold=self.intermediate_cold + other.intermediate_cold,
            write_calls=self.write_calls + other.write_calls,
            write_redis=self.write_redis + other.write_redis,
            max_write_redis=max(self.max_write_redis, other.max_write_redis),
            max_intermediate_write_redis=max(
                self.max_intermediate_write_redis, other.max_intermediate_write_redis
            ),
            flush_seconds=[*self.flush_seconds, *other.flush_seconds],
            flush_cold=self.flush_cold + other.flush_cold,
            cosmos_sequential=[*self.cosmos_sequential, *other.cosmos_sequential],
        )

    @property
    def cold(self) -> int:
        return self.cosmos + self.postgres

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def p95(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000

    @property
    def rate(self) -> float:
        """Operations per second, one after the other."""
        return self.operations / sum(self.seconds) if self.seconds else 0.0

    @property
    def flush_p50(self) -> float | None:
        return statistics.median(self.flush_seconds) * 1000 if self.flush_seconds else None


@dataclass
class FlushSample:
    """Write-behind: puts into the backlog, then one drain of it."""

    puts: int
    put_seconds: float
    backlog_entries: int  # reported by the flusher after the puts
    backlog_threads: int
    applied: int  # entries drain() applied
    drain_seconds: float
    drain_cold: int  # cold requests the drain made

    @property
    def put_rate(self) -> float:
        return self.puts / self.put_seconds

    @property
    def entry_rate(self) -> float:
        """Backlog entries the puts produced per second."""
        return max(self.backlog_entries, self.applied) / self.put_seconds

    @property
    def flush_rate(self) -> float:
        return self.applied / self.drain_seconds if self.drain_seconds else 0.0

    def pooled(self, other: FlushSample) -> FlushSample:
        return FlushSample(
            puts=self.puts + other.puts,
            put_seconds=self.put_seconds + other.put_seconds,
            backlog_entries=self.backlog_entries + other.backlog_entries,
            backlog_threads=max(self.backlog_threads, other.backlog_threads),
            applied=self.applied + other.applied,
            drain_seconds=self.drain_seconds + other.drain_seconds,
            drain_cold=self.drain_cold + other.drain_cold,
        )


@dataclass(frozen=True)
class Scale:
    warmup: int
    fresh_invokes: int  # invokes, each on a new thread
    sized_invokes: int  # per message count, each on its own seeded thread
    message_counts: tuple[int, ...]
    reads: int
    puts: int
    list_runs: int
    stored_counts: tuple[int, ...]
    # Messages the DeltaChannel conversation grows to (two per invoke).
    delta_messages: int
    # A series stops early once it has run this long (and has its minimum): a slow
    # contender cannot hold up the run; its row shows how many operations it did.
    budget_seconds: float
    # Sweeps over every contender, each after the first in the reverse order of the one
    # before, pooled: a contender and its baseline are measured as much early as late in
    # the run, so the machine's speed drifting during it (a shared host's) moves both alike.
    rounds: int


FULL = Scale(
    warmup=10,
    fresh_invokes=50,
    sized_invokes=20,
    message_counts=(10, 100, 1000),
    reads=200,
    puts=200,
    list_runs=8,
    # 1000 for this project's savers only (see `bench_stored`).
    stored_counts=(10, 100, 1000),
    delta_messages=300,
    budget_seconds=15.0,
    rounds=2,
)
QUICK = Scale(
    warmup=2,
    fresh_invokes=8,
    sized_invokes=2,
    message_counts=(10, 1000),
    reads=20,
    puts=20,
    list_runs=2,
    stored_counts=(10,),
    delta_messages=40,
    budget_seconds=3.0,
    rounds=1,
)
LIST_DEPTH = 120
PUT_WINDOW = 10  # messages in each put of the put benchmark (~10 KB)


@dataclass(frozen=True)
class EmulatorFloor:
    point_read_ms: float
    query_ms: float
    documents: int
    upsert_ms: float  # of a document the size of the put series' checkpoints


@dataclass
class Results:
    ping: Sample
    fresh: dict[Key, Sample] = field(default_factory=dict)
    sized: dict[tuple[str, Api, int], Sample] = field(default_factory=dict)
    reads: dict[Key, Sample] = field(default_factory=dict)
    puts: dict[Key, Sample] = field(default_factory=dict)
    lists: dict[Key, Sample] = field(default_factory=dict)
    flush: dict[Key, FlushSample] = field(default_factory=dict)
    # (all checkpoints, after prune(keep_latest) or None if the saver cannot prune, hot)
    stored: dict[tuple[str, int], tuple[int, int | None, int]] = field(default_factory=dict)
    # The same history grown through a DeltaChannel graph (this project's savers).
    stored_delta: dict[tuple[str, int], int] = field(default_factory=dict)
    failures: dict[Key, str] = field(default_factory=dict)
    # Warm reads and PINGs alternated: the earlier warm-read target's figures.
    warm_vs_ping: tuple[Sample, Sample] | None = None
    cold_latest_round_trips: float | None = None
    emulator: EmulatorFloor | None = None
    # The DeltaChannel conversation (async API): every invoke of it, the same workload on
    # an operator.add list (Cosmos contenders), and a cold get_state of its thread.
    delta: dict[str, Sample] = field(default_factory=dict)
    delta_plain: dict[str, Sample] = field(default_factory=dict)
    delta_cold_state: dict[str, Sample] = field(default_factory=dict)


Pooled = TypeVar("Pooled", Sample, FlushSample)


def _pooled(rounds: Sequence[dict[Any, Pooled]]) -> dict[Any, Pooled]:
    merged: dict[Any, Pooled] = {}
    for measured in rounds:
        for key, sample in measured.items():
            merged[key] = merged[key].pooled(sample) if key in merged else sample
    return merged


def pool_rounds(rounds: Sequence[Results]) -> Results:
    """The rounds as one run: each measurement's samples pooled; what one round alone
    measures (stored bytes, in the first) kept from it."""
    ping = rounds[0].ping
    for later in rounds[1:]:
        ping = ping.pooled(later.ping)
    warm = [r.warm_vs_ping for r in rounds if r.warm_vs_ping is not None]
    warm_vs_ping = None
    if warm:
        reads, pings = warm[0]
        for more_reads, more_pings in warm[1:]:
            reads, pings = reads.pooled(more_reads), pings.pooled(more_pings)
        warm_vs_ping = (reads, pings)
    return Results(
        ping=ping,
        fresh=_pooled([r.fresh for r in rounds]),
        sized=_pooled([r.sized for r in rounds]),
        reads=_pooled([r.reads for r in rounds]),
        puts=_pooled([r.puts for r in rounds]),
        lists=_pooled([r.lists for r in rounds]),
        flush=_pooled([r.flush for r in rounds]),
        stored={k: v for r in rounds for k, v in r.stored.items()},
        stored_delta={k: v for r in rounds for k, v in r.stored_delta.items()},
        failures={k: v for r in rounds for k, v in r.failures.items()},
        warm_vs_ping=warm_vs_ping,
        cold_latest_round_trips=next(
            (r.cold_latest_round_trips for r in rounds if r.cold_latest_round_trips is not None),
            None,
        ),
        emulator=next((r.emulator for r in rounds if r.emulator is not None), None),
        delta=_pooled([r.delta for r in rounds]),
        delta_plain=_pooled([r.delta_plain for r in rounds]),
        delta_cold_state=_pooled([r.delta_cold_state for r in rounds]),
    )


# --------------------------------------------------------------------------- contenders


class Backlog(Protocol):
    entries: int
    threads: int
    oldest_age_seconds: float | None


class Flusher(Protocol):
    async def drain(self, limit: int | None = None) -> int: ...

    async def backlog(self) -> Backlog: ...


async def _here(coro: Coroutine[Any, Any, T]) -> T:
    return await coro


@dataclass
class Handle:
    saver: BaseCheckpointSaver[Any]
    # Runs a coroutine on the loop the saver's clients live on.
    on_backends: Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]] = _here
    flusher: Flusher | None = None
    stored_bytes: Callable[[str], Awaitable[int]] | None = None
    hot_bytes: Callable[[str], Awaitable[int]] | None = None


@dataclass
class Contender:
    name: str
    open: Callable[[Api], AbstractAsyncContextManager[Handle]]
    backend: ColdBackend | None = None  # None: not this project's saver
    redis: bool = False
    write_behind: bool = False
    # The row's name per API where the implementation differs (LangGraph's Postgres savers).
    labels: dict[Api, str] = field(default_factory=dict)

    def label(self, api: Api) -> str:
        return self.labels.get(api, self.name)

    @property
    def talks_to(self) -> tuple[Literal["cosmos", "redis", "postgres"], ...]:
        """The servers this contender's requests must reach (and be counted at)."""
        servers: list[Literal["cosmos", "redis", "postgres"]] = []
        if contender_uses_cosmos(self.name):
            servers.append("cosmos")
        if self.backend is ColdBackend.POSTGRES or self.name == LG_POSTGRES:
            servers.append("postgres")
        if self.redis:
            servers.append("redis")
        return tuple(servers)


MEMORY = "InMemorySaver"
LG_POSTGRES = "LangGraph PostgresSaver"
COSMOSDB_PACKAGE = "langgraph-checkpoint-cosmosdb"
PG_WT = "tiered Postgres, write-through"
PGR_WT = "tiered Postgres+Redis, write-through"
PGR_WB = "tiered Postgres+Redis, write-behind"
CO_WT = "tiered Cosmos, write-through"
COR_WT = "tiered Cosmos+Redis, write-through"
COR_WB = "tiered Cosmos+Redis, write-behind"
POSTGRES_OURS = (PG_WT, PGR_WT, PGR_WB)
WRITE_BEHIND = (PGR_WB, COR_WB)

# Stored size of one thread's payload columns as Postgres keeps them (pg_column_size:
# after TOAST compression, which Postgres applies by itself to values over ~2 KB).
POSTGRES_STORED_BYTES = """
SELECT
    (SELECT COALESCE(SUM(pg_column_size(checkpoint) + pg_column_size(metadata)
                         + pg_column_size(channel_versions)), 0)
     FROM cp_checkpoints WHERE thread_id = %s)
  + (SELECT COALESCE(SUM(pg_column_size(blob)), 0) FROM cp_blobs WHERE thread_id = %s)
  + (SELECT COALESCE(SUM(pg_column_size(blob)), 0) FROM cp_writes WHERE thread_id = %s)
  + (SELECT COALESCE(SUM(pg_column_size(data)), 0) FROM cp_chunks WHERE thread_id = %s)
  AS bytes
"""

LANGGRAPH_POSTGRES_STORED_BYTES = """
SELECT
    (SELECT COALESCE(SUM(pg_column_size(checkpoint) + pg_column_size(metadata)), 0)
     FROM checkpoints WHERE thread_id = %s)
  + (SELECT COALESCE(SUM(pg_column_size(blob)), 0) FROM checkpoint_blobs WHERE thread_id = %s)
  + (SELECT COALESCE(SUM(pg_column_size(blob)), 0) FROM checkpoint_writes WHERE thread_id = %s)
  AS bytes
"""


def postgres_stored_bytes(url: str, query: str) -> Callable[[str], Awaitable[int]]:
    async def stored(thread_id: str) -> int:
        async with await psycopg.AsyncConnection.connect(url, row_factory=dict_row) as conn:
            cursor = await conn.execute(query, (thread_id,) * query.count("%s"))
            row = await cursor.fetchone()
        return int(row["bytes"]) if row else 0

    return stored


def redis_hot_bytes(observer: aioredis.Redis) -> Callable[[str], Awaitable[int]]:
    async def hot(thread_id: str) -> int:
        keys = [key async for key in observer.scan_iter(match=f"{{{thread_id}}}:*")]
        return sum([int(await observer.memory_usage(key) or 0) for key in keys])

    return hot


@contextmanager
def package_client_for_emulator(endpoint: str, key: str) -> Iterator[None]:
    """langgraph-checkpoint-cosmosdb builds its own client from COSMOSDB_ENDPOINT /
    COSMOSDB_KEY; the emulator's certificate is self-signed, so (here only) that client
    skips verification."""
    import langgraph_checkpoint_cosmosdb.cosmosdbSaver as package

    names = ("COSMOSDB_ENDPOINT", "COSMOSDB_KEY", "AGENTSTATE_QUIET")
    saved_env = {name: os.environ.get(name) for name in names}
    original = package.CosmosClient
    package.CosmosClient = partial(original, connection_verify=False)
    os.environ.update(COSMOSDB_ENDPOINT=endpoint, COSMOSDB_KEY=key, AGENTSTATE_QUIET="1")
    try:
        yield
    finally:
        package.CosmosClient = original
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def contenders(
    base: dict[str, Any], observer: aioredis.Redis, round_index: int = 0
) -> list[Contender]:
    """Every saver measured; Cosmos containers of their own per round, so each round
    starts from the same (empty) containers."""
    postgres_url: str = base["postgres_url"]
    in_round = f"-r{round_index}" if round_index else ""

    @asynccontextmanager
    async def memory(_api: Api) -> AsyncIterator[Handle]:
        saver = InMemorySaver()

        async def stored(thread_id: str) -> int:
            size = 0
            for per_ns in saver.storage.get(thread_id, {}).values():
                for checkpoint, metadata, _parent in per_ns.values():
                    size += len(checkpoint[1]) + len(metadata[1])
            for (thread, _ns, _channel, _version), blob in saver.blobs.items():
                size += len(blob[1]) if thread == thread_id else 0
            for (thread, _ns, _id), writes in saver.writes.items():
                size += sum(len(w[3][1]) for w in writes.values()) if thread == thread_id else 0
            return size

        yield Handle(saver, stored_bytes=stored)

    @asynccontextmanager
    async def langgraph_postgres(api: Api) -> AsyncIterator[Handle]:
        stored = postgres_stored_bytes(postgres_url, LANGGRAPH_POSTGRES_STORED_BYTES)
        if api == "async":
            async with AsyncPostgresSaver.from_conn_string(postgres_url) as saver:
                await saver.setup()
                yield Handle(saver, stored_bytes=stored)
        else:
            with PostgresSaver.from_conn_string(postgres_url) as sync_saver:
                sync_saver.setup()
                yield Handle(sync_saver, stored_bytes=stored)

    @asynccontextmanager
    async def cosmosdb_package(api: Api) -> AsyncIterator[Handle]:
        from langgraph_checkpoint_cosmosdb import CosmosDBSaver

        def build() -> Any:
            with package_client_for_emulator(base["cosmos_endpoint"], base["cosmos_key"]):
                return CosmosDBSaver(
                    base["cosmos_database"], f"bench-cosmosdb-package-{api}{in_round}"
                )

        saver = await asyncio.to_thread(build)

        def stored_sync(thread_id: str) -> int:
            documents = saver.container.query_items(
                "SELECT * FROM c WHERE STARTSWITH(c.partition_key, @checkpoints)"
                " OR STARTSWITH(c.partition_key, @writes)",
                parameters=[
                    {"name": "@checkpoints", "value": f"checkpoint${thread_id}$"},
                    {"name": "@writes", "value": f"writes${thread_id}$"},
                ],
                enable_cross_partition_query=True,
            )
            return sum(len(json.dumps(doc).encode()) for doc in documents)

        async def stored(thread_id: str) -> int:
            return await asyncio.to_thread(stored_sync, thread_id)

        try:
            yield Handle(saver, stored_bytes=stored)
        finally:
            saver.client.close()

    def tiered(
        backend: ColdBackend, redis: bool, write_behind: bool, slug: str
    ) -> Callable[[Api], AbstractAsyncContextManager[Handle]]:
        @asynccontextmanager
        async def open_tiered(api: Api) -> AsyncIterator[Handle]:
            settings = Settings.model_validate(
                {
                    **base,
                    "state_cold_backend": backend,
                    "redis_url": base["redis_url"] if redis else None,
                    "state_write_mode": (
                        WriteMode.WRITE_BEHIND if write_behind else WriteMode.WRITE_THROUGH
                    ),
                    # One container per contender and API: stored bytes and listings
                    # never see another contender's documents.
                    "cosmos_container": f"bench-{slug}-{api}{in_round}",
                }
            )
            connection = (
                CosmosConnection(settings.cosmos) if backend is ColdBackend.COSMOS else None
            )

            async def cosmos_stored(thread_id: str) -> int:
                assert connection is not None
                container = await connection.container()
                size = 0
                async for doc in container.query_items(
                    "SELECT * FROM c WHERE c.thread_id = @thread",
                    parameters=[{"name": "@thread", "value": thread_id}],
                    partition_key=thread_id,
                ):
                    size += len(json.dumps(doc).encode())
                return size

            stored = (
                cosmos_stored
                if connection is not None
                else postgres_stored_bytes(postgres_url, POSTGRES_STORED_BYTES)
            )
            hot = redis_hot_bytes(observer) if redis else None
            try:
                async with tiered_saver(settings, api, write_behind) as (
                    saver,
                    on_backends,
                    flusher,
                ):
                    yield Handle(saver, on_backends, flusher, stored, hot)
            finally:
                if connection is not None:
                    await connection.close()

        return open_tiered

    postgres, cosmos = ColdBackend.POSTGRES, ColdBackend.COSMOS
    return [
        Contender(MEMORY, memory),
        Contender(
            LG_POSTGRES,
            langgraph_postgres,
            labels={"sync": "LangGraph PostgresSaver", "async": "LangGraph AsyncPostgresSaver"},
        ),
        Contender(COSMOSDB_PACKAGE, cosmosdb_package),
        Contender(PG_WT, tiered(postgres, False, False, "pg-wt"), postgres),
        Contender(PGR_WT, tiered(postgres, True, False, "pgr-wt"), postgres, redis=True),
        Contender(
            PGR_WB, tiered(postgres, True, True, "pgr-wb"), postgres, redis=True, write_behind=True
        ),
        Contender(CO_WT, tiered(cosmos, False, False, "cosmos-wt"), cosmos),
        Contender(COR_WT, tiered(cosmos, True, False, "cosmosr-wt"), cosmos, redis=True),
        Contender(
            COR_WB,
            tiered(cosmos, True, True, "cosmosr-wb"),
            cosmos,
            redis=True,
            write_behind=True,
        ),
    ]


def _flusher(backends: Backends, write_behind: bool) -> Flusher | None:
    if not write_behind:
        return None
    flusher: Flusher | None = backends.flusher
    if flusher is None:
        raise BenchmarkError("STATE_WRITE_MODE=write-behind, yet the backends have no flusher")
    return flusher


@asynccontextmanager
async def tiered_saver(
    settings: Settings, api: Api, write_behind: bool
) -> AsyncIterator[
    tuple[
        TieredCheckpointSaver,
        Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]],
        Flusher | None,
    ]
]:
    """The saver as an app builds it: on this loop (async API) or a loop thread (sync API)."""
    if api == "async":
        backends = await open_backends(settings)
        try:
            flusher = _flusher(backends, write_behind)
            yield TieredCheckpointSaver.from_backends(backends), _here, flusher
        finally:
            await backends.close()
        return

    runner = LoopThread("bench-saver-loop")

    async def on_runner(coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, runner.loop))

    async def build(backends: Backends) -> TieredCheckpointSaver:
        return TieredCheckpointSaver.from_backends(backends)  # on the loop that opened them

    try:
        backends = await on_runner(open_backends(settings))
        try:
            flusher = _flusher(backends, write_behind)
            yield await on_runner(build(backends)), on_runner, flusher
        finally:
            await on_runner(backends.close())
    finally:
        await asyncio.to_thread(runner.stop)


# --------------------------------------------------------------------------- drivers


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


class Driver:
    """One API of LangGraph and the savers: every operation returns its own duration,
    measured in the thread that performs it."""

    api: Api

    def __init__(self, meter: Meter) -> None:
        self.meter = meter


class AsyncDriver(Driver):
    api: Api = "async"

    async def invoke(
        self, graph: Any, values: dict[str, Any], config: RunnableConfig
    ) -> tuple[float, Any]:
        started = time.perf_counter()
        result = await graph.ainvoke(values, config)
        return time.perf_counter() - started, result

    async def seed(self, graph: Any, config: RunnableConfig, values: dict[str, Any]) -> None:
        await graph.aupdate_state(config, values, as_node=NODES[-1])

    async def get(self, saver: BaseCheckpointSaver[Any], config: RunnableConfig) -> float:
        started = time.perf_counter()
        found = await saver.aget_tuple(config)
        seconds = time.perf_counter() - started
        if found is None:
            raise BenchmarkError("get_tuple found no checkpoint")
        return seconds

    async def put(
        self, saver: BaseCheckpointSaver[Any], config: RunnableConfig, *args: Any
    ) -> tuple[float, RunnableConfig]:
        started = time.perf_counter()
        stored = await saver.aput(config, *args)
        return time.perf_counter() - started, stored

    async def list(self, saver: BaseCheckpointSaver[Any], config: RunnableConfig) -> float:
        started = time.perf_counter()
        with self.meter.call("list"):
            count = len([t async for t in saver.alist(config)])
        seconds = time.perf_counter() - started
        if count != LIST_DEPTH:
            raise BenchmarkError(f"list returned {count} checkpoints, not {LIST_DEPTH}")
        return seconds

    async def flush(self, saver: BaseCheckpointSaver[Any], thread_id: str) -> float:
        started = time.perf_counter()
        with self.meter.call("flush"):
            await saver.aflush(thread_id)
        return time.perf_counter() - started


class SyncDriver(Driver):
    api: Api = "sync"

    async def invoke(
        self, graph: Any, values: dict[str, Any], config: RunnableConfig
    ) -> tuple[float, Any]:
        return await asyncio.to_thread(_timed, partial(graph.invoke, values, config))

    async def seed(self, graph: Any, config: RunnableConfig, values: dict[str, Any]) -> None:
        await asyncio.to_thread(graph.update_state, config, values, as_node=NODES[-1])

    async def get(self, saver: BaseCheckpointSaver[Any], config: RunnableConfig) -> float:
        seconds, found = await asyncio.to_thread(_timed, partial(saver.get_tuple, config))
        if found is None:
            raise BenchmarkError("get_tuple found no checkpoint")
        return seconds

    async def put(
        self, saver: BaseCheckpointSaver[Any], config: RunnableConfig, *args: Any
    ) -> tuple[float, RunnableConfig]:
        return await asyncio.to_thread(_timed, partial(saver.put, config, *args))

    async def list(self, saver: BaseCheckpointSaver[Any], config: RunnableConfig) -> float:
        def listing() -> int:
            with self.meter.call("list"):
                return len(list(saver.list(config)))

        seconds, count = await asyncio.to_thread(_timed, listing)
        if count != LIST_DEPTH:
            raise BenchmarkError(f"list returned {count} checkpoints, not {LIST_DEPTH}")
        return seconds

    async def flush(self, saver: BaseCheckpointSaver[Any], thread_id: str) -> float:
        def flush() -> None:
            with self.meter.call("flush"):
                saver.flush(thread_id)

        seconds, _ = await asyncio.to_thread(_timed, flush)
        return seconds


# --------------------------------------------------------------------------- one contender, one API


class PairRun:
    """Every measurement of one contender through one API."""

    def __init__(
        self,
        contender: Contender,
        api: Api,
        handle: Handle,
        scale: Scale,
        meter: Meter,
        observer: aioredis.Redis,
        messages: list[dict[str, str]],
    ) -> None:
        self.contender = contender
        self.api = api
        self.handle = handle
        self.saver = handle.saver
        self.scale = scale
        self.meter = meter
        self.observer = observer
        self.messages = messages
        self.driver: AsyncDriver | SyncDriver = (
            AsyncDriver(meter) if api == "async" else SyncDriver(meter)
        )
        trace(self.saver, meter)
        replies = {name: messages[-1 - i] for i, name in enumerate(NODES)}
        self.graph = chat_graph(self.saver, replies)

    @property
    def key(self) -> Key:
        return (self.contender.name, self.api)

    def phase(self, name: str, started: float, sample: Sample | None = None) -> None:
        done = f", {sample.operations} ops" if sample is not None else ""
        log(
            f"{self.contender.label(self.api)} [{self.api}] {name}: "
            f"{time.perf_counter() - started:.1f} s{done}"
        )

    async def redis_commands(self) -> int:
        if not self.contender.redis:
            return 0
        stats = await self.observer.info("commandstats")
        return sum(
            int(v["calls"])
            for k, v in stats.items()
            if k not in ("cmdstat_info", "cmdstat_ping", "cmdstat_memory", "cmdstat_scan")
        )

    async def settle(self, thread_id: str) -> None:
        """Write-behind: bring the thread's backlog into the cold tier (an app's boundary)."""
        if self.contender.write_behind:
            await self.driver.flush(self.saver, thread_id)

    async def drain(self) -> int:
        if self.handle.flusher is None:
            return 0
        applied: int = await self.handle.on_backends(self.handle.flusher.drain())
        return applied

    @staticmethod
    async def _restart(flusher: Flusher) -> None:
        flusher.start()  # on the loop that owns the backends

    def turn(self, index: int) -> dict[str, Any]:
        return {"messages": [self.messages[index % len(self.messages)]]}

    async def warm_up(self) -> None:
        # Unmeasured runs first: the first contender on a server would otherwise also pay
        # for warming it up (the emulator's JIT, connection pools).
        started = time.perf_counter()
        for index in range(self.scale.warmup):
            await self.driver.invoke(self.graph, self.turn(index), config_for(new_thread("warm")))
        await self.drain()
        self.phase("warm-up", started)

    async def invokes(self, count: int, seeded: int, minimum: int) -> Sample:
        """`count` invokes, each on a new thread already holding `seeded` messages."""
        sample = Sample()
        started = time.perf_counter()
        for index in range(count):
            if index >= minimum and time.perf_counter() - started > self.scale.budget_seconds:
                break
            thread = new_thread(f"chat{seeded}")
            config = config_for(thread)
            if seeded:
                await self.driver.seed(self.graph, config, {"messages": self.messages[:seeded]})
                await self.settle(thread)
            commands = await self.redis_commands()
            with self.meter.window() as calls:
                seconds, result = await self.driver.invoke(self.graph, self.turn(index), config)
            sample.add_invoke(seconds, calls, await self.redis_commands() - commands)
            got = len(result["messages"])
            if got != seeded + 1 + len(NODES):
                raise BenchmarkError(f"invoke left {got} messages, not {seeded + 1 + len(NODES)}")
            if self.contender.write_behind:
                with self.meter.window() as calls:
                    flushed = await self.driver.flush(self.saver, thread)
                sample.add_flush(flushed, calls)
        return sample

    async def series(self, count: int, operation: Callable[[int], Awaitable[float]]) -> Sample:
        """`count` timed operations, each one call of its own; commands over the series."""
        sample = Sample()
        commands = await self.redis_commands()
        started = time.perf_counter()
        for index in range(count):
            if index >= 3 and time.perf_counter() - started > self.scale.budget_seconds:
                break
            with self.meter.window() as calls:
                sample.seconds.append(await operation(index))
            sample.absorb(calls)
        sample.redis_commands = await self.redis_commands() - commands
        return sample

    async def put_chain(
        self, thread_id: str, count: int, values: Callable[[int], dict[str, Any]]
    ) -> Sample:
        """`count` checkpoints on one thread, each changing every channel in `values`."""
        state: dict[str, Any] = {"config": config_for(thread_id), "version": None}

        async def put(step: int) -> float:
            checkpoint = empty_checkpoint()
            channel_values = values(step)
            state["version"] = self.saver.get_next_version(state["version"], None)
            checkpoint["channel_values"] = channel_values
            checkpoint["channel_versions"] = dict.fromkeys(channel_values, state["version"])
            seconds, stored = await self.driver.put(
                self.saver,
                state["config"],
                checkpoint,
                {"source": "loop", "step": step, "parents": {}},
                dict.fromkeys(channel_values, state["version"]),
            )
            state["config"] = {"configurable": dict(stored["configurable"])}
            return seconds

        sample = Sample()
        commands = await self.redis_commands()
        for step in range(count):
            with self.meter.window() as calls:
                sample.seconds.append(await put(step))
            sample.absorb(calls)
        sample.redis_commands = await self.redis_commands() - commands
        return sample

    async def run(self, results: Results, with_stored: bool) -> None:
        scale = self.scale
        await self.warm_up()

        started = time.perf_counter()
        results.fresh[self.key] = sample = await self.invokes(scale.fresh_invokes, 0, 5)
        self.phase(f"invoke on {scale.fresh_invokes} fresh threads", started, sample)

        for count in scale.message_counts:
            started = time.perf_counter()
            sample = await self.invokes(scale.sized_invokes, count, 1)
            results.sized[(self.contender.name, self.api, count)] = sample
            self.phase(f"invoke at {count} messages", started, sample)

        await self.bench_reads(results)
        await self.bench_puts(results)
        await self.bench_list(results)
        if with_stored:
            await self.bench_stored(results)
        # langgraph-checkpoint-cosmosdb has no DeltaChannel fast path: LangGraph's default
        # walk (a get_tuple per ancestor) would take minutes at 300 messages.
        if self.api == "async" and self.contender.name != COSMOSDB_PACKAGE:
            await self.bench_delta(results)

    async def bench_reads(self, results: Results) -> None:
        started = time.perf_counter()
        thread = new_thread("read")
        config = config_for(thread)
        await self.driver.invoke(self.graph, self.turn(0), config)
        await self.settle(thread)
        await self.driver.get(self.saver, config)  # a cache-aside saver fills its cache here

        async def read(_: int) -> float:
            return await self.driver.get(self.saver, config)

        results.reads[self.key] = sample = await self.series(self.scale.reads, read)
        name = self.contender.name
        if name == COR_WT and self.api == "async":
            results.warm_vs_ping = await alternate(read, self.observer, min(self.scale.reads, 200))
        if name == CO_WT and self.api == "async":
            results.cold_latest_round_trips = sample.per_op(sample.cosmos)
        self.phase("get_tuple", started, sample)

    async def bench_puts(self, results: Results) -> None:
        started = time.perf_counter()
        flusher = self.handle.flusher
        before = None
        if flusher is not None:
            # The background flusher waits while the puts run, so the drain timed below
            # has the whole backlog to move (its rate, not the puts', is measured).
            await self.handle.on_backends(flusher.stop())
            await self.drain()
            before = await self.handle.on_backends(flusher.backlog())
        window = self.messages[:PUT_WINDOW]

        def values(step: int) -> dict[str, Any]:
            return {"messages": [*window[1:], self.messages[step % len(self.messages)]]}

        sample = await self.put_chain(new_thread("put"), self.scale.puts, values)
        results.puts[self.key] = sample
        self.phase("put", started, sample)
        if flusher is None:
            return
        after = await self.handle.on_backends(flusher.backlog())
        assert before is not None
        cold = self.meter.cold_total()
        drain_started = time.perf_counter()
        applied = await self.drain()
        drain_seconds = time.perf_counter() - drain_started
        await self.handle.on_backends(self._restart(flusher))
        results.flush[self.key] = FlushSample(
            puts=sample.operations,
            put_seconds=sum(sample.seconds),
            backlog_entries=after.entries - before.entries,
            backlog_threads=after.threads,
            applied=applied,
            drain_seconds=drain_seconds,
            drain_cold=self.meter.cold_total() - cold,
        )
        self.phase(f"drain of {applied} backlog entries", drain_started)

    async def bench_list(self, results: Results) -> None:
        started = time.perf_counter()
        thread = new_thread("list")
        await self.put_chain(thread, LIST_DEPTH, lambda step: {"status": step, "log": [step] * 5})
        await self.settle(thread)
        config = config_for(thread)

        async def listing(_: int) -> float:
            return await self.driver.list(self.saver, config)

        results.lists[self.key] = sample = await self.series(self.scale.list_runs, listing)
        self.phase("list", started, sample)

    async def bench_stored(self, results: Results) -> None:
        started = time.perf_counter()
        handle = self.handle
        assert handle.stored_bytes is not None
        for count in self.scale.stored_counts:
            if count > 100 and self.contender.backend is None:
                # Savers that store every version whole write ~500 MB for 1000 messages.
                continue
            thread = new_thread(f"stored{count}")
            await self.put_chain(
                thread, count, lambda step: {"messages": self.messages[: step + 1]}
            )
            await self.settle(thread)
            full = await handle.stored_bytes(thread)
            hot = await handle.hot_bytes(thread) if handle.hot_bytes else 0
            pruned = None
            if type(self.saver).aprune is not BaseCheckpointSaver.aprune:
                await self.saver.aprune([thread], strategy="keep_latest")
                await self.settle(thread)
                pruned = await handle.stored_bytes(thread)
            results.stored[(self.contender.name, count)] = (full, pruned, hot)
        if self.contender.backend is not None:
            # The same history grown by a graph whose list is a DeltaChannel (two new
            # messages per invoke, a snapshot every DELTA_SNAPSHOT_FREQUENCY updates).
            count = max(self.scale.stored_counts)
            graph = growing_delta_graph(self.saver, self.messages)
            thread = new_thread(f"stored-delta{count}")
            for _ in range(count // 2):
                await self.driver.invoke(graph, {"messages": []}, config_for(thread))
            await self.settle(thread)
            results.stored_delta[(self.contender.name, count)] = await handle.stored_bytes(thread)
        self.phase("stored bytes", started)

    async def conversation(self, delta: bool) -> tuple[Sample, str]:
        """Invokes on one thread until it holds `delta_messages` messages; the thread id."""
        graph = pair_graph(self.saver, self.messages[-2:], delta=delta)
        thread = new_thread("delta" if delta else "pairs")
        config = config_for(thread)
        sample = Sample()
        for index in range(self.scale.delta_messages // 2):
            commands = await self.redis_commands()
            with self.meter.window() as calls, self.meter.spans() as spans:
                seconds, result = await self.driver.invoke(graph, {"messages": []}, config)
            sample.add_invoke(seconds, calls, await self.redis_commands() - commands)
            sample.cosmos_sequential.append(sequential(spans))
            if len(result["messages"]) != 2 * (index + 1):
                raise BenchmarkError(
                    f"invoke {index} left {len(result['messages'])} messages, not {2 * (index + 1)}"
                )
            if self.contender.write_behind:
                with self.meter.window() as calls:
                    flushed = await self.driver.flush(self.saver, thread)
                sample.add_flush(flushed, calls)
        return sample, thread

    async def bench_delta(self, results: Results) -> None:
        name = self.contender.name
        started = time.perf_counter()
        sample, thread = await self.conversation(delta=True)
        results.delta[name] = sample
        self.phase(
            f"DeltaChannel conversation to {self.scale.delta_messages} messages", started, sample
        )
        if not contender_uses_cosmos(name) or self.contender.backend is None:
            return
        started = time.perf_counter()
        plain, _ = await self.conversation(delta=False)
        results.delta_plain[name] = plain
        self.phase("the same with operator.add", started, plain)
        # Nothing cached: the cold tier alone answers (the thread's backlog is flushed).
        await self.settle(thread)
        saver = self.saver
        assert isinstance(saver, TieredCheckpointSaver)
        if saver.cache is not None:
            await self.handle.on_backends(saver.cache.invalidate(thread))
        # The newest checkpoint whose DeltaChannel value is rebuilt (the conversation may
        # end on a snapshot, which needs no history): the longest chain of the window.
        target = None
        async for found in saver.alist(config_for(thread), limit=8):
            if "messages" in (found.metadata.get("counters_since_delta_snapshot") or {}):
                target = found.config
                break
        if target is None:
            raise BenchmarkError("no checkpoint of the DeltaChannel thread rebuilds its value")
        graph = pair_graph(self.saver, self.messages[-2:], delta=True)
        cold = Sample()
        with (
            self.meter.window() as calls,
            self.meter.spans() as spans,
            self.meter.call("get_state"),
        ):
            begun = time.perf_counter()
            state = await graph.aget_state(target)
            cold.seconds.append(time.perf_counter() - begun)
        cold.absorb(calls)
        cold.cosmos_sequential.append(sequential(spans))
        if len(state.values["messages"]) < self.scale.delta_messages - 2:
            raise BenchmarkError("a cold get_state rebuilt the wrong DeltaChannel value")
        results.delta_cold_state[name] = cold


async def alternate(
    read: Callable[[int], Awaitable[float]], client: aioredis.Redis, count: int
) -> tuple[Sample, Sample]:
    """A warm read then a PING, `count` times: the same conditions for both."""
    reads, pings = Sample(), Sample()
    for index in range(count):
        reads.seconds.append(await read(index))
        started = time.perf_counter()
        await client.ping()
        pings.seconds.append(time.perf_counter() - started)
    return reads, pings


async def probe_emulator(settings: Settings, count: int = 50) -> EmulatorFloor | None:
    """What one point read, one trivial single-partition query and one upsert cost on the
    emulator: the floor under any saver's request."""
    connection = CosmosConnection(settings.cosmos)
    try:
        container = await connection.container()
        documents = [doc async for doc in container.query_items("SELECT c.id, c.thread_id FROM c")]
        if not documents:
            return None
        anchor = documents[0]
        # As large as a put of the put series stores whole (ten ~1 KB messages).
        sized = {"id": f"floor-{uuid.uuid4().hex}", "thread_id": anchor["thread_id"]}
        sized["padding"] = "x" * 11_000
        reads, queries, upserts = [], [], []
        for _ in range(count):
            started = time.perf_counter()
            await container.upsert_item(sized)
            upserts.append(time.perf_counter() - started)
            started = time.perf_counter()
            await container.read_item(anchor["id"], partition_key=anchor["thread_id"])
            reads.append(time.perf_counter() - started)
            started = time.perf_counter()
            found = [
                doc
                async for doc in container.query_items(
                    "SELECT c.id FROM c WHERE c.thread_id = @thread AND c.id = @id",
                    parameters=[
                        {"name": "@thread", "value": anchor["thread_id"]},
                        {"name": "@id", "value": anchor["id"]},
                    ],
                    partition_key=anchor["thread_id"],
                )
            ]
            queries.append(time.perf_counter() - started)
            if len(found) != 1:
                raise BenchmarkError("the emulator lost a document between two reads")
        await container.delete_item(sized["id"], partition_key=anchor["thread_id"])
        return EmulatorFloor(
            statistics.median(reads) * 1000,
            statistics.median(queries) * 1000,
            len(documents),
            statistics.median(upserts) * 1000,
        )
    finally:
        await connection.close()


async def bench_ping(client: aioredis.Redis, count: int) -> Sample:
    await client.ping()
    sample = Sample()
    for _ in range(count):
        started = time.perf_counter()
        await client.ping()
        sample.seconds.append(time.perf_counter() - started)
    return sample


# --------------------------------------------------------------------------- report


def machine_facts(redis_version: str) -> list[tuple[str, str]]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return [
        ("Date (UTC)", datetime.now(UTC).strftime("%Y-%m-%d %H:%M")),
        ("Machine", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("CPU", f"{cpu}, {os.cpu_count()} logical cores"),
        ("Python", platform.python_version()),
        ("langgraph", version("langgraph")),
        ("langgraph-checkpoint", version("langgraph-checkpoint")),
        ("langgraph-checkpoint-postgres", version("langgraph-checkpoint-postgres")),
        ("langgraph-checkpoint-cosmosdb", version("langgraph-checkpoint-cosmosdb")),
        ("azure-cosmos", version("azure-cosmos")),
        ("redis-py", version("redis")),
        ("psycopg", version("psycopg")),
        ("Redis server", redis_version),
        ("Cosmos", "@vercel/cosmosdb-server emulator (Node.js, HTTPS keep-alive, loopback)"),
        ("Postgres", "local PostgreSQL server (fsync off, loopback)"),
    ]


def _ms(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


class Report:
    def __init__(self, results: Results, chosen: list[Contender], scale: Scale) -> None:
        self.r = results
        self.contenders = chosen
        self.scale = scale
        self.names = {c.name for c in chosen}
        self.by_name = {c.name: c for c in chosen}

    def rows(self) -> Iterator[tuple[Contender, Api]]:
        for contender in self.contenders:
            for api in APIS:
                yield contender, api

    def fresh_p50(self, name: str, api: Api) -> float | None:
        sample = self.r.fresh.get((name, api))
        return sample.p50 if sample and sample.seconds else None

    def sized_p50(self, name: str, api: Api, count: int) -> float | None:
        sample = self.r.sized.get((name, api, count))
        return sample.p50 if sample and sample.seconds else None

    def put_rate(self, name: str, api: Api) -> float | None:
        sample = self.r.puts.get((name, api))
        return sample.rate if sample and sample.seconds else None

    def p50(self, table: dict[Key, Sample], name: str, api: Api) -> float | None:
        sample = table.get((name, api))
        return sample.p50 if sample and sample.seconds else None

    # ------------------------------------------------------------------- tables

    def header(self, facts: list[tuple[str, str]]) -> list[str]:
        s = self.scale
        counts = " / ".join(str(c) for c in s.message_counts)
        return [
            "# Checkpointer benchmark",
            "",
            "Generated by `benchmarks/bench_checkpointer.py` (do not edit by hand). All figures",
            "come from one run on one machine; ratios and verdicts are computed from that same run.",
            *(
                [
                    f"It sweeps every contender {s.rounds} times, each sweep after the first in the",
                    "reverse order of the one before (contenders and APIs), and pools the sweeps'",
                    "samples: a contender and its baseline are measured as much early as late in",
                    "the run, so the machine's speed drifting meanwhile moves both alike. Stored",
                    "bytes come from the first sweep.",
                ]
                if s.rounds > 1
                else []
            ),
            "",
            "| Fact | Value |",
            "| --- | --- |",
            *[f"| {k} | {v} |" for k, v in facts],
            "",
            "Workload: a 4-node sequential graph (triage -> billing -> account -> response), each "
            "node appending one ~1 KB message to `messages: Annotated[list, operator.add]`; every "
            "invoke sends one new ~1 KB user message (LangGraph's default durability). Per "
            f"contender and API: {s.warmup} warm-up invokes, {s.fresh_invokes} invokes on fresh "
            f"threads, {s.sized_invokes} invokes on threads already holding {counts} messages "
            f"(each thread seeded with one checkpoint), {s.reads} latest reads, {s.puts} puts, "
            f"{s.list_runs} listings of a {LIST_DEPTH}-checkpoint thread. A series stops early "
            f"after {s.budget_seconds:.0f} s (the ops column says how many ran). Sync API: "
            "`graph.invoke` and the saver's sync methods (this project's saver on a private loop "
            "thread, as `TieredCheckpointSaver.open_sync` builds it; in write-behind mode its "
            "puts, put_writes and cache-hit reads make their Redis round trip on the calling "
            "thread instead); async API: `graph.ainvoke` and the async methods on the "
            "benchmark's loop.",
            "",
            "Requests are counted at the clients and charged to the saver call that made them "
            "(request path): Cosmos HTTP requests at the azure-core transport, Redis round trips "
            "at the connection (a command, a pipeline or a script call each count one), Postgres "
            "statements at the psycopg cursor. Redis commands are the server's count (INFO "
            "commandstats, Lua scripts' inner calls included, every client). Write-behind rows "
            "flush the thread after each invoke (`flush(thread_id)`, what the case app does "
            "before it answers); the flush is timed and counted apart from the invoke.",
        ]

    def summary(self) -> list[str]:
        counts = self.scale.message_counts
        lines = [
            "",
            "## Summary",
            "",
            "| Saver | API | invoke p50 ms | put/s | Cosmos HTTP req/invoke | Redis cmds/invoke | "
            + " | ".join(f"invoke p50 ms at {c} messages" for c in counts)
            + " |",
            "| --- | --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(counts),
        ]
        for contender, api in self.rows():
            name = contender.name
            fresh = self.r.fresh.get((name, api))
            if fresh is None or not fresh.seconds:
                failure = "failed (see Notes)" if (name, api) in self.r.failures else "-"
                lines.append(
                    f"| {contender.label(api)} | {api} | {failure} |" + " - |" * (3 + len(counts))
                )
                continue
            rate = self.put_rate(name, api)
            cosmos = f"{fresh.per_op(fresh.cosmos):.1f}" if contender_uses_cosmos(name) else "-"
            redis = f"{fresh.per_op(fresh.redis_commands):.1f}" if contender.redis else "-"
            sized = []
            for count in counts:
                sample = self.r.sized.get((name, api, count))
                if sample is None or not sample.seconds:
                    sized.append("-")
                elif sample.operations < self.scale.sized_invokes:
                    sized.append(
                        f"{sample.p50:.1f} ({sample.operations} of {self.scale.sized_invokes} in budget)"
                    )
                else:
                    sized.append(f"{sample.p50:.1f}")
            lines.append(
                f"| {contender.label(api)} | {api} | {fresh.p50:.2f} | "
                f"{'-' if rate is None else f'{rate:,.0f}'} | {cosmos} | {redis} | "
                + " | ".join(sized)
                + " |"
            )
        return lines

    def invoke_details(self) -> list[str]:
        lines = [
            "",
            "## Invoke on fresh threads: request path in detail",
            "",
            "Per invoke. Intermediate = every put / put_writes of the run but its final put. "
            "Max Redis/write = the most Redis round trips one put or put_writes made.",
            "",
            "| Saver | API | ops | p50 ms | p95 ms | Cosmos HTTP | Postgres stmts | Redis round trips "
            "| Redis cmds | cold req on intermediate steps | max Redis/write | flush p50 ms "
            "| cold req/flush |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for contender, api in self.rows():
            s = self.r.fresh.get((contender.name, api))
            if s is None or not s.seconds:
                continue
            flush = (
                f"{_ms(s.flush_p50)} | {s.flush_cold / len(s.flush_seconds):.1f}"
                if s.flush_seconds
                else "- | -"
            )
            lines.append(
                f"| {contender.label(api)} | {api} | {s.operations} | {s.p50:.2f} | {s.p95:.2f}"
                f" | {s.per_op(s.cosmos):.1f} | {s.per_op(s.postgres):.1f}"
                f" | {s.per_op(s.redis):.1f} | {s.per_op(s.redis_commands):.1f}"
                f" | {s.per_op(s.intermediate_cold):.1f} | {s.max_write_redis} | {flush} |"
            )
        return lines

    def micro(self) -> list[str]:
        lines = [
            "",
            "## get_tuple (latest checkpoint of a finished thread)",
            "",
            "| Saver | API | ops | p50 ms | p95 ms | Cosmos HTTP/read | Postgres stmts/read "
            "| Redis round trips/read |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| Redis PING (baseline) | async | {self.r.ping.operations} | {self.r.ping.p50:.3f} "
            f"| {self.r.ping.p95:.3f} | - | - | 1 |",
        ]
        for contender, api in self.rows():
            s = self.r.reads.get((contender.name, api))
            if s is None or not s.seconds:
                continue
            lines.append(
                f"| {contender.label(api)} | {api} | {s.operations} | {s.p50:.3f} | {s.p95:.3f}"
                f" | {s.per_op(s.cosmos):.2f} | {s.per_op(s.postgres):.2f}"
                f" | {s.per_op(s.redis):.2f} |"
            )
        lines += [
            "",
            f"## put (sequential checkpoints on one thread; each changes a {PUT_WINDOW}-message "
            "(~10 KB) list)",
            "",
            "| Saver | API | puts/s | p50 ms | p95 ms | Cosmos HTTP/put | Postgres stmts/put "
            "| Redis round trips/put | Redis cmds/put |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for contender, api in self.rows():
            s = self.r.puts.get((contender.name, api))
            if s is None or not s.seconds:
                continue
            lines.append(
                f"| {contender.label(api)} | {api} | {s.rate:,.0f} | {s.p50:.2f} | {s.p95:.2f}"
                f" | {s.per_op(s.cosmos):.1f} | {s.per_op(s.postgres):.1f}"
                f" | {s.per_op(s.redis):.1f} | {s.per_op(s.redis_commands):.1f} |"
            )
        lines += [
            "",
            f"## list (all {LIST_DEPTH} checkpoints of a thread, newest first)",
            "",
            "| Saver | API | ops | p50 ms | p95 ms | Cosmos HTTP/list | Postgres stmts/list "
            "| Redis round trips/list |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for contender, api in self.rows():
            s = self.r.lists.get((contender.name, api))
            if s is None or not s.seconds:
                continue
            lines.append(
                f"| {contender.label(api)} | {api} | {s.operations} | {s.p50:.1f} | {s.p95:.1f}"
                f" | {s.per_op(s.cosmos):.0f} | {s.per_op(s.postgres):.0f}"
                f" | {s.per_op(s.redis):.0f} |"
            )
        return lines

    def flush_table(self) -> list[str]:
        if not self.r.flush:
            return []
        lines = [
            "",
            "## Write-behind: flush throughput against put throughput",
            "",
            f"{self.scale.puts} puts on one thread into an empty backlog, then one "
            "`flusher.drain()`. Entries/s produced = backlog entries the puts left (or the "
            "entries drained, if more) over the puts' time.",
            "",
            "| Saver | API | puts/s | backlog entries | entries/s produced | entries drained "
            "| drain s | entries/s drained | cold req/entry |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for contender, api in self.rows():
            f = self.r.flush.get((contender.name, api))
            if f is None:
                continue
            per_entry = f.drain_cold / f.applied if f.applied else 0.0
            lines.append(
                f"| {contender.label(api)} | {api} | {f.put_rate:,.0f} | {f.backlog_entries}"
                f" | {f.entry_rate:,.0f} | {f.applied} | {f.drain_seconds:.2f}"
                f" | {f.flush_rate:,.0f} | {per_entry:.2f} |"
            )
        return lines

    def stored_table(self) -> list[str]:
        if not self.r.stored:
            return []
        lines = [
            "",
            "## Stored bytes (one thread, one ~1 KB message added per checkpoint)",
            "",
            "Measured through the async API. Every checkpoint of the history is kept "
            "(LangGraph stores a channel's value per version, so a growing message list costs "
            "O(n^2) over the history in a saver that stores each version whole; this project "
            "stores large values as chunks shared between versions, its chunk rows and "
            "documents counted too); the second figure is after `prune(keep_latest)`. Cosmos "
            "counts the JSON of every document; InMemorySaver counts serialized bytes; Postgres "
            "counts the stored size of the payload columns (after its own TOAST compression). "
            "Hot is the Redis memory of the thread's keys. Write-behind rows are flushed first.",
            "",
            "| Saver | messages | stored bytes | after prune(keep_latest) | hot (Redis) bytes |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for contender in self.contenders:
            for count in self.scale.stored_counts:
                found = self.r.stored.get((contender.name, count))
                if found is None:
                    continue
                full, pruned, hot = found
                after = "no prune" if pruned is None else f"{pruned:,}"
                lines.append(f"| {contender.name} | {count} | {full:,} | {after} | {hot:,} |")
        if self.r.stored_delta:
            lines += [
                "",
                "The same history grown by a graph whose list is a `DeltaChannel` (two messages "
                f"per invoke, a snapshot every {DELTA_SNAPSHOT_FREQUENCY} updates; snapshots are "
                "stored whole, not as chunks):",
                "",
                "| Saver | messages | stored bytes |",
                "| --- | ---: | ---: |",
            ]
            for (name, count), stored in self.r.stored_delta.items():
                lines.append(f"| {name} | {count} | {stored:,} |")
        return lines

    def postgres_table(self) -> list[str]:
        ours = [n for n in POSTGRES_OURS if n in self.names]
        if LG_POSTGRES not in self.names or not ours:
            return []
        top = max(self.scale.message_counts)
        lines = [
            "",
            "## Postgres: this saver against LangGraph's (p50 ms, ratio to LangGraph's saver "
            "through the same API)",
            "",
            f"| Saver | API | invoke | get_tuple | put | list | invoke at {top} messages |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in [*ours, LG_POSTGRES]:
            for api in APIS:
                cells = [
                    self._vs(ours_ms, ref_ms) for ours_ms, ref_ms in self.postgres_pairs(name, api)
                ]
                label = self.by_name[name].label(api)
                lines.append(f"| {label} | {api} | " + " | ".join(cells) + " |")
        return lines

    def postgres_pairs(self, name: str, api: Api) -> list[tuple[float | None, float | None]]:
        top = max(self.scale.message_counts)
        return [
            (self.fresh_p50(name, api), self.fresh_p50(LG_POSTGRES, api)),
            (self.p50(self.r.reads, name, api), self.p50(self.r.reads, LG_POSTGRES, api)),
            (self.p50(self.r.puts, name, api), self.p50(self.r.puts, LG_POSTGRES, api)),
            (self.p50(self.r.lists, name, api), self.p50(self.r.lists, LG_POSTGRES, api)),
            (self.sized_p50(name, api, top), self.sized_p50(LG_POSTGRES, api, top)),
        ]

    @staticmethod
    def _vs(value: float | None, reference: float | None) -> str:
        ratio = _ratio(value, reference)
        if value is None or ratio is None:
            return "-"
        return f"{value:.2f} ({ratio:.2f}x)"

    # ------------------------------------------------------------------- targets

    def targets(self) -> list[tuple[str, str, str]]:
        """(target, measured, verdict) for every target of the write-behind and write-through work, per API."""
        rows: list[tuple[str, str, str]] = []

        def verdict(ok: bool | None) -> str:
            return "not measured" if ok is None else ("met" if ok else "missed")

        for api in APIS:
            for count, limit in ((10, 1.3), (1000, 1.5)):
                ours = self.sized_p50(COR_WB, api, count)
                reference = self.sized_p50(MEMORY, api, count)
                ratio = _ratio(ours, reference)
                rows.append(
                    (
                        f"write-behind Cosmos+Redis: invoke p50 at {count} messages <= "
                        f"{limit}x InMemorySaver ({api})",
                        "-"
                        if ratio is None
                        else f"{ratio:.2f}x ({ours:.2f} ms vs {reference:.2f} ms)",
                        verdict(None if ratio is None else ratio <= limit),
                    )
                )
        for name in WRITE_BEHIND:
            for api in APIS:
                samples = [self.r.fresh.get((name, api))] + [
                    self.r.sized.get((name, api, c)) for c in self.scale.message_counts
                ]
                present = [s for s in samples if s is not None and s.seconds]
                cold = sum(s.intermediate_cold for s in present)
                writes = sum(s.write_calls for s in present)
                invokes = sum(s.operations for s in present)
                rows.append(
                    (
                        f"{name}: 0 cold requests on the request path of intermediate steps ({api})",
                        f"{cold} over {invokes} invokes ({writes} put/put_writes calls)"
                        if present
                        else "-",
                        verdict(cold == 0 and writes > 0 if present else None),
                    )
                )
        for name in WRITE_BEHIND:
            for api in APIS:
                f = self.r.flush.get((name, api))
                rows.append(
                    (
                        f"{name}: flush throughput >= put throughput ({api})",
                        "-"
                        if f is None
                        else f"{f.flush_rate:,.0f} entries/s drained vs {f.entry_rate:,.0f} "
                        f"entries/s produced ({f.put_rate:,.0f} puts/s)",
                        verdict(None if f is None else f.flush_rate >= f.entry_rate),
                    )
                )
        for api in APIS:
            ours, ref = self.fresh_p50(CO_WT, api), self.fresh_p50(COSMOSDB_PACKAGE, api)
            ratio = _ratio(ours, ref)
            rows.append(
                (
                    f"write-through Cosmos: invoke p50 <= 0.5x langgraph-checkpoint-cosmosdb ({api})",
                    "-" if ratio is None else f"{ratio:.2f}x ({ours:.1f} ms vs {ref:.1f} ms)",
                    verdict(None if ratio is None else ratio <= 0.5),
                )
            )
            ours, ref = self.put_rate(CO_WT, api), self.put_rate(COSMOSDB_PACKAGE, api)
            ratio = _ratio(ours, ref)
            rows.append(
                (
                    f"write-through Cosmos: put/s >= 2x langgraph-checkpoint-cosmosdb ({api})",
                    "-" if ratio is None else f"{ratio:.2f}x ({ours:,.0f} vs {ref:,.0f} puts/s)",
                    verdict(None if ratio is None else ratio >= 2.0),
                )
            )
        ops = ["invoke", "get_tuple", "put", "list", f"invoke at {max(self.scale.message_counts)}"]
        for name in POSTGRES_OURS:
            for api in APIS:
                ratios = [_ratio(a, b) for a, b in self.postgres_pairs(name, api)]
                measured = [f"{op} {r:.2f}x" for op, r in zip(ops, ratios, strict=True) if r]
                missing = [op for op, r in zip(ops, ratios, strict=True) if r is None]
                ok = None if missing else all(r is not None and r <= 1.0 for r in ratios)
                against = (
                    self.by_name[LG_POSTGRES].label(api)
                    if LG_POSTGRES in self.names
                    else LG_POSTGRES
                )
                parts = [", ".join(measured)] if measured else []
                if missing:
                    parts.append(f"not measured: {', '.join(missing)}")
                rows.append(
                    (
                        f"{name}: <= 1.0x {against} on invoke, get_tuple, put, list, invoke "
                        f"at {max(self.scale.message_counts)} messages ({api})",
                        "; ".join(parts),
                        verdict(ok),
                    )
                )
        for name in (CO_WT, COR_WT):
            for api in APIS:
                s = self.r.fresh.get((name, api))
                per = s.per_op(s.cosmos) if s and s.seconds else None
                rows.append(
                    (
                        f"{name}: <= 12 Cosmos HTTP requests per 4-node invoke ({api})",
                        _ms(per, 1),
                        verdict(None if per is None else per <= 12),
                    )
                )
        for name in (PGR_WT, COR_WT, PGR_WB, COR_WB):
            for api in APIS:
                s = self.r.fresh.get((name, api))
                if s is None or not s.seconds:
                    rows.append(
                        (
                            f"{name}: <= 1 Redis round trip per put / put_writes ({api})",
                            "-",
                            verdict(None),
                        )
                    )
                    continue
                # Write-behind: the run's final put may be a boundary that waits for the flush.
                worst = (
                    s.max_intermediate_write_redis if name in WRITE_BEHIND else s.max_write_redis
                )
                mean = s.write_redis / s.write_calls if s.write_calls else 0.0
                rows.append(
                    (
                        f"{name}: <= 1 Redis round trip per put / put_writes ({api})",
                        f"max {worst}, mean {mean:.2f} over {s.write_calls} calls",
                        verdict(worst <= 1),
                    )
                )
        if self.r.warm_vs_ping is not None:
            reads, pings = self.r.warm_vs_ping
            ratio = reads.p50 / pings.p50
            rows.append(
                (
                    "(earlier) warm get_tuple <= 1.5x Redis PING (Cosmos+Redis write-through, async)",
                    f"{ratio:.2f}x ({reads.p50:.3f} ms vs {pings.p50:.3f} ms, alternated)",
                    verdict(ratio <= 1.5),
                )
            )
        if self.r.cold_latest_round_trips is not None:
            trips = self.r.cold_latest_round_trips
            rows.append(
                (
                    "(earlier) cold get_tuple <= 2 Cosmos round trips (Cosmos write-through, async)",
                    f"{trips:.2f}",
                    verdict(trips <= 2),
                )
            )
        rows += self.delta_targets(verdict)
        rows += self.growth_targets(verdict)
        rows += self.stored_targets(verdict)
        return rows

    def growth_targets(self, verdict: Callable[[bool | None], str]) -> list[tuple[str, str, str]]:
        """An invoke at 1000 messages costs at most twice one at 10, on every contender of
        this project (the state stored per step does not grow with the conversation)."""
        rows: list[tuple[str, str, str]] = []
        for contender in self.contenders:
            if contender.backend is None:
                continue
            for api in APIS:
                small = self.sized_p50(contender.name, api, 10)
                large = self.sized_p50(contender.name, api, 1000)
                ratio = _ratio(large, small)
                rows.append(
                    (
                        f"{contender.name}: invoke p50 at 1000 messages <= 2x at 10 messages "
                        f"({api})",
                        "-"
                        if ratio is None
                        else f"{ratio:.2f}x ({large:.2f} ms vs {small:.2f} ms)",
                        verdict(None if ratio is None else ratio <= 2.0),
                    )
                )
        return rows

    def stored_targets(self, verdict: Callable[[bool | None], str]) -> list[tuple[str, str, str]]:
        """Storage linear in history: at most 3 MB for 1000 messages with every checkpoint
        kept, and the bytes per added message between 100 and 1000 within 25% of those of
        the first 100."""
        rows: list[tuple[str, str, str]] = []
        for contender in self.contenders:
            name = contender.name
            if contender.backend is None:
                continue
            at = {count: self.r.stored.get((name, count)) for count in (100, 1000)}
            full = {count: found[0] for count, found in at.items() if found is not None}
            rows.append(
                (
                    f"{name}: stored bytes at 1000 messages, full history, <= 3 MB",
                    f"{full[1000]:,}" if 1000 in full else "-",
                    verdict(full[1000] <= 3_000_000 if 1000 in full else None),
                )
            )
            if len(full) == 2:
                first = full[100] / 100
                then = (full[1000] - full[100]) / 900
                measured = f"{first:,.0f} B/message to 100, {then:,.0f} B/message 100-1000"
                ok: bool | None = abs(then - first) <= 0.25 * first
            else:
                measured, ok = "-", None
            rows.append(
                (
                    f"{name}: stored bytes per added message constant within 25%",
                    measured,
                    verdict(ok),
                )
            )
            delta = self.r.stored_delta.get((name, 1000))
            rows.append(
                (
                    f"{name}: stored bytes at 1000 messages with DeltaChannel, full history, "
                    "<= 2 MB",
                    f"{delta:,}" if delta is not None else "-",
                    verdict(delta <= 2_000_000 if delta is not None else None),
                )
            )
        return rows

    def delta_p50(self, name: str, last: int | None = None) -> float | None:
        sample = self.r.delta.get(name)
        if sample is None or not sample.seconds:
            return None
        seconds = sample.seconds[-last:] if last else sample.seconds
        return statistics.median(seconds) * 1000

    def delta_targets(self, verdict: Callable[[bool | None], str]) -> list[tuple[str, str, str]]:
        """The DeltaChannel conversation's targets (async API, whole conversation)."""
        rows: list[tuple[str, str, str]] = []
        size = self.scale.delta_messages

        def against(name: str, reference: str, limit: float, what: str) -> None:
            ours, theirs = self.delta_p50(name), self.delta_p50(reference)
            ratio = _ratio(ours, theirs)
            rows.append(
                (
                    f"DeltaChannel graph at {size} messages, {name}: invoke p50 <= {limit}x "
                    f"{what} (async)",
                    "-" if ratio is None else f"{ratio:.2f}x ({ours:.2f} ms vs {theirs:.2f} ms)",
                    verdict(None if ratio is None else ratio <= limit),
                )
            )

        for name in WRITE_BEHIND:
            against(name, MEMORY, 2.0, "InMemorySaver")
        for name in (PG_WT, PGR_WT):
            against(name, LG_POSTGRES, 1.0, "LangGraph PostgresSaver")
        for name in (CO_WT, COR_WT):
            delta, plain = self.r.delta.get(name), self.r.delta_plain.get(name)
            measured, extra = "-", None
            if delta is not None and plain is not None and delta.seconds and plain.seconds:
                ours = statistics.median(delta.cosmos_sequential)
                theirs = statistics.median(plain.cosmos_sequential)
                extra = ours - theirs
                measured = (
                    f"{extra:+.1f} ({ours:.1f} vs {theirs:.1f} sequential requests per invoke, "
                    f"median; {delta.per_op(delta.cosmos):.2f} vs "
                    f"{plain.per_op(plain.cosmos):.2f} requests in all)"
                )
            rows.append(
                (
                    f"DeltaChannel graph at {size} messages, {name}: at most one more sequential "
                    "Cosmos request per invoke than the same graph with operator.add (async)",
                    measured,
                    verdict(None if extra is None else extra <= 1),
                )
            )
        for name in (CO_WT, COR_WT, COR_WB):
            cold = self.r.delta_cold_state.get(name)
            rows.append(
                (
                    f"DeltaChannel thread of {size} messages, {name}: cold get_state <= 2 "
                    "sequential Cosmos requests (async)",
                    "-"
                    if cold is None
                    else f"{cold.cosmos_sequential[0]} sequential ({cold.cosmos} in all), "
                    f"{cold.p50:.1f} ms",
                    verdict(None if cold is None else cold.cosmos_sequential[0] <= 2),
                )
            )
        return rows

    def delta_table(self) -> list[str]:
        if not self.r.delta:
            return []
        lines = [
            "",
            f"## DeltaChannel conversation ({self.scale.delta_messages} messages on one thread)",
            "",
            "Async API. One node appends two ~1 KB messages per invoke to a `DeltaChannel` "
            f"list (snapshot every {DELTA_SNAPSHOT_FREQUENCY} updates); each invoke loads the "
            "thread (its latest checkpoint, then the channel's history), runs the node and "
            "writes. Requests are per invoke (write-behind: the flush after each invoke is not "
            "counted); on Cosmos also the median of those waited for one after the other. `operator.add`: the same workload on an ordinary list, for comparison.",
            "",
            "| Saver | invoke p50 ms | last 10 invokes p50 ms | cold req/invoke "
            "| Redis round trips/invoke | operator.add invoke p50 ms (cold req/invoke) "
            "| cold get_state (Cosmos requests) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for contender in self.contenders:
            sample = self.r.delta.get(contender.name)
            if sample is None or not sample.seconds:
                continue
            plain = self.r.delta_plain.get(contender.name)
            cold = self.r.delta_cold_state.get(contender.name)
            lines.append(
                f"| {contender.name} | {_ms(self.delta_p50(contender.name))} "
                f"| {_ms(self.delta_p50(contender.name, 10))} "
                f"| {sample.per_op(sample.cold):.2f}"
                + (
                    f" ({statistics.median(sample.cosmos_sequential):.0f} sequential)"
                    if contender.backend is ColdBackend.COSMOS and sample.cosmos_sequential
                    else ""
                )
                + f" | {sample.per_op(sample.redis):.2f} "
                + (
                    f"| {plain.p50:.2f} ({plain.per_op(plain.cold):.2f}) "
                    if plain is not None and plain.seconds
                    else "| - "
                )
                + (
                    f"| {cold.cosmos_sequential[0]} sequential, {cold.cosmos} in all "
                    f"({cold.p50:.1f} ms) |"
                    if cold is not None
                    else "| - |"
                )
            )
        return lines

    def target_lines(self) -> list[str]:
        rows = self.targets()
        met = sum(1 for _, _, v in rows if v == "met")
        missed = sum(1 for _, _, v in rows if v == "missed")
        lines = [
            "",
            "## Targets (figures and verdicts from this run, p50)",
            "",
            f"{met} met, {missed} missed, {len(rows) - met - missed} not measured.",
            "",
            "| Target | Measured | Verdict |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {t} | {m} | {v} |" for t, m, v in rows]
        return lines

    def notes(self) -> list[str]:
        lines = ["", "## Notes", ""]
        if self.r.failures:
            for (name, api), error in self.r.failures.items():
                lines.append(f"- {self.by_name[name].label(api)} ({api}) failed: {error}")
        if self.r.emulator is not None:
            floor = self.r.emulator
            lines.append(
                f"- The emulator answers a point read in {floor.point_read_ms:.2f} ms and a "
                f"trivial single-partition query in {floor.query_ms:.2f} ms, with "
                f"{floor.documents:,} documents in the container probed (`scripts/"
                "cosmos-emulator.js` runs a query over its partition's documents only, as Azure "
                "Cosmos DB reads one partition; the package alone scans the whole container)."
            )
            peer = self.put_rate(COSMOSDB_PACKAGE, "async")
            if peer:
                lines.append(
                    f"- An upsert of an 11 KB document (a put of the put series, stored whole) "
                    f"takes {floor.upsert_ms:.2f} ms on the emulator, so one request a put caps "
                    f"any saver near {1000 / floor.upsert_ms:,.0f} puts/s; 2x "
                    f"langgraph-checkpoint-cosmosdb (async) would be {2 * peer:,.0f} puts/s, "
                    f"{1000 / (2 * peer):.2f} ms a put."
                )
        lines += self.round_trip_budget_notes()
        lines += [
            "- langgraph-checkpoint-cosmosdb is a synchronous saver (its async methods run the "
            "sync ones in a worker thread); it reads COSMOSDB_ENDPOINT / COSMOSDB_KEY and builds "
            "its own client, given `connection_verify=False` here for the emulator's self-signed "
            "certificate. It stores each checkpoint whole (every channel value in one document).",
            "- Postgres here is a real PostgreSQL server (fsync off) on the same machine; Azure "
            "Database for PostgreSQL adds network latency to each round trip.",
            "- Cosmos here is a local emulator on the same 2 cores as the benchmark; Azure Cosmos "
            "DB adds network latency (single-digit ms in-region) to each round trip, so absolute "
            "latencies are indicative and request counts are the portable figure.",
        ]
        return lines

    def round_trip_budget_notes(self) -> list[str]:
        """What the 1.3x InMemorySaver target (async) leaves for the write-behind saver's
        Redis round trips (one per put and put_writes), against the cheapest round trip
        there is: a PING, measured on the benchmark's own loop (the async API's)."""
        sample = self.r.sized.get((COR_WB, "async", 10))
        reference = self.sized_p50(MEMORY, "async", 10)
        if sample is None or not sample.seconds or reference is None:
            return []
        ping = self.r.ping.p50
        trips = sample.per_op(sample.redis)
        budget = 0.3 * reference
        fits = trips * ping <= budget
        return [
            "- Write-behind Cosmos+Redis at 10 messages (async): an invoke makes "
            f"{trips:.1f} Redis round trips; at a PING's {ping:.3f} ms each (the cheapest "
            f"exchange, client work included) they take {trips * ping:.2f} ms, "
            f"{'within' if fits else 'more than'} the {budget:.2f} ms that 1.3x "
            f"InMemorySaver ({reference:.2f} ms) leaves for all of the saver's work"
            + (
                "."
                if fits
                else ": with one round trip per put / put_writes, as the targets require, "
                "the target cannot be met on this machine."
            )
        ]


def contender_uses_cosmos(name: str) -> bool:
    return name in (COSMOSDB_PACKAGE, CO_WT, COR_WT, COR_WB)


def render(
    results: Results, chosen: list[Contender], facts: list[tuple[str, str]], scale: Scale
) -> str:
    report = Report(results, chosen, scale)
    lines = [
        *report.header(facts),
        *report.summary(),
        *report.invoke_details(),
        *report.micro(),
        *report.flush_table(),
        *report.stored_table(),
        *report.delta_table(),
        *report.postgres_table(),
        *report.notes(),
        *report.target_lines(),
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


async def run(scale: Scale, only: list[str]) -> str:
    meter = Meter()
    meter.install()
    rng = random.Random(8842)
    messages = [message(rng, i) for i in range(max(*scale.message_counts, 1000) + 10)]
    with tempfile.TemporaryDirectory(prefix="bench-checkpointer-") as tmp:
        stack = Stack.plan(Path(tmp) / "stack", with_postgres=True)
        try:
            stack.start()
            env = stack.env()
            base: dict[str, Any] = {
                "cosmos_endpoint": env["COSMOS_ENDPOINT"],
                "cosmos_key": env["COSMOS_KEY"],
                "cosmos_database": "agentstate",
                "cosmos_create_if_missing": True,
                "redis_url": env["REDIS_URL"],
                "postgres_url": env["POSTGRES_URL"],
            }
            observer = aioredis.Redis.from_url(env["REDIS_URL"], client_name=OBSERVER)
            try:
                redis_version = str((await observer.info("server"))["redis_version"])
                rounds: list[Results] = []
                for index in range(scale.rounds):
                    chosen = [
                        c
                        for c in contenders(base, observer, index)
                        if not only or any(text.lower() in c.name.lower() for text in only)
                    ]
                    backwards = index % 2 == 1
                    log(f"round {index + 1} of {scale.rounds}" + (" (reversed)" * backwards))
                    results = Results(ping=await bench_ping(observer, min(scale.reads, 200)))
                    for contender in chosen[::-1] if backwards else chosen:
                        started = time.perf_counter()
                        for api in APIS[::-1] if backwards else APIS:
                            await bench_pair(
                                contender, api, scale, results, meter, observer, messages, index
                            )
                        log(f"{contender.name}: {time.perf_counter() - started:.1f} s")
                    rounds.append(results)
                results = pool_rounds(rounds)
                if any(c.name == CO_WT for c in chosen):
                    settings = Settings.model_validate(
                        {**base, "cosmos_container": "bench-cosmos-wt-async"}
                    )
                    results.emulator = await probe_emulator(settings)
            finally:
                await observer.aclose()
        finally:
            stack.stop()
            if stack.postgres is not None:
                stack.postgres.remove_data()
            meter.uninstall()
    return render(results, chosen, machine_facts(redis_version), scale)


async def bench_pair(
    contender: Contender,
    api: Api,
    scale: Scale,
    results: Results,
    meter: Meter,
    observer: aioredis.Redis,
    messages: list[dict[str, str]],
    round_index: int = 0,
) -> None:
    """One contender through one API; a failure is reported in the results, not raised.
    Stored bytes do not vary between rounds: the first measures them."""
    before = dict(meter.totals)
    try:
        async with contender.open(api) as handle:
            pair = PairRun(contender, api, handle, scale, meter, observer, messages)
            await pair.run(results, with_stored=api == "async" and round_index == 0)
    except Exception as exc:  # any contender's failure, reported in RESULTS.md
        traceback.print_exc(file=sys.stderr)
        results.failures[(contender.name, api)] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log(f"{contender.label(api)} [{api}] FAILED: {results.failures[(contender.name, api)]}")
        return
    # A hook that counts nothing would read as "0 requests" everywhere: stop the run instead.
    for backend in contender.talks_to:
        if meter.totals[backend] == before[backend]:
            raise BenchmarkError(
                f"{contender.label(api)} made no {backend} request the harness could count: "
                "a client no longer goes through the hooked method"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (about a minute)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="only the contenders whose name contains TEXT (repeatable)",
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    # The harness talks to the emulator without verifying its self-signed certificate.
    warnings.simplefilter("ignore", InsecureRequestWarning)
    started = time.perf_counter()
    report = asyncio.run(run(QUICK if args.quick else FULL, args.only))
    args.output.write_text(report)
    log(f"done in {time.perf_counter() - started:.0f} s; wrote {args.output}")
    print(report)


if __name__ == "__main__":
    main()
