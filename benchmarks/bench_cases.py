"""Load benchmark of the support-case API: throughput, latency and store cost per case.

Starts its own Redis, Cosmos emulator, Postgres and token issuer on free loopback
ports (scripts/devstack), then for each cold backend and write mode starts API
worker processes (uvicorn running the app's own factory through
`benchmarks/cases_worker.py`, which adds request counting) against one Redis and
one cold store, the Functions scale-out model. It writes benchmarks/CASES.md and
docs/CAPACITY.md (every figure from this run) and stops everything it started.

    .venv/bin/python benchmarks/bench_cases.py [--quick] [--cases K] [--in-flight C]
        [--processes N] [--backends cosmos,postgres] [--modes write-through,write-behind]

Per cold backend, for each write mode (its own Cosmos container or its own cases),
after a warm-up of one case per run-index shard (a shard's record is created with
its first case, once per deployment: the phases below see the steady state):

1. counted: one process, one case at a time; for each case the store requests it
   caused (the worker's counts before and after) and the Redis commands the server
   ran (INFO commandstats, every client; commands inside scripts included), and the
   bytes it left stored;
2. baseline: one process per mode, 1 in flight, K cases per mode, the modes taking
   turns case by case (a fair latency comparison on a shared machine);
3. concurrent: one process, C in flight, K cases;
4. scale-out: N processes, C in flight, K cases spread round robin.

Load phases also record the CPU each component used (API workers, Redis, Cosmos
emulator, Postgres, the load driver) and the cold requests per case under load.

A case is auto-approved (a duplicate charge of 49.99) or, one in REVIEW_EVERY, goes
to human review (612.40): a second client holding only `Cases.Review` approves it
as soon as it waits. Case latency runs from the submit to the completed state (for
a review case, the approval included). Then every case is verified: completed, the
expected policy decision and review, both side effects (refund, reset link) done and
each performed exactly once by the simulated provider (its ledger), and an audit
trail that is a complete chain (one entry per version down to the creation, each
agent's section written once, each effect claimed then done). A miss fails the run.

Progress goes to stderr. Counts are this machine's, on emulators; see the notes the
report prints for what the Cosmos emulator does not measure (request charge).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "scripts"), str(REPO_ROOT / "function_app")]

import httpx  # noqa: E402
import psycopg  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from devstack import Stack, free_port  # noqa: E402
from devstack.issuer import request_token  # noqa: E402
from state import TieredStateStore  # noqa: E402
from state.cold.cosmos_client import CosmosConnection  # noqa: E402
from state.factory import open_backends  # noqa: E402
from state.settings import Settings  # noqa: E402
from support_cases.effects import SimulatedProvider  # noqa: E402
from support_cases.runs import INDEX_SHARDS, shard_of  # noqa: E402

BACKENDS = ("cosmos", "postgres")
MODES = ("write-through", "write-behind")
REVIEW_EVERY = 5  # one case in five stops for human review
SUBMITTER, REVIEWER, OPERATOR = "bench-submitter", "bench-reviewer", "bench-operator"
AGENT_WRITES = [
    ("intake-agent", "intake"),
    ("billing-agent", "billing"),
    ("account-agent", "account"),
    ("policy-agent", "policy"),
    ("refund-agent", "refund"),
    ("response-agent", "response"),
]
EFFECTS = ("refund", "reset_link")
# Commands the benchmark's own observer sends: never charged to a case.
OBSERVER_COMMANDS = {"info", "scan", "memory", "client", "ping", "hello", "select", "config"}
POLL_SECONDS = 0.05


class BenchmarkError(RuntimeError):
    """The run cannot go on, or a case failed verification."""


def log(text: str) -> None:
    print(f"[bench-cases] {text}", file=sys.stderr, flush=True)


def case_body(case_id: str, review: bool) -> dict[str, Any]:
    amount = 612.40 if review else 49.99
    return {
        "case_id": case_id,
        "customer_id": f"cust-{case_id[-6:]}",
        "text": "I was charged twice, and I can't log in",
        "transactions": [
            {
                "id": f"t1-{case_id[-8:]}",
                "merchant": "StreamFlix",
                "amount": amount,
                "currency": "USD",
                "timestamp": "2024-05-01T10:00:00Z",
            },
            {
                "id": f"t2-{case_id[-8:]}",
                "merchant": "StreamFlix",
                "amount": amount,
                "currency": "USD",
                "timestamp": "2024-05-01T10:02:00Z",
            },
        ],
    }


# --------------------------------------------------------------------------- results


@dataclass
class CaseRun:
    case_id: str
    review: bool
    phase: str
    latency_s: float | None = None
    errors: list[str] = field(default_factory=list)
    # Counted phase only: store work this case caused.
    counts: dict[str, int] = field(default_factory=dict)
    redis_commands: int = 0
    redis_by_command: dict[str, int] = field(default_factory=dict)
    cold_bytes: int = 0
    hot_bytes: int = 0


@dataclass
class Phase:
    name: str
    processes: int
    in_flight: int
    cases: list[CaseRun]
    seconds: float
    # CPU seconds each component used during the phase (load phases only).
    cpu: dict[str, float] = field(default_factory=dict)
    # What the phase's workers sent to the stores (load phases only).
    counts: dict[str, int] = field(default_factory=dict)
    # The machine's 1-minute load average at the phase's end (others' work included).
    load: float | None = None

    @property
    def throughput(self) -> float:
        return len(self.cases) / self.seconds if self.seconds else 0.0

    def latencies(self, review: bool | None = None) -> list[float]:
        return sorted(
            c.latency_s
            for c in self.cases
            if c.latency_s is not None and (review is None or c.review == review)
        )

    def errors(self) -> Counter[str]:
        return Counter(error for case in self.cases for error in case.errors)


@dataclass
class ConfigResult:
    backend: str
    mode: str
    phases: list[Phase] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)
    verified: int = 0

    @property
    def name(self) -> str:
        return f"{self.backend} + Redis, {self.mode}"

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))
    return sorted(values)[index]


# --------------------------------------------------------------------------- processes


def worker_env(stack_env: dict[str, str], backend: str, mode: str, database: str) -> dict[str, str]:
    return {
        **stack_env,
        "STATE_COLD_BACKEND": backend,
        "STATE_WRITE_MODE": mode,
        "COSMOS_CREATE_IF_MISSING": "true",
        # A container per configuration: stored bytes are read per case, never shared.
        "COSMOS_CONTAINER": database,
        "PYTHONPATH": os.pathsep.join(
            path
            for path in (
                str(BENCH_DIR),
                str(REPO_ROOT / "function_app"),
                os.environ.get("PYTHONPATH"),
            )
            if path
        ),
    }


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path


def start_uvicorn(env: dict[str, str], log_path: Path, port: int) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as output:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "cases_worker:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env={**os.environ, **env},
            cwd=REPO_ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@asynccontextmanager
async def worker(env: dict[str, str], log_path: Path, token: str) -> AsyncIterator[Worker]:
    port = free_port()
    process = start_uvicorn(env, log_path, port)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 90
            while True:
                if process.poll() is not None:
                    raise BenchmarkError(f"worker exited ({process.returncode}); see {log_path}")
                try:
                    # The runtime opens on the first request that needs it: this one does.
                    answer = await client.get(
                        "/bench/counts", headers={"Authorization": f"Bearer {token}"}
                    )
                    health = await client.get(
                        "/api/health", headers={"Authorization": f"Bearer {token}"}
                    )
                    if answer.status_code == 200 and health.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"worker did not start; see {log_path}")
                await asyncio.sleep(0.2)
        yield Worker(process, url, log_path)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                await asyncio.to_thread(process.wait, 5)


# --------------------------------------------------------------------------- driving cases


class Clients:
    """One HTTP client per role per worker: submitter, reviewer, operator."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self._tokens = tokens
        self._clients: dict[tuple[str, str], httpx.AsyncClient] = {}

    def get(self, url: str, who: str) -> httpx.AsyncClient:
        key = (url, who)
        if key not in self._clients:
            self._clients[key] = httpx.AsyncClient(
                base_url=url,
                timeout=60,
                headers={"Authorization": f"Bearer {self._tokens[who]}"},
                # Idle connections dropped before uvicorn's 5 s keep-alive closes them: at
                # the same 5 s (httpx's default) a request could go out on one the server
                # was closing, a ReadError on a loaded machine.
                limits=httpx.Limits(
                    max_connections=64, max_keepalive_connections=64, keepalive_expiry=2.0
                ),
            )
        return self._clients[key]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


async def drive(clients: Clients, url: str, run: CaseRun) -> None:
    """Submit the case and take it to `completed` (approving it if it waits for review)."""
    submitter = clients.get(url, SUBMITTER)
    started = time.perf_counter()
    answer = await submitter.post("/api/cases", json=case_body(run.case_id, run.review))
    if answer.status_code not in (200, 201, 202):
        run.errors.append(f"submit {answer.status_code}")
        return
    status = answer.json()["status"]
    while status in ("accepted", "running"):
        await asyncio.sleep(POLL_SECONDS)
        answer = await submitter.get(f"/api/cases/{run.case_id}")
        if answer.status_code != 200:
            run.errors.append(f"poll {answer.status_code}")
            return
        status = answer.json()["status"]
    if status == "awaiting_review":
        if not run.review:
            run.errors.append("unexpected review")
            return
        reviewer = clients.get(url, REVIEWER)
        answer = await reviewer.post(
            f"/api/cases/{run.case_id}/review", json={"decision": "approve"}
        )
        if answer.status_code not in (200, 202):
            run.errors.append(f"review {answer.status_code}")
            return
        status = answer.json()["status"]
        while status == "running":
            await asyncio.sleep(POLL_SECONDS)
            # The submitter may read its own case whatever its status.
            answer = await submitter.get(f"/api/cases/{run.case_id}")
            if answer.status_code != 200:
                run.errors.append(f"poll {answer.status_code}")
                return
            status = answer.json()["status"]
    if status != "completed":
        run.errors.append(f"ended {status}")
        return
    run.latency_s = time.perf_counter() - started


def new_runs(
    phase: str, count: int, offset: int = 0, review_every: int = REVIEW_EVERY
) -> list[CaseRun]:
    tag = uuid.uuid4().hex[:6]
    return [
        CaseRun(
            case_id=f"bench-{phase}-{tag}-{i:05d}",
            review=(i + offset) % review_every == review_every - 1,
            phase=phase,
        )
        for i in range(count)
    ]


def warm_up_runs() -> list[CaseRun]:
    """One case per shard of the run index, the first going to review: a store creates a
    shard's record with its first case, once per deployment, and the counted cases that
    follow should see a store in its steady state."""
    tag = uuid.uuid4().hex[:6]
    runs: list[CaseRun] = []
    shards: set[str] = set()
    for i in range(10_000):
        case_id = f"bench-warm-{tag}-{i:05d}"
        if shard_of(case_id) not in shards:
            shards.add(shard_of(case_id))
            runs.append(CaseRun(case_id=case_id, review=not runs, phase="warm"))
        if len(shards) == INDEX_SHARDS:
            break
    return runs


async def run_load(
    clients: Clients, urls: list[str], runs: list[CaseRun], in_flight: int, label: str
) -> float:
    """Drive `runs` with `in_flight` at a time over `urls` (round robin); seconds taken."""
    queue: asyncio.Queue[tuple[int, CaseRun]] = asyncio.Queue()
    for index, run in enumerate(runs):
        queue.put_nowait((index, run))
    done = 0
    every = max(1, len(runs) // 5)

    async def lane() -> None:
        nonlocal done
        while not queue.empty():
            index, run = queue.get_nowait()
            try:
                await drive(clients, urls[index % len(urls)], run)
            except httpx.HTTPError as error:
                run.errors.append(f"transport {type(error).__name__}")
            done += 1
            if done % every == 0 or done == len(runs):
                log(f"  {label}: {done}/{len(runs)} cases")

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return time.perf_counter() - started


# --------------------------------------------------------------------------- counting


async def command_stats(observer: aioredis.Redis) -> Counter[str]:
    info = await observer.info("commandstats")
    stats: Counter[str] = Counter()
    for key, value in info.items():
        name = key.removeprefix("cmdstat_")
        if name.split("|")[0] not in OBSERVER_COMMANDS:
            stats[name] = int(value["calls"])
    return stats


async def worker_counts(clients: Clients, url: str) -> Counter[str]:
    answer = await clients.get(url, OPERATOR).get("/bench/counts")
    answer.raise_for_status()
    return Counter({key: int(value) for key, value in answer.json().items()})


async def group_counts(clients: Clients, group: list[Worker]) -> Counter[str]:
    total: Counter[str] = Counter()
    for member in group:
        total += await worker_counts(clients, member.url)
    return total


async def hot_bytes(observer: aioredis.Redis, case_id: str) -> int:
    """Memory Redis holds for a case's own keys (every key hash-tagged with its id)."""
    total = 0
    async for key in observer.scan_iter(match=f"*{{{case_id}}}*", count=500):
        total += int(await observer.memory_usage(key) or 0)
    return total


class ColdBytes:
    """Bytes a thread occupies in the cold store (documents, or row sizes in Postgres)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._cosmos: CosmosConnection | None = None

    async def of(self, thread_ids: list[str]) -> int:
        if self._settings.state_cold_backend.value == "cosmos":
            if self._cosmos is None:
                self._cosmos = CosmosConnection(self._settings.cosmos)
            container = await self._cosmos.container()
            total = 0
            for thread_id in thread_ids:
                async for document in container.query_items(
                    "SELECT * FROM c WHERE c.thread_id = @t",
                    parameters=[{"name": "@t", "value": thread_id}],
                    partition_key=thread_id,
                ):
                    body = {k: v for k, v in document.items() if not k.startswith("_")}
                    total += len(json.dumps(body, separators=(",", ":")).encode())
            return total
        assert self._settings.postgres_url is not None
        async with await psycopg.AsyncConnection.connect(
            self._settings.postgres_url.get_secret_value()
        ) as conn:
            tables = await (
                await conn.execute(
                    "SELECT table_name FROM information_schema.columns"
                    " WHERE column_name = 'thread_id' AND table_schema = current_schema()"
                )
            ).fetchall()
            total = 0
            for (table,) in tables:
                row = await (
                    await conn.execute(
                        f'SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM "{table}" t'
                        " WHERE thread_id = ANY(%s)",
                        (thread_ids,),
                    )
                ).fetchone()
                total += int(row[0]) if row else 0
            return total

    async def close(self) -> None:
        if self._cosmos is not None:
            await self._cosmos.close()


def effect_keys(case: dict[str, Any]) -> dict[str, str]:
    """The idempotency key of each of the case's side effects, as its answer names them (a
    key carries the case's incarnation: not derivable from the case id alone)."""
    return {effect["kind"]: effect["idempotency_key"] for effect in case.get("effects", [])}


async def case_threads(clients: Clients, url: str, case_id: str) -> list[str]:
    """The case's own thread and the provider ledgers of its side effects."""
    answer = await clients.get(url, OPERATOR).get(f"/api/cases/{case_id}")
    answer.raise_for_status()
    keys = effect_keys(answer.json())
    return [case_id] + [SimulatedProvider.ledger_id(key) for key in keys.values()]


async def counted_phase(
    clients: Clients,
    url: str,
    observer: aioredis.Redis,
    cold: ColdBytes,
    runs: list[CaseRun],
) -> float:
    """One case at a time on one worker, each charged what it caused."""
    started = time.perf_counter()
    for index, run in enumerate(runs):
        before, commands = await worker_counts(clients, url), await command_stats(observer)
        await drive(clients, url, run)
        after, commands_after = await worker_counts(clients, url), await command_stats(observer)
        run.counts = dict(after - before)
        run.redis_by_command = dict(commands_after - commands)
        run.redis_commands = sum(run.redis_by_command.values())
        run.cold_bytes = await cold.of(await case_threads(clients, url, run.case_id))
        run.hot_bytes = await hot_bytes(observer, run.case_id)
        log(f"  counted: {index + 1}/{len(runs)} ({'review' if run.review else 'auto'})")
    return time.perf_counter() - started


# --------------------------------------------------------------------------- verification


async def verify(
    clients: Clients, url: str, store: TieredStateStore, run: CaseRun, reviewer_name: str
) -> list[str]:
    """What is wrong with a finished case (empty: nothing)."""
    problems: list[str] = []
    operator = clients.get(url, OPERATOR)
    answer = await operator.get(f"/api/cases/{run.case_id}")
    if answer.status_code != 200:
        return [f"read {answer.status_code}"]
    case = answer.json()
    if case["status"] != "completed":
        problems.append(f"status {case['status']}")
    decision = case.get("policy", {}).get("decision")
    if decision != ("needs_review" if run.review else "auto_approved"):
        problems.append(f"policy {decision}")
    review = case.get("review")
    if run.review and (
        not review
        or review.get("decision") != "approve"
        or review.get("reviewer_name") != reviewer_name
    ):
        problems.append(f"review {review}")
    if (case.get("refund") or {}).get("status") != "issued":
        problems.append("no refund issued")
    effects = {effect["kind"]: effect["status"] for effect in case.get("effects", [])}
    keys = effect_keys(case)
    provider = SimulatedProvider(store)
    for kind in EFFECTS:
        if effects.get(kind) != "done":
            problems.append(f"effect {kind} {effects.get(kind)}")
        performed = len(await provider.performed(keys[kind])) if kind in keys else 0
        if performed != 1:
            problems.append(f"{kind} performed {performed} times")
    answer = await operator.get(f"/api/cases/{run.case_id}/audit", params={"limit": 500})
    if answer.status_code != 200:
        return [*problems, f"audit {answer.status_code}"]
    entries = answer.json()["entries"]
    versions = [entry["version"] for entry in entries]
    if versions != list(range(case["version"], 0, -1)):
        problems.append(f"audit chain {versions} for version {case['version']}")
    writes = Counter((entry["agent_id"], entry["section"]) for entry in entries)
    for agent_section in AGENT_WRITES:
        if writes[agent_section] != 1:
            problems.append(f"audit {agent_section} x{writes[agent_section]}")
    for kind in EFFECTS:
        if sum(n for (_, s), n in writes.items() if s == f"effect_{kind}") != 2:
            problems.append(f"audit effect_{kind} is not claim + done")
    if run.review and sum(n for (_, s), n in writes.items() if s == "review") != 1:
        problems.append("audit has no single review entry")
    return problems


# --------------------------------------------------------------------------- one configuration


@dataclass
class Options:
    cases: int
    counted: int
    in_flight: int
    processes: int
    backends: list[str]
    modes: list[str]


@dataclass
class Config:
    """One configuration's settings, workers' environment and results."""

    result: ConfigResult
    env: dict[str, str]
    container: str
    settings: Settings
    runs: list[CaseRun] = field(default_factory=list)


def configure(stack_env: dict[str, str], backend: str, mode: str) -> Config:
    container = f"bench-{backend}-{mode}-{uuid.uuid4().hex[:6]}"
    settings = Settings.model_validate(
        {
            "state_cold_backend": backend,
            # The benchmark's own reads (verification) go straight to the cold store.
            "state_write_mode": "write-through",
            "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
            "cosmos_key": stack_env["COSMOS_KEY"],
            "cosmos_container": container,
            "cosmos_create_if_missing": True,
            "postgres_url": stack_env.get("POSTGRES_URL"),
            "redis_url": stack_env["REDIS_URL"],
            "auth_disabled": True,
        }
    )
    return Config(
        ConfigResult(backend, mode),
        worker_env(stack_env, backend, mode, container),
        container,
        settings,
    )


async def interleaved(
    clients: Clients, lanes: list[tuple[Config, str]], count: int
) -> dict[str, Phase]:
    """1 in flight, the configurations taking turns case by case, so each sees the same
    background load (the machine is shared): a fair latency comparison between them."""
    runs = {config.result.mode: new_runs("base", count) for config, _ in lanes}
    busy = dict.fromkeys(runs, 0.0)
    for index in range(count):
        # Who goes first alternates too: no mode always follows the other.
        for config, url in lanes if index % 2 == 0 else lanes[::-1]:
            run = runs[config.result.mode][index]
            started = time.perf_counter()
            try:
                await drive(clients, url, run)
            except httpx.HTTPError as error:
                run.errors.append(f"transport {type(error).__name__}")
            busy[config.result.mode] += time.perf_counter() - started
        if (index + 1) % max(1, count // 5) == 0:
            log(f"  baseline (modes taking turns): {index + 1}/{count}")
    return {mode: Phase("baseline", 1, 1, runs[mode], busy[mode]) for mode in runs}


async def run_backend(
    stack_env: dict[str, str],
    backend: str,
    options: Options,
    workdir: Path,
    servers: dict[str, int],
) -> list[ConfigResult]:
    configs = [configure(stack_env, backend, mode) for mode in options.modes]
    issuer = stack_env["AUTH_ISSUER"]
    tokens = {
        SUBMITTER: request_token(issuer, SUBMITTER, ["Cases.Submit"]),
        REVIEWER: request_token(issuer, REVIEWER, ["Cases.Review"]),
        OPERATOR: request_token(issuer, OPERATOR, ["Cases.Operate"]),
    }
    clients = Clients(tokens)
    observer = aioredis.Redis.from_url(stack_env["REDIS_URL"], client_name="bench-observer")
    try:
        async with AsyncExitStack() as running:
            firsts: dict[str, Worker] = {}
            for config in configs:
                result = config.result
                first = await running.enter_async_context(
                    worker(config.env, workdir / f"{config.container}-0.log", tokens[OPERATOR])
                )
                firsts[result.mode] = first
                log(f"{result.name}: warm-up")
                warm = warm_up_runs()
                await run_load(clients, [first.url], warm, 1, "warm-up")
                config.runs += warm
                log(f"{result.name}: counted, 1 process, one case at a time")
                # One in three counted cases goes to review, so both kinds are measured.
                counted = new_runs("counted", options.counted, review_every=3)
                cold = ColdBytes(config.settings)
                try:
                    seconds = await counted_phase(clients, first.url, observer, cold, counted)
                finally:
                    await cold.close()
                result.phases.append(Phase("counted", 1, 1, counted, seconds))
                config.runs += counted

            log(f"{backend}: baseline, 1 process per mode, 1 in flight, modes taking turns")
            lanes = [(config, firsts[config.result.mode].url) for config in configs]
            baselines = await interleaved(clients, lanes, options.cases)
            for config in configs:
                phase = baselines[config.result.mode]
                config.result.phases.append(phase)
                config.runs += phase.cases
            for config in configs:
                result, first = config.result, firsts[config.result.mode]
                phases = (
                    ("concurrent", [first], options.in_flight),
                    ("scale-out", None, options.in_flight),
                )
                for name, fixed, in_flight in phases:
                    async with more_workers(
                        config.env,
                        workdir,
                        config.container,
                        0 if fixed else options.processes - 1,
                        tokens[OPERATOR],
                    ) as others:
                        group = [first, *others]
                        label = f"{len(group)} process(es), {in_flight} in flight"
                        log(f"{result.name}: {name}, {label}")
                        runs = new_runs(name[:5], options.cases)
                        sent = await group_counts(clients, group)
                        before = cpu_snapshot(group, servers)
                        seconds = await run_load(
                            clients, [w.url for w in group], runs, in_flight, name
                        )
                        phase = Phase(name, len(group), in_flight, runs, seconds)
                        phase.cpu = cpu_since(before, group, servers)
                        phase.counts = dict(await group_counts(clients, group) - sent)
                        phase.load = os.getloadavg()[0]
                        result.phases.append(phase)
                        config.runs += runs

            for config in configs:
                result = config.result
                log(f"{result.name}: verifying {len(config.runs)} cases")
                backends = await open_backends(config.settings)
                store = TieredStateStore(backends.cold, None, config.settings)
                try:
                    for run in config.runs:
                        if run.errors:
                            result.misses.append(f"{run.case_id}: {', '.join(run.errors)}")
                            continue
                        url = firsts[result.mode].url
                        problems = await verify(clients, url, store, run, REVIEWER)
                        if problems:
                            result.misses.append(f"{run.case_id}: {'; '.join(problems)}")
                finally:
                    await store.close()
                    await backends.close()
                result.verified = len(config.runs)
                log(f"{result.name}: {len(result.misses)} misses")
    finally:
        await clients.close()
        await observer.aclose()
    return [config.result for config in configs]


@asynccontextmanager
async def more_workers(
    env: dict[str, str], workdir: Path, container: str, count: int, token: str
) -> AsyncIterator[list[Worker]]:
    """`count` more workers (0: none) for a phase, stopped after it."""
    async with AsyncExitStack() as running:
        started = [
            await running.enter_async_context(
                worker(env, workdir / f"{container}-{uuid.uuid4().hex[:4]}.log", token)
            )
            for _ in range(count)
        ]
        yield started


# --------------------------------------------------------------------------- CPU

TICKS = os.sysconf("SC_CLK_TCK")


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) of every process this user can read."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS)
    return table


def _tree_cpu(table: dict[int, tuple[int, float]], root: int) -> float:
    """CPU seconds of `root` and its live descendants (Postgres forks a backend per connection)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += table.get(pid, (0, 0.0))[1]
        todo += children.get(pid, [])
    return total


def cpu_snapshot(group: list[Worker], servers: dict[str, int]) -> dict[str, float]:
    table = _process_table()
    snapshot = {name: _tree_cpu(table, pid) for name, pid in servers.items()}
    snapshot["API workers"] = sum(_tree_cpu(table, w.process.pid) for w in group)
    # The benchmark's own process only (its children are the workers).
    snapshot["load driver"] = table.get(os.getpid(), (0, 0.0))[1]
    return snapshot


def cpu_since(
    before: dict[str, float], group: list[Worker], servers: dict[str, int]
) -> dict[str, float]:
    after = cpu_snapshot(group, servers)
    return {name: after[name] - before.get(name, 0.0) for name in after}


# --------------------------------------------------------------------------- report


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f}"


def mean_of(runs: list[CaseRun], pick: Any) -> float:
    values = [float(pick(run)) for run in runs]
    return statistics.fmean(values) if values else 0.0


# Azure request-charge model for the counts (the emulator answers 1 RU for everything):
# point read 1 RU per started KB; a write (create, replace, upsert, patch) about 5.5 RU
# per started KB with this container's indexing (blob and section paths excluded); a
# single-partition query about 3 RU; a delete about 5 RU; a transactional batch the sum
# of its operations (each write at least one KB). An estimate, not a measurement.
RU_MODEL = {"read": 1.0, "query": 3.0, "delete": 5.0, "write_per_kb": 5.5}


def estimated_ru(counts: dict[str, int], prefix: str = "") -> float:
    def n(kind: str) -> int:
        return counts.get(f"{prefix}cosmos.{kind}", 0)

    writes = n("create") + n("replace") + n("upsert") + n("patch") + n("batch_operations")
    written_kb = counts.get(f"{prefix}cosmos.bytes_written", 0) / 1024
    # Each write pays for at least one KB; larger ones for what they carry.
    write_ru = RU_MODEL["write_per_kb"] * max(writes, written_kb)
    return (
        RU_MODEL["read"] * n("read")
        + RU_MODEL["query"] * n("query")
        + RU_MODEL["delete"] * n("delete")
        + write_ru
    )


def phase_cold(phase: Phase) -> float:
    """Cold requests per case under load, the provider's included (retries show here)."""
    total = cold_requests(phase.counts) + cold_requests(phase.counts, "provider.")
    return total / len(phase.cases) if phase.cases else 0.0


def cold_requests(counts: dict[str, int], prefix: str = "") -> int:
    kinds = ("read", "query", "create", "replace", "upsert", "patch", "delete", "batch", "other")
    cosmos = sum(counts.get(f"{prefix}cosmos.{kind}", 0) for kind in kinds)
    return cosmos + counts.get(f"{prefix}postgres.statements", 0)


@dataclass
class CaseCost:
    cold: float
    provider_cold: float
    kinds: dict[str, float]
    ru: float
    redis_commands: float
    redis_round_trips: float
    cold_bytes: float
    hot_bytes: float


def case_cost(runs: list[CaseRun]) -> CaseCost:
    kinds = ("read", "query", "create", "replace", "upsert", "patch", "delete", "batch")
    return CaseCost(
        cold=mean_of(runs, lambda r: cold_requests(r.counts)),
        provider_cold=mean_of(runs, lambda r: cold_requests(r.counts, "provider.")),
        kinds={
            kind: mean_of(runs, lambda r, k=kind: r.counts.get(f"cosmos.{k}", 0)) for kind in kinds
        },
        ru=mean_of(runs, lambda r: estimated_ru(r.counts)),
        redis_commands=mean_of(runs, lambda r: r.redis_commands),
        redis_round_trips=mean_of(
            runs,
            lambda r: (
                r.counts.get("redis.round_trips", 0) + r.counts.get("provider.redis.round_trips", 0)
            ),
        ),
        cold_bytes=mean_of(runs, lambda r: r.cold_bytes),
        hot_bytes=mean_of(runs, lambda r: r.hot_bytes),
    )


def costs(result: ConfigResult) -> dict[str, CaseCost]:
    counted = result.phase("counted").cases
    return {
        "auto": case_cost([r for r in counted if not r.review and not r.errors]),
        "review": case_cost([r for r in counted if r.review and not r.errors]),
    }


def redis_command_table(results: list[ConfigResult]) -> list[str]:
    """The server's command count of an auto-approved case, split by command."""
    by_config: dict[str, Counter[str]] = {}
    for result in results:
        auto = [r for r in result.phase("counted").cases if not r.review and not r.errors]
        total: Counter[str] = Counter()
        for run in auto:
            total.update(run.redis_by_command)
        by_config[result.name] = Counter(
            {name: calls / max(len(auto), 1) for name, calls in total.items()}
        )
    commands = sorted(
        {name for counts in by_config.values() for name in counts},
        key=lambda name: -max(counts.get(name, 0) for counts in by_config.values()),
    )
    out = [
        "Redis commands of an auto-approved case by command (server count; a script's own",
        "commands are counted under their names as well as the script call):",
        "",
        "| command | " + " | ".join(by_config) + " |",
        "| --- |" + " --- |" * len(by_config),
    ]
    for name in commands:
        cells = " | ".join(f"{counts.get(name, 0):.1f}" for counts in by_config.values())
        out.append(f"| {name} | {cells} |")
    return out


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def targets(results: list[ConfigResult]) -> list[str]:
    lines = ["| target | configuration | figure | verdict |", "| --- | --- | --- | --- |"]
    by = {(r.backend, r.mode): r for r in results}
    for result in results:
        base, scale = result.phase("baseline"), result.phase("scale-out")
        ratio = scale.throughput / base.throughput if base.throughput else 0.0
        clean = not result.misses and not scale.errors()
        lines.append(
            f"| {scale.in_flight} in flight on {scale.processes} processes >= 1.7x one process"
            f" with 1 in flight, 0 errors, 0 misses | {result.name} | {ratio:.2f}x,"
            f" {sum(scale.errors().values())} errors, {len(result.misses)} misses"
            f" | {verdict(ratio >= 1.7 and clean)} |"
        )
    for backend in BACKENDS:
        through, behind = by.get((backend, "write-through")), by.get((backend, "write-behind"))
        if through and behind:
            p_through = percentile(through.phase("baseline").latencies(), 50)
            p_behind = percentile(behind.phase("baseline").latencies(), 50)
            if p_through and p_behind:
                lines.append(
                    f"| p50 case latency write-behind <= 0.5x write-through | {backend} + Redis"
                    f" | {fmt_ms(p_behind)} ms vs {fmt_ms(p_through)} ms"
                    f" = {p_behind / p_through:.2f}x | {verdict(p_behind <= 0.5 * p_through)} |"
                )
    for result in results:
        cost = costs(result)["auto"]
        if result.mode == "write-behind":
            lines.append(
                f"| cold requests per auto-approved case (write-behind) <= 15 | {result.name}"
                f" | {cost.cold:.1f} (+ {cost.provider_cold:.1f} by the simulated provider)"
                f" | {verdict(cost.cold + cost.provider_cold <= 15)} |"
            )
        lines.append(
            f"| Redis commands per case <= 100 | {result.name} | {cost.redis_commands:.0f}"
            f" (server count; {cost.redis_round_trips:.0f} round trips)"
            f" | {verdict(cost.redis_commands <= 100)} |"
        )
    return lines


def render_cases(results: list[ConfigResult], options: Options, seconds: float) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Support-case load benchmark",
        "",
        "Generated by `benchmarks/bench_cases.py`; do not edit by hand. One run on one",
        f"machine ({platform.machine()}, {os.cpu_count()} cores, Python"
        f" {platform.python_version()}), {now}, {seconds / 60:.1f} min.",
        f"Options: {options.cases} cases per load phase, {options.counted} counted one by one,"
        f" {options.in_flight} in flight, {options.processes} processes for the scale-out;"
        f" one case in {REVIEW_EVERY} goes to human review and is approved by a second client.",
        "",
        "The machine was shared with other work while this ran: absolute latencies and",
        "throughputs are this run's, the counts per case do not depend on load.",
        "",
        "## Targets",
        "",
        *targets(results),
        "",
        "## Throughput and latency",
        "",
        "Case latency: submit to `completed` (a review case includes its approval). Phases:",
        "`counted` (one case at a time, each counted), `baseline` (1 process, 1 in flight; the",
        "write modes of a backend take turns case by case, so both see the same background",
        "load), `concurrent` (1 process, C in flight), `scale-out` (N processes, C in flight).",
        "",
        "| configuration | phase | processes | in flight | cases | cases/s | p50 ms | p95 ms"
        " | p99 ms | p50 auto ms | p50 review ms | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        for phase in result.phases:
            lat = phase.latencies()
            errors = ", ".join(f"{k}: {v}" for k, v in phase.errors().items()) or "0"
            out.append(
                f"| {result.name} | {phase.name} | {phase.processes} | {phase.in_flight}"
                f" | {len(phase.cases)} | {phase.throughput:.2f} | {fmt_ms(percentile(lat, 50))}"
                f" | {fmt_ms(percentile(lat, 95))} | {fmt_ms(percentile(lat, 99))}"
                f" | {fmt_ms(percentile(phase.latencies(False), 50))}"
                f" | {fmt_ms(percentile(phase.latencies(True), 50))} | {errors} |"
            )
    out += [
        "",
        "Under load: cold requests per case (the simulated provider's included; more than in",
        "the counted phase means optimistic-concurrency retries), and the CPU each component",
        "used, in milliseconds per case (all its processes, read from /proc; the machine has"
        f" {os.cpu_count()} cores, shared by all of them):",
        "",
    ]
    components = sorted({name for r in results for p in r.phases for name in p.cpu})
    out += [
        "| configuration | phase | cases/s | cold requests per case | "
        + " | ".join(components)
        + " | total | load average |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in components) + " | --- | --- |",
    ]
    for result in results:
        for phase in result.phases:
            if not phase.cpu:
                continue
            per_case = {
                name: phase.cpu.get(name, 0.0) * 1000 / len(phase.cases) for name in components
            }
            out.append(
                f"| {result.name} | {phase.name} | {phase.throughput:.2f}"
                f" | {phase_cold(phase):.1f} | "
                + " | ".join(f"{per_case[name]:.0f}" for name in components)
                + f" | {sum(per_case.values()):.0f} | {phase.load or 0:.1f} |"
            )
    out += [
        "",
        "## Store work per case",
        "",
        "Counted one case at a time on one process (the `counted` phase). Cold requests: Cosmos",
        "HTTP requests or Postgres statements the worker sent for the case; the simulated",
        "provider's own ledger (it stands for an external payment and mail system) is shown",
        "apart. Redis commands: the server's count (INFO commandstats, commands run inside",
        "scripts included); round trips: what the worker sent. Estimated RU: the model below",
        "applied to the Cosmos requests (the emulator reports 1 RU for every request).",
        "Stored bytes: the case's cold documents or rows (with its provider ledgers) and the",
        "Redis memory of its keys right after it completed (hot copy, checkpoint cache).",
        "",
        "| configuration | case | cold requests | + provider | Cosmos read / query / create"
        " / replace / upsert / patch / delete / batch | est. RU | Redis commands | Redis round trips"
        " | cold bytes | Redis bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        for kind, cost in costs(result).items():
            split = " / ".join(f"{v:.1f}" for v in cost.kinds.values())
            ru = f"{cost.ru:.0f}" if result.backend == "cosmos" else "-"
            out.append(
                f"| {result.name} | {kind} | {cost.cold:.1f} | {cost.provider_cold:.1f}"
                f" | {split if result.backend == 'cosmos' else '-'} | {ru}"
                f" | {cost.redis_commands:.0f} | {cost.redis_round_trips:.0f}"
                f" | {cost.cold_bytes:,.0f} | {cost.hot_bytes:,.0f} |"
            )
    out += [
        "",
        f"RU model (an estimate, not a measurement): {json.dumps(RU_MODEL)}.",
        "",
        *redis_command_table(results),
        "",
        "## Verification",
        "",
        "Every case of every phase (warm-up included): completed, the expected policy decision",
        "(and the approval by the reviewer client), refund and reset link done and each",
        "performed exactly once in the simulated provider's ledger, and the audit trail a",
        "complete chain with each agent's section written once and each effect claimed then",
        "recorded done.",
        "",
        "| configuration | cases | misses |",
        "| --- | --- | --- |",
    ]
    for result in results:
        out.append(f"| {result.name} | {result.verified} | {len(result.misses)} |")
    misses = [f"- {r.name}: {miss}" for r in results for miss in r.misses]
    if misses:
        out += ["", "Misses:", "", *misses[:50]]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- capacity

# List prices, stated as estimates (USD, pay-as-you-go, a US region) on the date given;
# the pages cited are where to check them. Prices change.
PRICE_DATE = "2026-12-01"
PRICE_REGION = "East US"
COSMOS_SERVERLESS_USD_PER_MILLION_RU = 0.25
COSMOS_PRICING_PAGES = (
    "https://learn.microsoft.com/azure/cosmos-db/how-pricing-works",
    "https://azure.microsoft.com/pricing/details/cosmos-db/serverless/",
)
COSMOS_SERVERLESS_RU_PER_SECOND = 5000  # per container up to 250 GB
COSMOS_SERVERLESS_PAGE = "https://learn.microsoft.com/azure/cosmos-db/serverless-performance"
# Azure Managed Redis sizes of the Balanced tier (the SKU's number is its memory in GB; B0
# is 0.5 GB); part of it is reserved by the service, so only REDIS_USABLE_SHARE counts.
REDIS_SIZES_GB = {
    "B0": 0.5,
    "B1": 1,
    "B3": 3,
    "B5": 6,
    "B10": 12,
    "B20": 24,
    "B50": 60,
    "B100": 120,
}
REDIS_USABLE_SHARE = 0.8
REDIS_PAGE = "https://learn.microsoft.com/azure/redis/plan-tiers-and-capacity"


def usd_per_thousand(ru_per_case: float) -> float:
    return ru_per_case * 1000 / 1_000_000 * COSMOS_SERVERLESS_USD_PER_MILLION_RU


def render_capacity(results: list[ConfigResult]) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Capacity and cost per case",
        "",
        "Generated by `benchmarks/bench_cases.py` from the run in"
        f" [benchmarks/CASES.md](../benchmarks/CASES.md) ({now}); do not edit by hand.",
        "",
        "**Prices and sizes are estimates**: list prices in USD, pay-as-you-go, region"
        f" {PRICE_REGION}, as of {PRICE_DATE}; the pages cited are where to check them",
        "(the search made for this report found the pricing model and the size tiers on",
        "them, not a dated price table). Request charges are estimated from the request",
        "counts with the model in CASES.md (the local Cosmos emulator reports 1 RU per",
        "request); measure the real charge in Azure (`agent_state.cold.request_charge`)",
        "before committing to a budget.",
        "",
        "## Cosmos DB serverless: RU and cost per case",
        "",
        f"Serverless price: {COSMOS_SERVERLESS_USD_PER_MILLION_RU} USD per million RU"
        f" ({', '.join(COSMOS_PRICING_PAGES)}); storage is billed apart.",
        "",
        "| configuration | case | Cosmos requests | of them patches | est. RU per case"
        " | est. USD per 1,000 cases |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    cosmos = [r for r in results if r.backend == "cosmos"]
    review_share = 1 / REVIEW_EVERY
    for result in cosmos:
        mixed = 0.0
        for kind, cost in costs(result).items():
            ru = cost.ru + estimated_ru_provider(result, kind)
            mixed += ru * (review_share if kind == "review" else 1 - review_share)
            out.append(
                f"| {result.name} | {kind} | {cost.cold + cost.provider_cold:.1f}"
                f" | {cost.kinds['patch']:.1f} | {ru:.0f} | {usd_per_thousand(ru):.4f} |"
            )
        out.append(
            f"| {result.name} | mix (1 in {REVIEW_EVERY} reviewed) | | | {mixed:.0f}"
            f" | {usd_per_thousand(mixed):.4f} |"
        )
    out += [
        "",
        "The provider ledger's requests are included here, as if the provider stored its",
        "ledger in the same account; without them the figure is lower. A review case's",
        "retention hold is one marker item (an upsert) and its release one patch of it plus",
        "one query, whatever the size of the case's history.",
        "",
        f"A serverless container serves up to {COSMOS_SERVERLESS_RU_PER_SECOND:,} RU/s"
        f" ({COSMOS_SERVERLESS_PAGE}):",
        "",
    ]
    for result in cosmos:
        ru = costs(result)["auto"].ru + estimated_ru_provider(result, "auto")
        if ru:
            out.append(
                f"- {result.name}: about {COSMOS_SERVERLESS_RU_PER_SECOND / ru:,.0f}"
                " auto-approved cases/s before Cosmos throttles (429)."
            )
    out += [
        "",
        "## Redis memory per active case and cases per Azure Managed Redis size",
        "",
        "Redis bytes per case: the memory of the case's keys right after it completed (its",
        "cached record and checkpoint cache; the write-behind log is drained at the run's",
        "end). An active case holds at most about this much; the hot copy of a finished",
        "case stays until `STATE_HOT_TTL_SECONDS` runs out (or eviction takes it).",
        f"Sizes: {REDIS_PAGE}; {REDIS_USABLE_SHARE:.0%} of the memory is counted as usable",
        "for data (the rest is left to the service's reservation and fragmentation).",
        "",
    ]
    hot = [(r.name, costs(r)["auto"].hot_bytes, costs(r)["review"].hot_bytes) for r in results]
    header = "| size | memory GB | " + " | ".join(name for name, _, _ in hot) + " |"
    out += [header, "| --- | --- | " + " | ".join("---" for _ in hot) + " |"]
    worst = {name: max(auto, review) for name, auto, review in hot}
    for size, gigabytes in REDIS_SIZES_GB.items():
        usable = gigabytes * 1024**3 * REDIS_USABLE_SHARE
        cells = [f"{usable / worst[name]:,.0f}" if worst[name] else "-" for name, _, _ in hot]
        out.append(f"| {size} | {gigabytes} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Active cases each size holds (larger of the auto and review case footprints).",
        "",
        "## The bottleneck at each scale",
        "",
    ]
    out += bottlenecks(results)
    return "\n".join(out) + "\n"


def estimated_ru_provider(result: ConfigResult, kind: str) -> float:
    counted = [
        r for r in result.phase("counted").cases if r.review == (kind == "review") and not r.errors
    ]
    return mean_of(counted, lambda r: estimated_ru(r.counts, "provider."))


def busy_cores(phase: Phase) -> str:
    """Cores each component kept busy during the phase, busiest first."""
    if not phase.cpu or not phase.seconds:
        return "not measured"
    ranked = sorted(phase.cpu.items(), key=lambda item: -item[1])
    return ", ".join(f"{name} {cpu / phase.seconds:.2f}" for name, cpu in ranked)


def bottlenecks(results: list[ConfigResult]) -> list[str]:
    lines = []
    for result in results:
        base = result.phase("baseline")
        concurrent, scale = result.phase("concurrent"), result.phase("scale-out")
        cost = costs(result)["auto"]
        total = sum(scale.cpu.values()) / scale.seconds if scale.seconds else 0.0
        lines.append(
            f"- **{result.name}**: one case at a time {base.throughput:.1f} cases/s (p50"
            f" {fmt_ms(percentile(base.latencies(), 50))} ms: about"
            f" {cost.cold + cost.provider_cold:.0f} sequential cold requests and"
            f" {cost.redis_round_trips:.0f} Redis round trips per auto-approved case);"
            f" {concurrent.in_flight} in flight on 1 process {concurrent.throughput:.1f} cases/s;"
            f" on {scale.processes} processes {scale.throughput:.1f} cases/s. Cores busy during"
            f" the scale-out: {busy_cores(scale)} (total {total:.2f} of {os.cpu_count()})."
        )
    lines += [
        "",
        "Reading these figures:",
        "",
        "- One instance, few cases at a time: latency-bound. A case is the sum of its",
        "  sequential round trips; every record write goes to the cold store first (on",
        "  Cosmos 3 requests per section write: read, audit entry, replace), and the hot",
        "  tier serves the reads.",
        "- More cases in flight, more instances: CPU-bound here. The API workers, the",
        "  stores and the load driver share the machine's cores with other work (the load",
        "  average in CASES.md counts it): when what is left is used up, throughput stops",
        "  growing with concurrency. The local Cosmos emulator is one Node.js process (one",
        "  core at most) and costs about as much CPU per case as the API itself: fewer",
        "  requests per case is what raises its ceiling. In Azure each Functions instance brings",
        "  its own CPU: the API workers' CPU per case (table in CASES.md) bounds cases/s per",
        "  instance, and the run index (8 shared records: every case writes one when it",
        "  starts, and the timer drops the cases that rest in one write a shard a minute)",
        "  adds optimistic-concurrency retries as concurrency grows.",
        "- At scale: Cosmos serverless RU/s per container bounds cases/s (above), Redis",
        "  memory bounds the active cases per size (above); past that, provisioned or",
        "  autoscale throughput, and fewer cold writes per case.",
    ]
    return lines


# --------------------------------------------------------------------------- main


async def run(
    stack_env: dict[str, str],
    options: Options,
    workdir: Path,
    servers: dict[str, int] | None = None,
) -> list[ConfigResult]:
    """Every configuration; `servers`: name -> pid of the stack's servers (CPU accounting)."""
    results = []
    for backend in options.backends:
        results += await run_backend(stack_env, backend, options, workdir, servers or {})
    return results


@contextmanager
def own_stack(
    workdir: Path, with_postgres: bool
) -> Iterator[tuple[dict[str, str], dict[str, int]]]:
    stack = Stack.plan(workdir / "stack", with_postgres=with_postgres)
    try:
        log("starting the local stack")
        stack.start()
        servers = {
            server.name: server.pid
            for server in (stack.redis, stack.cosmos, stack.postgres)
            if server is not None and server.pid is not None
        }
        yield stack.env(), servers
    finally:
        stack.stop()
        if stack.postgres is not None:
            stack.postgres.remove_data()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (small counts)")
    parser.add_argument("--cases", type=int, default=40, help="cases per load phase")
    parser.add_argument("--counted", type=int, default=10, help="cases counted one by one")
    parser.add_argument("--in-flight", type=int, default=10)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "CASES.md")
    parser.add_argument("--capacity", type=Path, default=REPO_ROOT / "docs" / "CAPACITY.md")
    args = parser.parse_args()
    options = Options(
        cases=10 if args.quick else args.cases,
        counted=5 if args.quick else args.counted,
        in_flight=args.in_flight,
        processes=args.processes,
        backends=[b for b in args.backends.split(",") if b],
        modes=[m for m in args.modes.split(",") if m],
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-cases-") as tmp:
        workdir = Path(tmp)
        with own_stack(workdir, "postgres" in options.backends) as (stack_env, servers):
            results = asyncio.run(run(stack_env, options, workdir, servers))
    seconds = time.perf_counter() - started
    args.output.write_text(render_cases(results, options, seconds))
    log(f"wrote {args.output}")
    # The capacity model comes from full runs only: a smoke run's figures are too few.
    if (
        not args.quick
        and set(options.backends) == set(BACKENDS)
        and set(options.modes) == set(MODES)
    ):
        args.capacity.write_text(render_capacity(results))
        log(f"wrote {args.capacity}")
    misses = sum(len(r.misses) for r in results)
    if misses:
        raise SystemExit(f"{misses} cases failed verification; see {args.output}")


if __name__ == "__main__":
    main()
