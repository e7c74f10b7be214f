"""Side effects at most once when attempts of one case race, die or lose their reply mid-call."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from e2e_payloads import duplicate_charges

from state import WorkflowRecord
from support_cases.agents.base import AgentDeps, Step
from support_cases.agents.refund import RefundAgent
from support_cases.demo import demo_case
from support_cases.effects import (
    EffectInProgress,
    Effects,
    ProviderTimeout,
    effect_key,
    effects_since,
    now_iso,
)
from support_cases.models import CaseStatus, CaseSubmission
from support_cases.runtime import Runtime
from support_cases.settings import AppSettings
from tests.support.effects import provider_calls


async def test_two_unlocked_attempts_call_the_provider_once(runtime: Runtime) -> None:
    case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
    await runtime.store.create(case_id, {}, agent_id="test")
    effects = Effects(runtime.store, runtime.provider, lease_seconds=30, call_timeout_seconds=30)

    outcomes = await asyncio.gather(
        *(
            effects.once(case_id, "refund", {"amount": 10}, agent_id="refund-agent")
            for _ in range(4)
        ),
        return_exceptions=True,
    )

    performed = await runtime.provider.performed(f"{case_id}:refund")
    assert len(performed) == 1
    winners = [o for o in outcomes if isinstance(o, dict)]
    assert winners and all(w["reference"] == performed[0]["reference"] for w in winners)
    assert all(isinstance(o, EffectInProgress) for o in outcomes if not isinstance(o, dict))
    # Once done, every later attempt gets the recorded result and calls nothing.
    again = await effects.once(case_id, "refund", {"amount": 10}, agent_id="refund-agent")
    assert again["reference"] == performed[0]["reference"]
    assert len(await runtime.provider.performed(f"{case_id}:refund")) == 1


async def test_an_expired_claim_is_taken_over_without_performing_twice(runtime: Runtime) -> None:
    case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
    key = f"{case_id}:refund"
    await runtime.store.create(case_id, {}, agent_id="test")
    # A crashed attempt: it claimed, reached the provider, and died before recording done.
    await runtime.store.update_section(
        case_id,
        "effect_refund",
        {
            "kind": "refund",
            "idempotency_key": key,
            "status": "pending",
            "claim": "dead",
            "lease_until": 0,
            "request": {"amount": 10},
        },
        agent_id="refund-agent",
    )
    reached = await runtime.provider.perform(key, "refund", {"amount": 10})

    result = await Effects(
        runtime.store, runtime.provider, lease_seconds=30, call_timeout_seconds=30
    ).once(case_id, "refund", {"amount": 10}, agent_id="refund-agent")

    assert result["reference"] == reached["reference"]
    assert len(await runtime.provider.performed(key)) == 1


async def test_a_live_claim_of_another_attempt_is_respected(runtime: Runtime) -> None:
    case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
    await runtime.store.create(case_id, {}, agent_id="test")
    live = {
        "kind": "refund",
        "idempotency_key": f"{case_id}:refund",
        "status": "pending",
        "claim": "other",
        "lease_until": 4102444800,
        "request": {"amount": 10},
    }
    await runtime.store.update_section(case_id, "effect_refund", live, agent_id="refund-agent")

    with pytest.raises(EffectInProgress):
        await Effects(
            runtime.store, runtime.provider, lease_seconds=30, call_timeout_seconds=30
        ).once(case_id, "refund", {"amount": 10}, agent_id="refund-agent")
    assert await runtime.provider.performed(f"{case_id}:refund") == []


async def test_a_claim_this_process_left_pending_is_taken_over_before_its_lease_ends(
    runtime: Runtime,
) -> None:
    """A run called out, then failed before its `done` landed (its section write hit a
    tier's blip): the claim stays pending under a 30 s lease. The same process resuming
    the case takes it over at once (it knows no call of its own is on its way); another
    process still waits for the lease (found by a network-cut test: 25 s waits)."""
    case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
    key = f"{case_id}:refund"
    await runtime.store.create(case_id, {}, agent_id="test")
    effects = Effects(runtime.store, runtime.provider, lease_seconds=30, call_timeout_seconds=30)
    never_written: list[Any] = []
    paid = await effects.once(
        case_id, "refund", {"amount": 10}, agent_id="refund-agent", done_with=never_written
    )

    with pytest.raises(EffectInProgress):
        await Effects(
            runtime.store, runtime.provider, lease_seconds=30, call_timeout_seconds=30
        ).once(case_id, "refund", {"amount": 10}, agent_id="refund-agent")
    again = await effects.once(case_id, "refund", {"amount": 10}, agent_id="refund-agent")

    assert again["reference"] == paid["reference"]
    assert len(await runtime.provider.performed(key)) == 1
    record = await runtime.store.get(case_id)
    assert record is not None and record.sections["effect_refund"]["status"] == "done"


class HeldProvider:
    """The runtime's provider, its `perform` held until released."""

    def __init__(self, provider: Any) -> None:
        self._provider = provider
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def lookup(self, key: str) -> dict[str, Any] | None:
        return await self._provider.lookup(key)  # type: ignore[no-any-return]

    async def perform(self, key: str, kind: str, request: dict[str, Any]) -> dict[str, Any]:
        self.entered.set()
        await self.release.wait()
        return await self._provider.perform(key, kind, request)  # type: ignore[no-any-return]


async def test_a_claim_whose_call_is_on_its_way_is_respected_in_its_own_process(
    runtime: Runtime,
) -> None:
    case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
    await runtime.store.create(case_id, {}, agent_id="test")
    provider = HeldProvider(runtime.provider)
    effects = Effects(runtime.store, provider, lease_seconds=30, call_timeout_seconds=30)
    first = asyncio.create_task(
        effects.once(case_id, "refund", {"amount": 10}, agent_id="refund-agent")
    )
    await provider.entered.wait()
    with pytest.raises(EffectInProgress):
        await effects.once(case_id, "refund", {"amount": 10}, agent_id="refund-agent")
    # Cancelled mid-call (its request may still reach the provider): the lease holds.
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    provider.release.set()  # a takeover now would perform at once
    with pytest.raises(EffectInProgress):
        await effects.once(case_id, "refund", {"amount": 10}, agent_id="refund-agent")
    assert await runtime.provider.performed(f"{case_id}:refund") == []


def dead_refund_claim(key: str) -> dict[str, Any]:
    """A refund claim an attempt that died left pending, its lease over."""
    return {
        "kind": "refund",
        "idempotency_key": key,
        "status": "pending",
        "claim": "dead",
        "lease_until": 0,
        "request": {"amount": 900.0, "currency": "EUR"},
    }


@pytest.mark.parametrize("decision", ["reject", "no_refund"])
async def test_a_refund_not_approved_this_time_reports_one_an_earlier_run_issued(
    runtime: Runtime, decision: str
) -> None:
    """The earlier run (rolled back, or dead) paid the refund and never recorded it done:
    its claim is pending. Whatever this run decides, the money went out, and the case
    says so, with what was paid (found by review)."""
    case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
    key = f"{case_id}:refund"
    await runtime.store.create(case_id, {}, agent_id="test")
    claim = dead_refund_claim(key)
    await runtime.store.update_section(case_id, "effect_refund", claim, agent_id="refund-agent")
    paid = await runtime.provider.perform(key, "refund", claim["request"])
    effects = Effects(runtime.store, runtime.provider, lease_seconds=30, call_timeout_seconds=30)
    agent = RefundAgent(AgentDeps(runtime.store, effects, runtime.settings))
    policy = {"decision": "no_refund" if decision == "no_refund" else "needs_review"}
    state: Any = {
        "case_id": case_id,
        "billing": {"currency": "EUR", "duplicates": []},
        "policy": {**policy, "refund_amount": 612.40},
        "review": {"decision": "reject"},
    }
    step = Step(None)
    result = await agent.decide(state, step)
    assert result == {
        "status": "issued",
        "amount": 900.0,
        "currency": "EUR",
        "reference": paid["reference"],
    }
    assert len(await runtime.provider.performed(key)) == 1
    # Recorded done with the step's own section, as a takeover would: later runs need not ask.
    [recorded] = step.effects_done
    assert recorded.section == "effect_refund" and recorded.value["status"] == "done"
    assert recorded.value["result"] == paid


async def test_a_refund_not_approved_waits_for_a_call_on_its_way(runtime: Runtime) -> None:
    """An earlier attempt's refund call is on its way (its run lost the case mid-call, and
    its request may still reach the gateway): a run that decides no refund must not read
    the provider's silence as "never paid" and record it refused while the money goes out.
    It waits, as a takeover of the claim does (found by the effects fault hunt)."""
    case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
    key = f"{case_id}:refund"
    await runtime.store.create(case_id, {}, agent_id="test")
    provider = HeldProvider(runtime.provider)
    first = asyncio.create_task(
        Effects(runtime.store, provider, lease_seconds=30, call_timeout_seconds=30).once(
            case_id, "refund", {"amount": 900.0, "currency": "EUR"}, agent_id="refund-agent"
        )
    )
    await provider.entered.wait()
    # Another process's run, after a rollback and a rejection: it decides no refund.
    effects = Effects(runtime.store, runtime.provider, lease_seconds=30, call_timeout_seconds=30)
    agent = RefundAgent(AgentDeps(runtime.store, effects, runtime.settings))
    state: Any = {
        "case_id": case_id,
        "billing": {"currency": "EUR", "duplicates": []},
        "policy": {"decision": "needs_review", "refund_amount": 900.0},
        "review": {"decision": "reject"},
    }
    step = Step(None)
    try:
        with pytest.raises(EffectInProgress):
            await agent.decide(state, step)
    finally:
        provider.release.set()
        paid = await first
    assert step.effects_done == []
    # Once the call has landed, the refund is reported issued, with what was paid.
    result = await agent.decide(state, step)
    assert result["status"] == "issued" and result["reference"] == paid["reference"]
    assert len(await runtime.provider.performed(key)) == 1


async def test_a_call_longer_than_the_lease_keeps_its_claim_once_cancelled(
    runtime: Runtime,
) -> None:
    """A provider call outlives the claim's lease (a slow gateway), then its run loses the
    case and is cancelled mid-call: its request may still reach the provider, so the
    lease must run from about then, not from the claim made long before. Otherwise the
    next runner takes the claim over at once, finds no trace yet, and pays a second time
    (found by the effects fault hunt)."""
    case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
    await runtime.store.create(case_id, {}, agent_id="test")
    provider = HeldProvider(runtime.provider)
    lease = 3.0
    first = asyncio.create_task(
        Effects(runtime.store, provider, lease_seconds=lease, call_timeout_seconds=30).once(
            case_id, "refund", {"amount": 10}, agent_id="refund-agent"
        )
    )
    await provider.entered.wait()
    record = await runtime.store.get(case_id)
    assert record is not None
    claimed_until = record.sections["effect_refund"]["lease_until"]
    # The call is still on its way when the lease taken with the claim ends.
    await asyncio.sleep(claimed_until - time.time() + 0.1)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    provider.release.set()

    with pytest.raises(EffectInProgress):
        await Effects(
            runtime.store, runtime.provider, lease_seconds=lease, call_timeout_seconds=30
        ).once(case_id, "refund", {"amount": 10}, agent_id="refund-agent")
    assert await runtime.provider.performed(f"{case_id}:refund") == []


async def test_a_resume_that_meets_a_leased_claim_waits_it_out_and_completes(
    runtime: Runtime, e2e_settings: Callable[..., AppSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refund reached the provider but its reply was lost: the run failed with the
    claim leased (the call may still land). The client resumes at once. The resume must
    wait out the lease (the case is this run's) and go on, not stop and answer the case
    running with nobody on it until the timer finds it stalled (found by the effects fault
    hunt: five minutes at the default stale period)."""
    backend = runtime.settings.state_cold_backend.value
    own = await Runtime.open(e2e_settings(backend, state_lock_ttl_ms=3_000))
    try:
        perform = own.provider.perform
        lost: list[dict[str, Any]] = []

        async def reply_lost(key: str, kind: str, request: dict[str, Any]) -> dict[str, Any]:
            done = await perform(key, kind, request)
            if kind == "refund" and not lost:
                lost.append(done)
                raise ConnectionError("the provider's reply was lost")
            return done

        monkeypatch.setattr(own.provider, "perform", reply_lost)
        case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
        submission = CaseSubmission(
            case_id=case_id,
            customer_id="cust-fx",
            text="I was charged twice for my subscription",
            transactions=duplicate_charges(42.0),
        )
        failed = await own.service.submit(submission, None)
        assert failed.view.status is CaseStatus.FAILED, failed.view
        assert lost

        resumed = await own.service.resume(case_id, wait_until_rest=True)
        await own.service.wait_idle()

        case = await own.service.status(case_id)
        assert case.status is CaseStatus.COMPLETED, (resumed.view.status, case)
        assert case.refund is not None and case.refund["reference"] == lost[0]["reference"]
        assert len(await provider_calls(own, case_id, "refund")) == 1
    finally:
        await own.service.wait_idle()
        await own.close()


async def test_a_case_id_reused_after_retention_gets_its_own_idempotency_keys(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """Retention swept a completed case and a new case came under the same id: its effects
    must reach the provider under other keys, or a deduplicating gateway answers the new
    customer's refund with the old payment and pays nothing (found by the effects hunt)."""
    first = await client.post("/api/cases", json=demo_case(case_id))
    assert first.status_code == 201 and first.json()["status"] == "completed", first.text
    old_keys = {view["kind"]: view["idempotency_key"] for view in first.json()["effects"]}
    # What a retention sweep deletes of a case: its record and checkpoints, cold and hot.
    await runtime.saver.adelete_thread(case_id)
    await runtime.backends.cold.delete(case_id)
    assert runtime.backends.hot is not None
    await runtime.backends.hot.invalidate(case_id)
    assert await runtime.store.get_fresh(case_id) is None

    second = await client.post("/api/cases", json=demo_case(case_id))
    assert second.status_code == 201 and second.json()["status"] == "completed", second.text
    new_keys = {view["kind"]: view["idempotency_key"] for view in second.json()["effects"]}
    assert old_keys.keys() == new_keys.keys() == {"refund", "reset_link"}
    for kind in ("refund", "reset_link"):
        assert old_keys[kind] != new_keys[kind], kind
        old = await runtime.provider.performed(old_keys[kind])
        new = await runtime.provider.performed(new_keys[kind])
        assert len(old) == len(new) == 1, kind
        assert old[0]["reference"] != new[0]["reference"]
    assert new_keys["refund"] == effect_key(not_none(await runtime.store.get(case_id)), "refund")


def not_none(record: WorkflowRecord | None) -> WorkflowRecord:
    assert record is not None
    return record


async def test_every_attempt_of_a_case_uses_its_idempotency_key(runtime: Runtime) -> None:
    """A retry (a takeover of the pending claim) and the refund step's check both ask the
    provider under the key the first attempt called out with."""
    case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
    await runtime.store.create(case_id, {"request": {"incarnation": "first"}}, agent_id="test")
    effects = Effects(runtime.store, runtime.provider, lease_seconds=30, call_timeout_seconds=30)
    never_written: list[Any] = []
    paid = await effects.once(
        case_id, "refund", {"amount": 10}, agent_id="refund-agent", done_with=never_written
    )
    key = f"{case_id}:refund:first"
    assert [call["reference"] for call in await runtime.provider.performed(key)] == [
        paid["reference"]
    ]
    # The refund step of a run that decided no refund finds it, under the same key.
    found = await effects.performed(case_id, "refund", agent_id="refund-agent", done_with=[])
    assert found is not None and found[1]["reference"] == paid["reference"]
    # A retry takes the claim over, asks by the same key and calls nothing.
    again = await effects.once(case_id, "refund", {"amount": 10}, agent_id="refund-agent")
    assert again["reference"] == paid["reference"]
    assert len(await runtime.provider.performed(key)) == 1
    record = not_none(await runtime.store.get_fresh(case_id))
    assert record.sections["effect_refund"]["idempotency_key"] == key


class LostReplyProvider(HeldProvider):
    """The runtime's provider: `perform` acts, then its reply never comes until released."""

    async def perform(self, key: str, kind: str, request: dict[str, Any]) -> dict[str, Any]:
        done: dict[str, Any] = await self._provider.perform(key, kind, request)
        self.entered.set()
        await self.release.wait()
        return done


async def test_a_provider_call_that_never_answers_is_abandoned_and_settled_by_key(
    runtime: Runtime,
) -> None:
    """A call that never returns held the case and its claim for ever. Past the timeout it
    is abandoned, the claim stays pending (the call went through), and the attempt after
    the claim's lease finds it by key instead of paying again (found by the effects hunt)."""
    case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
    key = f"{case_id}:refund"
    await runtime.store.create(case_id, {}, agent_id="test")
    provider = LostReplyProvider(runtime.provider)
    effects = Effects(runtime.store, provider, lease_seconds=30, call_timeout_seconds=0.5)
    try:
        # Bounded here too: without a timeout of its own the call would wait for ever.
        with pytest.raises(ProviderTimeout):
            await asyncio.wait_for(
                effects.once(case_id, "refund", {"amount": 10}, agent_id="refund-agent"), 10
            )
    finally:
        provider.release.set()
    assert provider.entered.is_set()
    claim = not_none(await runtime.store.get_fresh(case_id)).sections["effect_refund"]
    assert claim["status"] == "pending"
    # Its call may still be on its way: the lease holds, in this process too.
    with pytest.raises(EffectInProgress):
        await effects.once(case_id, "refund", {"amount": 10}, agent_id="refund-agent")
    # Once the lease has ended, the next attempt asks the provider by key.
    await runtime.store.update_section(
        case_id, "effect_refund", {**claim, "lease_until": 0}, agent_id="refund-agent"
    )
    settled = await Effects(
        runtime.store, runtime.provider, lease_seconds=30, call_timeout_seconds=30
    ).once(case_id, "refund", {"amount": 10}, agent_id="refund-agent")
    paid = await runtime.provider.performed(key)
    assert len(paid) == 1 and settled["reference"] == paid[0]["reference"]


async def test_a_rolled_back_run_lists_a_claim_whose_call_may_have_gone_through(
    runtime: Runtime,
) -> None:
    """A run cut off mid-call (stopped, its reply lost) leaves its claim pending: the call
    may have moved money. Its rollback's `discarded_effects` listed only `done` effects,
    so the operator never heard of it (found by the effects hunt)."""
    case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
    await runtime.store.create(case_id, {}, agent_id="test")
    effects = Effects(runtime.store, runtime.provider, lease_seconds=30, call_timeout_seconds=30)
    # Done before the run started: not the run's.
    await effects.once(case_id, "reset_link", {"issue": "locked"}, agent_id="account-agent")
    started_at = now_iso()
    provider = LostReplyProvider(runtime.provider)
    call = asyncio.create_task(
        Effects(runtime.store, provider, lease_seconds=30, call_timeout_seconds=30).once(
            case_id, "refund", {"amount": 10}, agent_id="refund-agent"
        )
    )
    await provider.entered.wait()
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call

    record = not_none(await runtime.store.get_fresh(case_id))
    listed = effects_since(record, started_at)
    [paid] = await runtime.provider.performed(f"{case_id}:refund")
    assert [(view.kind, view.status, view.idempotency_key) for view in listed] == [
        ("refund", "pending", paid["idempotency_key"])
    ]


async def test_a_stale_hot_copy_does_not_hide_a_refund_another_worker_paid(
    runtime: Runtime,
) -> None:
    """Another worker, cut off from Redis, claimed the refund in the cold tier and paid it,
    then died. This worker's Redis still holds the record from before the claim: read
    through it, the refund step saw no claim, said "never paid" and reported the refund
    refused while the money had gone out (found by the effects hunt)."""
    case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
    key = f"{case_id}:refund"
    created = await runtime.store.create(case_id, {}, agent_id="test")
    claim = dead_refund_claim(key)
    # Past the hot tier, as a worker that could not reach Redis writes.
    await runtime.backends.cold.update_section(
        case_id,
        "effect_refund",
        claim,
        expected_version=created.version,
        agent_id="refund-agent",
    )
    paid = await runtime.provider.perform(key, "refund", claim["request"])
    stale = await runtime.store.get(case_id)
    assert stale is not None and "effect_refund" not in stale.sections  # the hot copy lags

    effects = Effects(runtime.store, runtime.provider, lease_seconds=30, call_timeout_seconds=30)
    found = await effects.performed(case_id, "refund", agent_id="refund-agent", done_with=[])
    assert found is not None and found[1]["reference"] == paid["reference"]
