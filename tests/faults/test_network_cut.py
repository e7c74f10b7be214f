"""The network between the app and a store cut mid-workflow, through a loopback proxy.

The app reaches Redis (or Postgres, or Cosmos) only through `LoopbackProxy`; mid-way the
test cuts it (connections reset and new ones refused, or a blackhole where
bytes vanish and clients hit their timeouts) and restores it. Nothing
acknowledged may be lost, every case completes, health reports the cut tier
down while it is cut, and the hot tier fills up again afterwards.

Cosmos speaks HTTPS: the proxy forwards TCP, so TLS runs end to end between the
SDK and the emulator. The SDK's endpoint is the proxy's address, but its
follow-up requests would go straight to the emulator's own port, around the
proxy: the emulator describes its account (the endpoint the SDK then uses for
every request) from its listening address, not from the request's Host header.
So the Cosmos case runs a dedicated emulator that advertises the proxy's port.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from devstack import CosmosEmulator, free_port
from state.cold import circuit
from state.cold.cosmos_client import CosmosConnection, EnvironmentProxyTransport
from state.cold.cosmos_store import CosmosStateStore
from state.errors import BackendUnavailable, NoAnswer
from state.factory import backends_for
from state.settings import Settings
from tests.support.stale import stalling_quickly

from .apps import App, normalized, open_runtime, settle, submit_until_accepted
from .conftest import Deadline, Recorder
from .proxy import CutMode, LoopbackProxy
from .workload import Workload

CASES = 3
WRITES_EACH = 15
# A run whose call to the provider failed during a cold cut (the simulated provider keeps
# its ledger in the cold store) leaves its side effect's claim leased for the lock's TTL:
# the call may still have been honoured, so no resume calls out again before it ends.
# Shorter than the default 30 s so the resume waits seconds, not half a minute.
COLD_CUT_LOCK_TTL_MS = 6_000


FIXTURES = Path(__file__).resolve().parent / "fixtures"


@dataclass(kw_only=True)
class AdvertisingCosmosEmulator(CosmosEmulator):
    """The project's emulator, describing its account at `advertised_port` (a proxy's)."""

    advertised_port: int

    def command(self) -> list[str]:
        node, _, port, host = super().command()
        script = FIXTURES / "cosmos-emulator-advertising.js"
        return [node, str(script), port, host, str(self.advertised_port)]


@pytest.fixture
def proxies() -> Iterator[Callable[..., LoopbackProxy]]:
    started: list[LoopbackProxy] = []

    def start(target_port: int, port: int | None = None) -> LoopbackProxy:
        proxy = LoopbackProxy(target_port, port=port).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def cosmos_behind(tmp_path: Path) -> Iterator[Callable[[int], CosmosEmulator]]:
    """Start a dedicated emulator that advertises the given (proxy) port; stopped after."""
    started: list[CosmosEmulator] = []

    def start(proxy_port: int) -> CosmosEmulator:
        emulator = AdvertisingCosmosEmulator(
            port=free_port(), workdir=tmp_path / "cosmos", advertised_port=proxy_port
        )
        emulator.start()
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


def cosmos_through_a_proxy(
    cosmos_behind: Callable[[int], CosmosEmulator],
    proxies: Callable[..., LoopbackProxy],
    settings_for: Callable[..., Settings],
) -> tuple[LoopbackProxy, Settings]:
    """An emulator reached through a proxy (to cut), with the silent-store test timeout."""
    proxy_port = free_port()
    emulator = cosmos_behind(proxy_port)
    proxy = proxies(emulator.port, port=proxy_port)
    settings = settings_for(
        "cosmos",
        redis_url=None,
        cosmos_endpoint=f"https://127.0.0.1:{proxy.port}/",
        cosmos_operation_timeout_seconds=SILENT_TIMEOUT_SECONDS,
    )
    return proxy, settings


async def cut_for(app: App, proxy: LoopbackProxy, mode: CutMode, seconds: float, tier: str) -> bool:
    """Cut, check health names the tier down meanwhile, restore; whether it did."""
    await asyncio.sleep(0.3)
    proxy.cut(mode)
    try:
        await asyncio.sleep(seconds / 2)
        health = await app.runtime.service.health()
        reported = any(t.name == tier and not t.up for t in health.tiers)
        await asyncio.sleep(seconds / 2)
    finally:
        proxy.restore()
    return reported


async def reference_of(app: App, deadline: Deadline) -> dict[str, object]:
    case_id = f"cut-reference-{uuid.uuid4().hex[:8]}"
    await submit_until_accepted(app, case_id, deadline)
    await app.runtime.service.wait_idle()
    record = await app.runtime.backends.cold.get(case_id)
    assert record is not None
    return normalized(dict(record.sections), case_id)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tier", "mode", "seconds"),
    [
        ("redis", "reset", 1.5),
        ("redis", "blackhole", 3.0),
        ("postgres", "reset", 1.5),
        ("cosmos", "reset", 1.5),
    ],
)
async def test_network_cut_mid_workflow(
    tier: str,
    mode: CutMode,
    seconds: float,
    stack_env: dict[str, str],
    settings_for: Callable[..., Settings],
    proxies: Callable[..., LoopbackProxy],
    cosmos_behind: Callable[[int], CosmosEmulator],
    reliability: Recorder,
) -> None:
    if tier == "cosmos":
        proxy_port = free_port()
        emulator = cosmos_behind(proxy_port)
        proxy = proxies(emulator.port, port=proxy_port)
        proxied = f"https://127.0.0.1:{proxy.port}/"
    else:
        target = urlparse(stack_env["REDIS_URL" if tier == "redis" else "POSTGRES_URL"])
        assert target.hostname == "127.0.0.1" and target.port is not None
        proxy = proxies(target.port)
        proxied = target._replace(netloc=f"{target.netloc.rsplit(':', 1)[0]}:{proxy.port}").geturl()
    if tier == "redis":
        # A run whose boundary flush cannot reach Redis is left for the timer (the state it
        # would acknowledge may live only in Redis): it must go stale within the deadline.
        settings = settings_for("postgres", redis_url=proxied.rsplit("/", 1)[0] + "/3")
    elif tier == "postgres":
        settings = settings_for(
            "postgres",
            postgres_url=proxied,
            state_lock_ttl_ms=COLD_CUT_LOCK_TTL_MS,
        )
    else:
        settings = settings_for(
            "cosmos",
            cosmos_endpoint=proxied,
            state_lock_ttl_ms=COLD_CUT_LOCK_TTL_MS,
        )
    settings = stalling_quickly(settings)
    deadline = Deadline(150)
    async with open_runtime(settings) as app:
        reference = await reference_of(app, deadline)
        workload = Workload(app.runtime.store)
        await workload.setup()
        case_ids = [f"cut-{tier}-{n}-{uuid.uuid4().hex[:8]}" for n in range(CASES)]

        async def submit_all() -> None:
            for case_id in case_ids:
                await submit_until_accepted(app, case_id, deadline)

        _, _, reported = await asyncio.gather(
            submit_all(),
            workload.run(WRITES_EACH, deadline, pause=0.05),
            cut_for(app, proxy, mode, seconds, tier),
        )
        statuses = await settle(app, case_ids, deadline)
        result = await workload.verify(app.runtime.backends.cold)
        wrong = 0
        for case_id in case_ids:
            record = await workload.settled(partial(app.runtime.backends.cold.get, case_id))
            if record is None or normalized(dict(record.sections), case_id) != reference:
                wrong += 1
        refilled = 0
        if tier == "redis":
            hot = app.runtime.backends.hot
            assert hot is not None
            await asyncio.sleep(1.1)  # the tiered store rests a failed hot tier for a second
            for thread_id in [*workload.threads, *case_ids]:
                await app.runtime.store.get(thread_id)
                # Threads written during the cut are settled in the background.
                await app.runtime.store.settled()
                cached = await hot.get(thread_id)
                refilled += cached is not None
        await workload.cleanup(app.runtime.backends.cold)

    completed = sum(1 for status in statuses.values() if status.value == "completed")
    total = len(workload.threads) + CASES
    refill_note = f"; hot tier refilled {refilled}/{total}" if tier == "redis" else ""
    reliability.record(
        f"Network cut to {tier} ({mode})",
        injected=f"loopback proxy between app and {tier}: {mode} for {seconds} s mid-run",
        runs=CASES + result.acknowledged,
        lost_writes=result.lost_writes,
        silent_overwrites=result.silent_overwrites,
        observed=f"{completed}/{CASES} cases completed as undisturbed ({wrong} differ); health "
        f"{'reported' if reported else 'did NOT report'} {tier} down during the cut; "
        f"slowest write {result.slowest_write_s:.1f} s; "
        f"{sum(result.unavailable.values())} typed BackendUnavailable retried{refill_note}",
    )
    assert result.lost_writes == 0 and result.silent_overwrites == 0
    assert completed == CASES and wrong == 0
    assert reported
    if tier == "redis":
        assert refilled == total


SILENT_TIMEOUT_SECONDS = 2.0
SILENT_CALLS = 5


@pytest.mark.parametrize("tier", ["postgres", "cosmos"])
async def test_a_cold_store_answering_nothing_is_waited_on_once(
    tier: str,
    stack_env: dict[str, str],
    settings_for: Callable[..., Settings],
    proxies: Callable[..., LoopbackProxy],
    cosmos_behind: Callable[[int], CosmosEmulator],
    reliability: Recorder,
) -> None:
    """A blackhole between the app and its cold store (a hung server, a path dropping
    packets): every call would wait out the operation timeout. The first does; the next
    fail typed at once (`AnswerCircuit`) instead of piling up; once the store answers a
    probe again, calls go through and what was stored before is all there."""
    if tier == "cosmos":
        proxy, settings = cosmos_through_a_proxy(cosmos_behind, proxies, settings_for)
    else:
        target = urlparse(stack_env["POSTGRES_URL"])
        assert target.port is not None
        proxy = proxies(target.port)
        settings = settings_for(
            "postgres",
            redis_url=None,
            postgres_url=target._replace(
                netloc=f"{target.netloc.rsplit(':', 1)[0]}:{proxy.port}"
            ).geturl(),
            postgres_operation_timeout_seconds=SILENT_TIMEOUT_SECONDS,
        )
    thread_id = f"silent-{tier}-{uuid.uuid4().hex[:8]}"
    async with backends_for(settings) as backends:
        cold = backends.cold
        await cold.create(thread_id, {"step": "before"}, agent_id="silent-test")
        proxy.cut("blackhole")
        took: list[float] = []
        failures: list[BaseException] = []
        try:
            for _ in range(SILENT_CALLS):
                started = time.monotonic()
                try:
                    await cold.get(thread_id)
                except BackendUnavailable as exc:
                    failures.append(exc)
                took.append(time.monotonic() - started)
        finally:
            proxy.restore()
        restored = time.monotonic()
        found = None
        while found is None and time.monotonic() - restored < 30:
            try:
                found = await cold.get(thread_id)
            except BackendUnavailable:
                await asyncio.sleep(0.1)
        answered_after = time.monotonic() - restored
        await cold.delete(thread_id)
    reliability.record(
        f"{tier.capitalize()} answering nothing",
        injected=f"loopback proxy dropping every byte between app and {tier} (blackhole) for "
        f"{SILENT_CALLS} reads; operation timeout {SILENT_TIMEOUT_SECONDS:g} s",
        runs=SILENT_CALLS,
        lost_writes=0 if found is not None else 1,
        silent_overwrites=0,
        observed=f"first read {took[0]:.1f} s, the next {SILENT_CALLS - 1} "
        f"{sum(took[1:]) * 1000:.1f} ms in all; {len(failures)}/{SILENT_CALLS} "
        "BackendUnavailable; answered again "
        f"{answered_after:.1f} s after the restore, the record intact",
    )
    assert len(failures) == SILENT_CALLS
    assert took[0] >= SILENT_TIMEOUT_SECONDS
    assert sum(took[1:]) < 1.0, took
    assert found is not None and dict(found.sections) == {"step": "before"}


class HeldAnswerTransport(EnvironmentProxyTransport):
    """Leaves the answer to the request sent after `hold()` unread, as a busy event loop
    would, until the next request goes out."""

    def __init__(self) -> None:
        super().__init__()
        self.answered = asyncio.Event()
        self._holding = False
        self._release: asyncio.Event | None = None

    def hold(self) -> None:
        self._holding = True

    async def send(self, request: Any, **config: Any) -> Any:
        if self._release is not None:
            self._release.set()
        if not self._holding:
            return await super().send(request, **config)
        self._holding = False
        self._release = release = asyncio.Event()
        response = await super().send(request, **config)
        self.answered.set()
        await release.wait()
        return response


async def test_a_cosmos_answer_sent_before_a_silent_call_but_read_during_it_opens_the_circuit(
    settings_for: Callable[..., Settings],
    proxies: Callable[..., LoopbackProxy],
    cosmos_behind: Callable[[int], CosmosEmulator],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another caller's read was answered just before the link went silent, and the busy
    event loop reads that answer only while the next call waits: news from before that
    call, so it still opens the circuit (else each later call waits out the timeout)."""
    # Long, as the teardown of the silent call's connection may outlast the default window.
    monkeypatch.setattr(circuit, "OPEN_SECONDS", 30.0)
    proxy, settings = cosmos_through_a_proxy(cosmos_behind, proxies, settings_for)
    transport = HeldAnswerTransport()
    connection = CosmosConnection(settings.cosmos, transport=transport)
    cold = CosmosStateStore(connection, max_item_bytes=settings.state_max_item_bytes)
    thread_id = f"late-answer-{uuid.uuid4().hex[:8]}"
    try:
        await cold.setup()
        await cold.create(thread_id, {"step": "before"}, agent_id="late-answer-test")
        transport.hold()
        answered_late = asyncio.create_task(cold.get(thread_id))
        await transport.answered.wait()
        proxy.cut("blackhole")
        # Its request going out lets the held answer be read while this call waits.
        with pytest.raises(NoAnswer):
            await cold.get(thread_id)
        assert answered_late.done()
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="answered nothing lately"):
            await cold.get(thread_id)
        assert time.monotonic() - started < 0.2
        found = await answered_late
        assert found is not None and dict(found.sections) == {"step": "before"}
    finally:
        proxy.restore()
        await asyncio.wait_for(connection.close(), 10)
