"""A run index shard whose stored record is damaged for good: reported as damaged (the
tick's log, its report, `/api/health`), the sweep paused, and `agent-state run-index
repair` rebuilding it from the case records so the next tick resumes its stalled case and
sweeps again. On a cold store of the test's own (the timer and the repair see every case
of their store), on both backends.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psycopg
import pytest
from click.testing import Result
from support.cosmos import drop_container, rewrite_record
from typer.testing import CliRunner

import state
from agent_state_cli.cli import app
from state import Backends, TieredStateStore
from state.errors import BackendUnavailable, UnsupportedSchemaVersion, WorkflowNotFound
from state.size import COMPRESSED_KEY
from support_cases.api import create_app
from support_cases.maintenance import run_tick
from support_cases.models import CaseStatus
from support_cases.runs import INDEX_IDS, RunTracker, shard_of
from support_cases.runtime import Runtime
from support_cases.settings import AppSettings

from .apps import submission
from .test_timer import case_in_shard, quiet_meters, stale_case

DAMAGES: dict[str, Any] = {
    # A compressed section whose data no longer decompresses (the store raises).
    "undecodable": {COMPRESSED_KEY: {"codec": "zlib", "bytes": 10, "data": "bm90IHpsaWI="}},
    # Plain JSON of the wrong shape (written by hand): not a map of case id to time.
    "wrong shape": ["case-1", "case-2"],
}


@pytest.fixture
async def own_store(
    request: pytest.FixtureRequest, env_for: Callable[..., dict[str, str]]
) -> AsyncIterator[dict[str, str]]:
    """The app's settings (as environment values) on a cold store of this test's own."""
    backend = request.param
    overrides: dict[str, object] = {"case_stale_after_seconds": 60}
    if backend == "postgres":
        overrides["postgres_url"] = request.getfixturevalue("fresh_postgres_url")
    else:
        overrides["cosmos_container"] = f"repair-{uuid.uuid4().hex[:8]}"
    env = env_for(backend, **overrides)
    yield env
    if backend == "cosmos":
        await drop_container(settings_of(env))


def settings_of(env: dict[str, str]) -> AppSettings:
    return AppSettings.model_validate({name.lower(): value for name, value in env.items()})


@asynccontextmanager
async def opened(env: dict[str, str]) -> AsyncIterator[Runtime]:
    """The app's runtime on `env`'s stores, closed once its runs are idle."""
    runtime = await Runtime.open(settings_of(env))
    try:
        yield runtime
    finally:
        await runtime.service.wait_idle()
        await runtime.close()


def staged(
    monkeypatch: pytest.MonkeyPatch,
    fault: Callable[[Backends, str, Callable[[str], Any]], Any],
) -> None:
    """The repair command's own cold store reads a thread through `fault(backends,
    thread_id, real_get)` (in the command's event loop, on its own connections)."""
    # The command imports `open_backends` from `state` when it runs.
    real_open = state.open_backends

    async def open_backends(settings: AppSettings) -> Backends:
        backends = await real_open(settings)
        real_get = backends.cold.get

        async def get(thread_id: str) -> Any:
            return await fault(backends, thread_id, real_get)

        monkeypatch.setattr(backends.cold, "get", get)
        return backends

    monkeypatch.setattr(state, "open_backends", open_backends)


async def damage(runtime: Runtime, shard: str) -> None:
    listed = await runtime.backends.cold.get(shard)
    assert listed is not None
    await runtime.backends.cold.update_section(
        shard, "cases", DAMAGES["wrong shape"], expected_version=listed.version, agent_id="t"
    )


async def unshape(env: dict[str, str], shard: str) -> None:
    """Store the shard's sections as a list (by hand): no record's shape, on either backend."""
    if env["STATE_COLD_BACKEND"] == "postgres":
        async with await psycopg.AsyncConnection.connect(env["POSTGRES_URL"], autocommit=True) as c:
            await c.execute(
                "UPDATE workflow_records SET sections = '[]'::jsonb WHERE thread_id = %s", (shard,)
            )
    else:
        await rewrite_record(settings_of(env), shard, sections=[])


def repair(env: dict[str, str], *shards: str) -> str:
    result = CliRunner().invoke(app, ["run-index", "repair", *shards], env=env)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(
    ("own_store", "damage"),
    [("postgres", "undecodable"), ("postgres", "wrong shape"), ("cosmos", "undecodable")],
    indirect=["own_store"],
)
async def test_a_damaged_shard_pauses_retention_until_the_repair_command_rebuilds_it(
    own_store: dict[str, str], damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(own_store) as runtime:
        stalled = case_in_shard("repair-stalled", INDEX_IDS[3])
        at_rest = case_in_shard("repair-rest", INDEX_IDS[3])
        elsewhere = case_in_shard("repair-other", INDEX_IDS[5])
        for case_id in (stalled, at_rest, elsewhere):
            await stale_case(runtime, case_id)
        # Rested since (completed): the repair must not index it again.
        await runtime.service._tracker.mark(at_rest, CaseStatus.COMPLETED)
        shard = shard_of(stalled)
        listed = await runtime.backends.cold.get(shard)
        assert listed is not None
        await runtime.backends.cold.update_section(
            shard, "cases", DAMAGES[damage], expected_version=listed.version, agent_id="test"
        )

        with caplog.at_level(logging.INFO):
            first = await run_tick(runtime.service, meters=quiet_meters())
        assert first.damaged == [shard] and shard in first.failed
        assert first.swept is None, "swept without the whole index"
        assert first.resumed == [elsewhere]
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any(f"run index shard {shard} is damaged" in line for line in logged), logged
        assert any(f"run index shards damaged: {shard}" in line for line in logged), logged
        health = await runtime.service.health()
        assert health.status == "degraded" and health.damaged_index_shards == [shard]

        printed = await asyncio.to_thread(repair, own_store)
        assert f"{shard}: damaged (CorruptState" in printed
        assert f"rebuilt with 1 cases: {stalled}" in printed
        assert at_rest not in printed
        assert f"{INDEX_IDS[5]}: readable; 0 missing cases indexed" in printed
        # Idempotent: a second run finds the shard readable, with nothing missing.
        again = await asyncio.to_thread(repair, own_store, "3")
        assert again.strip() == f"{shard}: readable; 0 missing cases indexed"

        second = await run_tick(runtime.service, meters=quiet_meters())
        assert second.damaged == [] and second.failed == {}
        # Health tells what the last look at every shard found (within a minute).
        assert (await runtime.service.health()).damaged_index_shards == []
        assert second.resumed == [stalled]
        assert second.swept is not None, "retention still paused"
        await runtime.service.wait_idle()
        assert (await runtime.service.status(stalled)).status is CaseStatus.COMPLETED


@pytest.mark.parametrize("own_store", ["postgres"], indirect=True)
async def test_a_shard_of_a_newer_schema_is_reported_damaged_and_not_rewritten(
    own_store: dict[str, str],
) -> None:
    """Written by newer code (an app downgraded): no tick reads it, and the repair refuses
    to overwrite it, saying to upgrade the app instead."""
    async with opened(own_store) as runtime:
        stalled = case_in_shard("repair-newer", INDEX_IDS[2])
        await stale_case(runtime, stalled)
        shard = shard_of(stalled)
        async with await psycopg.AsyncConnection.connect(
            own_store["POSTGRES_URL"], autocommit=True
        ) as conn:
            await conn.execute(
                "UPDATE workflow_records SET schema_version = 99 WHERE thread_id = %s", (shard,)
            )

        tick = await run_tick(runtime.service, meters=quiet_meters())
        assert tick.damaged == [shard] and "UnsupportedSchemaVersion" in tick.failed[shard]
        assert tick.swept is None
        assert (await runtime.service.health()).damaged_index_shards == [shard]

        result = await asyncio.to_thread(
            CliRunner().invoke, app, ["run-index", "repair", shard], env=own_store
        )
        assert result.exit_code == 1 and "Upgrade the application" in result.output
        with pytest.raises(UnsupportedSchemaVersion):
            await runtime.backends.cold.get(shard)  # left as it was


@pytest.mark.parametrize("own_store", ["postgres", "cosmos"], indirect=True)
async def test_a_shard_another_repair_rebuilt_meanwhile_is_merged_into_not_overwritten(
    own_store: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two repairs at once (two operators, or one run again): the one that found the shard
    damaged, then reads its version after the other rebuilt it and a submit indexed a case
    there, must not overwrite that case's entry with its own list."""
    async with opened(own_store) as runtime:
        stalled = case_in_shard("repair-race", INDEX_IDS[4])
        await stale_case(runtime, stalled)
        shard = shard_of(stalled)
        cold = runtime.backends.cold
        listed = await cold.get(shard)
        assert listed is not None
        await cold.update_section(
            shard, "cases", DAMAGES["wrong shape"], expected_version=listed.version, agent_id="t"
        )
        tracker = runtime.service._tracker
        submitted = case_in_shard("repair-submitted", shard)
        real_get = cold.get
        reads = 0

        async def get(thread_id: str) -> Any:
            nonlocal reads
            if thread_id == shard:
                reads += 1
                if reads == 2:
                    # The repair found the shard damaged (read 1) and now reads its version:
                    # the other repair rebuilt it meanwhile, and a submit indexed a case.
                    await tracker.repair_index(cold, [shard])
                    await tracker.register(submitted)
            return await real_get(thread_id)

        monkeypatch.setattr(cold, "get", get)
        await tracker.repair_index(cold, [shard])
        assert reads >= 2, "the race was not staged"
        assert set(await tracker.active_cases()) >= {stalled, submitted}


@pytest.mark.parametrize("own_store", ["postgres"], indirect=True)
async def test_every_shard_of_a_newer_schema_is_reported_damaged_not_a_tier_down(
    own_store: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """An app downgraded after newer code wrote every shard: no shard reads, yet the tier is
    up; the tick says the shards are damaged (with the repair's hint), not that the index
    is out of reach."""
    async with opened(own_store) as runtime:
        for shard in INDEX_IDS:
            await runtime.store.create(shard, {"cases": {}}, agent_id="test")
        async with await psycopg.AsyncConnection.connect(
            own_store["POSTGRES_URL"], autocommit=True
        ) as conn:
            await conn.execute(
                "UPDATE workflow_records SET schema_version = 99 WHERE thread_id = ANY(%s)",
                (list(INDEX_IDS),),
            )

        with caplog.at_level(logging.INFO):
            tick = await run_tick(runtime.service, meters=quiet_meters())
        assert tick.damaged == list(INDEX_IDS) and tick.swept is None
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("run index shards damaged" in line for line in logged), logged
        assert (await runtime.service.health()).damaged_index_shards == list(INDEX_IDS)


@pytest.mark.parametrize("own_store", ["postgres"], indirect=True)
async def test_a_shard_out_of_reach_is_not_learnt_undamaged(
    own_store: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged shard whose read fails for another reason (a timeout) is unknown, not
    repaired: neither health's own look nor a tick's makes health drop it for a minute."""
    async with opened(own_store) as runtime:
        stalled = case_in_shard("repair-reach", INDEX_IDS[6])
        await stale_case(runtime, stalled)
        shard = shard_of(stalled)
        listed = await runtime.backends.cold.get(shard)
        assert listed is not None
        await runtime.backends.cold.update_section(
            shard, "cases", DAMAGES["wrong shape"], expected_version=listed.version, agent_id="t"
        )
        store = runtime.service._tracker._store
        real_get_fresh = store.get_fresh

        async def cut(thread_id: str, **kwargs: Any) -> Any:
            if thread_id == shard:
                raise BackendUnavailable("postgres", "no answer (test)")
            return await real_get_fresh(thread_id, **kwargs)

        monkeypatch.setattr(store, "get_fresh", cut)
        assert (await runtime.service.health()).damaged_index_shards == []  # not known
        monkeypatch.setattr(store, "get_fresh", real_get_fresh)
        assert (await runtime.service.health()).damaged_index_shards == [shard]

        monkeypatch.setattr(store, "get_fresh", cut)
        tick = await run_tick(runtime.service, meters=quiet_meters())
        assert shard in tick.failed and tick.damaged == []
        monkeypatch.setattr(store, "get_fresh", real_get_fresh)
        assert (await runtime.service.health()).damaged_index_shards == [shard]


@pytest.mark.parametrize("own_store", ["postgres"], indirect=True)
async def test_requests_needing_a_damaged_shard_answer_503_naming_the_repair(
    own_store: dict[str, str], issue_token: Callable[..., str]
) -> None:
    """A submit, a follow-up, a review decision and a resume of a case in a damaged shard
    each need the case indexed: each answers 503 with Retry-After, naming the repair (not a
    bare 500), writing nothing; once repaired, the decision goes through."""
    headers = {"Authorization": f"Bearer {issue_token()}"}
    # Not the submitter: a case's submitter does not review it.
    reviewer = {"Authorization": f"Bearer {issue_token('damaged-reviewer')}"}
    async with opened(own_store) as runtime:
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://f.test") as http:
            reviewed = case_in_shard("damaged-review", INDEX_IDS[1])
            body = submission(reviewed, amount=750.0).model_dump(mode="json")
            created = await http.post("/api/cases", json=body, headers=headers)
            assert created.json()["status"] == "awaiting_review", created.text
            stalled = case_in_shard("damaged-stalled", INDEX_IDS[1])
            await stale_case(runtime, stalled)
            shard = shard_of(reviewed)
            cold = runtime.backends.cold
            listed = await cold.get(shard)
            assert listed is not None
            await cold.update_section(
                shard,
                "cases",
                DAMAGES["wrong shape"],
                expected_version=listed.version,
                agent_id="t",
            )
            before = {case_id: await cold.get(case_id) for case_id in (reviewed, stalled)}

            new_case = case_in_shard("damaged-new", INDEX_IDS[1])
            answers = {
                "submit": await http.post(
                    "/api/cases",
                    json=submission(new_case).model_dump(mode="json"),
                    headers=headers,
                ),
                "follow-up": await http.post(
                    f"/api/cases/{reviewed}/messages",
                    json={"text": "any news?", "strategy": "enqueue"},
                    headers=headers,
                ),
                "decision": await http.post(
                    f"/api/cases/{reviewed}/review", json={"decision": "approve"}, headers=reviewer
                ),
                "resume": await http.post(f"/api/cases/{stalled}/resume", headers=headers),
            }
            for request, answer in answers.items():
                assert answer.status_code == 503, (request, answer.text)
                assert answer.headers.get("Retry-After"), request
                said = answer.json()["error"]
                assert f"case index ({shard}) is damaged" in said, (request, said)
                assert "agent-state run-index repair" in said, (request, said)
            assert await cold.get(new_case) is None, "created without its index entry"
            for case_id, record in before.items():
                after = await cold.get(case_id)
                assert after is not None and record is not None
                assert after.version == record.version, f"{case_id} written"

            await asyncio.to_thread(repair, own_store, shard)
            decided = await http.post(
                f"/api/cases/{reviewed}/review", json={"decision": "approve"}, headers=reviewer
            )
            assert decided.status_code in (200, 202), decided.text


@pytest.mark.parametrize("own_store", ["postgres"], indirect=True)
async def test_the_repair_command_says_a_shard_rebuilt_meanwhile_was_merged_into(
    own_store: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of the test above, through the command: it did not rebuild the shard, so it
    says it merged into another repair's rebuild, not that it rebuilt it."""
    async with opened(own_store) as runtime:
        stalled = case_in_shard("repair-said", INDEX_IDS[4])
        await stale_case(runtime, stalled)
        shard = shard_of(stalled)
        await damage(runtime, shard)
        submitted = case_in_shard("repair-said-submitted", shard)
        reads = 0

        async def race(backends: Backends, thread_id: str, real_get: Callable[[str], Any]) -> Any:
            nonlocal reads
            if thread_id == shard:
                reads += 1
                if reads == 2:
                    other = RunTracker(
                        TieredStateStore.from_backends(backends),
                        backends.retention,
                        settings_of(own_store),
                    )
                    await other.repair_index(backends.cold, [shard])
                    await other.register(submitted)
            return await real_get(thread_id)

        staged(monkeypatch, race)
        printed = await asyncio.to_thread(repair, own_store, shard)
        assert reads >= 2, "the race was not staged"
        assert "rebuilt with" not in printed, printed
        assert f"{shard}: damaged (CorruptState" in printed, printed
        assert "rebuilt meanwhile by another repair, merged into" in printed, printed
        tracker = runtime.service._tracker
        assert set(await tracker.active_cases()) >= {stalled, submitted}


@pytest.mark.parametrize("own_store", ["postgres"], indirect=True)
async def test_the_repair_goes_on_past_a_failing_shard_or_case_and_exits_1(
    own_store: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard of a newer schema, a shard out of reach mid-run and a case whose record
    cannot be read (an offloaded section lost) each fail alone: the command repairs the
    other shards and cases, says what failed for each, and exits 1."""
    async with opened(own_store) as runtime:
        newer = case_in_shard("repair-go-newer", INDEX_IDS[2])
        unreached = case_in_shard("repair-go-unreached", INDEX_IDS[3])
        repaired = case_in_shard("repair-go-repaired", INDEX_IDS[5])
        lost = case_in_shard("repair-go-lost", INDEX_IDS[5])
        for case_id in (newer, unreached, repaired, lost):
            await stale_case(runtime, case_id)
        for case_id in (newer, unreached, repaired):
            await damage(runtime, shard_of(case_id))
        async with await psycopg.AsyncConnection.connect(
            own_store["POSTGRES_URL"], autocommit=True
        ) as conn:
            await conn.execute(
                "UPDATE workflow_records SET schema_version = 99 WHERE thread_id = %s",
                (shard_of(newer),),
            )

        async def faults(backends: Backends, thread_id: str, real_get: Callable[[str], Any]) -> Any:
            if thread_id == shard_of(unreached):
                raise BackendUnavailable("postgres", "no answer (test)")
            if thread_id == lost:
                raise WorkflowNotFound(lost)  # its offloaded section lost
            return await real_get(thread_id)

        staged(monkeypatch, faults)
        result = await asyncio.to_thread(
            CliRunner().invoke, app, ["run-index", "repair"], env=own_store
        )
        said = result.output
        assert result.exit_code == 1, said
        assert f"{shard_of(newer)}: not repaired: UnsupportedSchemaVersion" in said, said
        assert "Upgrade the application" in said, said
        assert f"{shard_of(unreached)}: not repaired: BackendUnavailable" in said, said
        assert f"case {lost} not looked at" in said and "WorkflowNotFound" in said, said
        assert f"{shard_of(repaired)}: damaged (CorruptState" in said, said
        assert f"rebuilt with 1 cases: {repaired}" in said, said
        assert f"{INDEX_IDS[7]}: readable; 0 missing cases indexed" in said, said
        tick = await run_tick(runtime.service, meters=quiet_meters())
        assert tick.damaged == [shard_of(newer), shard_of(unreached)]


@pytest.mark.parametrize("own_store", ["postgres"], indirect=True)
async def test_a_shard_damaged_past_its_sections_is_reported_alone_and_the_others_resumed(
    own_store: dict[str, str],
) -> None:
    """A shard whose stored document is not a record's shape (its sections not an object,
    as written by hand) is one damaged shard: the tick still resumes the other shards'
    cases, rather than failing its whole listing on an untyped error."""
    async with opened(own_store) as runtime:
        elsewhere = case_in_shard("repair-shape-other", INDEX_IDS[5])
        await stale_case(runtime, elsewhere)
        shard = INDEX_IDS[3]
        await runtime.store.create(shard, {"cases": {}}, agent_id="test")
        async with await psycopg.AsyncConnection.connect(
            own_store["POSTGRES_URL"], autocommit=True
        ) as conn:
            await conn.execute(
                "UPDATE workflow_records SET sections = '[]'::jsonb WHERE thread_id = %s",
                (shard,),
            )

        tick = await run_tick(runtime.service, meters=quiet_meters())
        assert tick.damaged == [shard] and "CorruptState" in tick.failed[shard]
        assert tick.resumed == [elsewhere]


@pytest.mark.parametrize("own_store", ["postgres"], indirect=True)
async def test_a_shard_whose_compressed_cases_are_not_json_is_damaged_and_repaired(
    own_store: dict[str, str],
) -> None:
    """A compressed section that decompresses, to the length it claims, into bytes that are
    not JSON: as damaged as one that does not decompress (CorruptState), so the tick
    reports that shard alone and resumes the others, health names it, and the repair
    rebuilds it; not a bare JSONDecodeError failing the whole listing."""
    async with opened(own_store) as runtime:
        stalled = case_in_shard("repair-json", INDEX_IDS[3])
        elsewhere = case_in_shard("repair-json-other", INDEX_IDS[5])
        for case_id in (stalled, elsewhere):
            await stale_case(runtime, case_id)
        shard = shard_of(stalled)
        listed = await runtime.backends.cold.get(shard)
        assert listed is not None
        raw = b"not json"
        envelope = {
            COMPRESSED_KEY: {
                "codec": "zlib",
                "bytes": len(raw),
                "data": base64.b64encode(zlib.compress(raw)).decode(),
            }
        }
        await runtime.backends.cold.update_section(
            shard, "cases", envelope, expected_version=listed.version, agent_id="t"
        )

        tick = await run_tick(runtime.service, meters=quiet_meters())
        assert tick.damaged == [shard] and "CorruptState" in tick.failed[shard], tick
        assert tick.resumed == [elsewhere]
        health = await runtime.service.health()
        assert health.status == "degraded" and health.damaged_index_shards == [shard]

        printed = await asyncio.to_thread(repair, own_store, "3")
        assert f"{shard}: damaged (CorruptState" in printed, printed
        assert f"rebuilt with 1 cases: {stalled}" in printed, printed


@pytest.mark.parametrize("own_store", ["postgres"], indirect=True)
async def test_a_case_record_not_of_a_case_shape_is_reported_and_the_shard_still_rebuilt(
    own_store: dict[str, str],
) -> None:
    """A case record whose runs are not a list of runs (written by hand): one case the
    repair could not read, said with why, and its shard rebuilt from the other cases; not
    an untyped error ending the command before any shard is repaired."""
    async with opened(own_store) as runtime:
        stalled = case_in_shard("repair-case-shape", INDEX_IDS[3])
        mangled = case_in_shard("repair-case-mangled", INDEX_IDS[3])
        for case_id in (stalled, mangled):
            await stale_case(runtime, case_id)
        record = await runtime.backends.cold.get(mangled)
        assert record is not None
        await runtime.backends.cold.update_section(
            mangled, "runs", ["not a run"], expected_version=record.version, agent_id="t"
        )
        await damage(runtime, shard_of(stalled))

        result = await asyncio.to_thread(
            CliRunner().invoke, app, ["run-index", "repair", "3"], env=own_store
        )
        said = result.output
        # Exit 1 said by the command (typer.Exit), not an exception escaping it.
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (
            said,
            result.exception,
        )
        assert f"case {mangled} not looked at" in said and "CorruptState" in said, said
        assert f"rebuilt with 1 cases: {stalled}" in said, said


@pytest.mark.parametrize("own_store", ["postgres", "cosmos"], indirect=True)
async def test_a_shard_whose_sections_are_not_an_object_is_rebuilt_by_the_repair_command(
    own_store: dict[str, str],
) -> None:
    """The damage the tick and health report with the repair command to run (a stored
    document not of a record's shape): the command rebuilds the shard from the case
    records, so the next tick resumes its case and sweeps again."""
    async with opened(own_store) as runtime:
        stalled = case_in_shard("repair-unshaped", INDEX_IDS[3])
        elsewhere = case_in_shard("repair-unshaped-other", INDEX_IDS[5])
        for case_id in (stalled, elsewhere):
            await stale_case(runtime, case_id)
        shard = shard_of(stalled)
        await unshape(own_store, shard)
        tick = await run_tick(runtime.service, meters=quiet_meters())
        assert tick.damaged == [shard] and "CorruptState" in tick.failed[shard], tick

        printed = await asyncio.to_thread(repair, own_store, shard)
        assert f"{shard}: damaged (CorruptState" in printed, printed
        assert f"rebuilt with 1 cases: {stalled}" in printed, printed
        record = await runtime.store.get(shard)  # through the hot tier too
        assert record is not None and list(record.sections["cases"]) == [stalled]
        trail = await runtime.backends.cold.audit_trail(shard, limit=1)
        assert (trail[0].before, trail[0].version) == ([], record.version)

        second = await run_tick(runtime.service, meters=quiet_meters())
        assert second.damaged == [] and second.failed == {}, second
        assert second.resumed == [stalled] and second.swept is not None
        await runtime.service.wait_idle()
        assert (await runtime.service.status(stalled)).status is CaseStatus.COMPLETED


@pytest.mark.parametrize("own_store", ["postgres", "cosmos"], indirect=True)
async def test_a_repair_of_an_unshaped_shard_raced_by_another_loses_no_entry(
    own_store: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the repair's last look at the unshaped shard (and its version) and its
    write, another repair rebuilds the shard and a submit indexes a case there: the
    repair's write, conditioned on the version it read, is refused, and it merges into
    the rebuilt shard instead of overwriting the submit's entry."""
    async with opened(own_store) as runtime:
        stalled = case_in_shard("repair-unshaped-race", INDEX_IDS[4])
        await stale_case(runtime, stalled)
        shard = shard_of(stalled)
        await unshape(own_store, shard)
        submitted = case_in_shard("repair-unshaped-submitted", shard)
        looks = 0

        async def race(backends: Backends, thread_id: str, real_get: Callable[[str], Any]) -> Any:
            nonlocal looks
            if thread_id != shard:
                return await real_get(thread_id)
            looks += 1
            try:
                return await real_get(thread_id)
            finally:
                if looks == 2:
                    # The repair's second look found the shard damaged still (after its
                    # version read): now, before its write, the other repair and a submit.
                    other = RunTracker(
                        TieredStateStore.from_backends(backends),
                        backends.retention,
                        settings_of(own_store),
                    )
                    await other.repair_index(backends.cold, [shard])
                    await other.register(submitted)

        staged(monkeypatch, race)
        printed = await asyncio.to_thread(repair, own_store, shard)
        assert looks >= 3, f"the race was not staged: {looks} looks"
        assert "rebuilt meanwhile by another repair, merged into" in printed, printed
        assert set(await runtime.service._tracker.active_cases()) == {stalled, submitted}


PROGRESS = re.compile(r"read (\d+) of (\d+) records: (\d+) cases with work found, (\d+) unreadable")


def progress_of(stderr: str) -> list[tuple[int, ...]]:
    """The repair's progress lines as (read, of, found, unreadable); any other line fails."""
    matches = [PROGRESS.fullmatch(line) for line in stderr.splitlines()]
    assert all(matches), stderr
    return [tuple(int(number) for number in match.groups()) for match in matches if match]


@pytest.mark.parametrize("own_store", ["postgres"], indirect=True)
async def test_the_repair_says_how_far_it_read_on_stderr_and_its_result_is_unchanged(
    own_store: dict[str, str],
) -> None:
    """Found by review: it printed nothing until it had read every record, so a large store
    looked hung. Progress goes to stderr (here after every record), the result to stdout."""
    async with opened(own_store) as runtime:
        stalled = [case_in_shard("repair-progress", INDEX_IDS[3]) for _ in range(3)]
        for case_id in stalled:
            await stale_case(runtime, case_id)
        await damage(runtime, INDEX_IDS[3])

        def run(*options: str) -> Result:
            return CliRunner().invoke(app, ["run-index", "repair", *options], env=own_store)

        first = await asyncio.to_thread(run, "--progress-every", "0")
        assert first.exit_code == 0, first.output
        progress = progress_of(first.stderr)
        total = progress[-1][1]  # the cases and the shard records
        assert total > len(stalled) and {line[1] for line in progress} == {total}, progress
        assert [line[0] for line in progress] == list(range(1, total + 1)), progress
        assert progress[-1][2:] == (len(stalled), 0), progress
        assert f"{INDEX_IDS[3]}: damaged (CorruptState" in first.stdout, first.stdout
        assert f"rebuilt with 3 cases: {', '.join(sorted(stalled))}" in first.stdout
        assert "records:" not in first.stdout, first.stdout

        # The default interval (5 s) passes no line on so small a store; stdout is the same.
        quiet = await asyncio.to_thread(run)
        reported = await asyncio.to_thread(run, "--progress-every", "0")
        assert quiet.exit_code == reported.exit_code == 0, quiet.output + reported.output
        assert quiet.stderr == "" and len(progress_of(reported.stderr)) == total
        assert quiet.stdout == reported.stdout, (quiet.stdout, reported.stdout)
