"""Postgres (the cold tier, source of truth) restarted mid-workflow.

A dedicated server, so the restart touches nothing else. Cases run through the
app and the workload's writers count in shared records; mid-way Postgres is
stopped (fast shutdown: every connection is cut) and started again on the same
port and data. Calls during the outage must fail typed (`BackendUnavailable`),
nothing acknowledged may be lost, and every case completes once the stalled
runs are resumed (what the timer does).
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Callable

import pytest

from devstack import PostgresServer
from state.settings import Settings
from tests.support.effects import provider_calls
from tests.support.stale import stalling_quickly

from .apps import App, normalized, open_runtime, settle, submit_until_accepted
from .conftest import Deadline, Recorder
from .workload import Workload

CASES = 4
WRITES_EACH = 15
DOWN_SECONDS = 1.5


async def restart(server: PostgresServer) -> None:
    await asyncio.sleep(0.3)
    # SIGINT is Postgres's fast shutdown: every session is terminated at once. (SIGTERM,
    # what `stop()` sends, is a smart shutdown that waits for connected clients: with
    # the app's pool open it would not stop at all until its timeout.)
    assert server.process is not None
    server.process.send_signal(signal.SIGINT)
    await asyncio.to_thread(server.process.wait, 30)
    server.stop()  # forget the exited process
    await asyncio.sleep(DOWN_SECONDS)
    await asyncio.to_thread(server.start)


async def submit_all(app: App, case_ids: list[str], deadline: Deadline) -> int:
    failures = 0
    for case_id in case_ids:
        failures += await submit_until_accepted(app, case_id, deadline)
    return failures


@pytest.mark.slow
async def test_postgres_restart_mid_workflow(
    postgres_server: PostgresServer,
    settings_for: Callable[..., Settings],
    reliability: Recorder,
) -> None:
    settings = stalling_quickly(settings_for("postgres", postgres_url=postgres_server.url))
    deadline = Deadline(150)
    async with open_runtime(settings) as app:
        reference_id = f"pg-reference-{uuid.uuid4().hex[:8]}"
        await submit_until_accepted(app, reference_id, deadline)
        await app.runtime.service.wait_idle()
        reference_record = await app.runtime.backends.cold.get(reference_id)
        assert reference_record is not None
        reference = normalized(dict(reference_record.sections), reference_id)

        workload = Workload(app.runtime.store)
        await workload.setup()
        case_ids = [f"pg-restart-{n}-{uuid.uuid4().hex[:8]}" for n in range(CASES)]
        submit_failures, _, _ = await asyncio.gather(
            submit_all(app, case_ids, deadline),
            workload.run(WRITES_EACH, deadline, pause=0.15),
            restart(postgres_server),
        )
        statuses = await settle(app, case_ids, deadline)
        result = await workload.verify(app.runtime.backends.cold)
        wrong = 0
        for case_id in case_ids:
            record = await app.runtime.backends.cold.get(case_id)
            if record is None or normalized(dict(record.sections), case_id) != reference:
                wrong += 1
            for kind in ("refund", "reset_link"):
                if len(await provider_calls(app.runtime, case_id, kind)) != 1:
                    wrong += 1
        await workload.cleanup(app.runtime.backends.cold)

    completed = sum(1 for status in statuses.values() if status.value == "completed")
    reliability.record(
        "Postgres restarted mid-workflow",
        injected=f"dedicated Postgres stopped (fast shutdown, SIGINT) mid-run, down {DOWN_SECONDS} s, "
        "restarted on the same port and data",
        runs=CASES + result.acknowledged,
        lost_writes=result.lost_writes,
        silent_overwrites=result.silent_overwrites,
        observed=f"{completed}/{CASES} cases completed as undisturbed ({wrong} differ); "
        f"{result.acknowledged} writes acknowledged, slowest {result.slowest_write_s:.1f} s "
        "(calls wait for the pool to reconnect); typed BackendUnavailable: "
        f"{result.unavailable['postgres']} in writers, {submit_failures} in submits, "
        f"{result.unavailable['after recovery']} from dead pooled connections after the restart",
    )
    assert result.lost_writes == 0 and result.silent_overwrites == 0
    assert completed == CASES and wrong == 0
