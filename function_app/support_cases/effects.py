"""Side effects (refund issued, reset link sent) at most once per case, even when a step re-runs.

Protocol, per idempotency key `<case_id>:<kind>:<incarnation>` (the incarnation: drawn when
the case was created, so a case id reused after retention swept the old case is a new key
to a deduplicating provider; every attempt of one case reads it from the case record):
1. the case record already says `done` -> return what was recorded, call nothing;
2. otherwise claim the key durably before calling out: a versioned write of a
   `pending` claim carrying this attempt's token and a lease. Only the attempt whose
   write installed its token may call out; another attempt that finds a live lease
   stops with `EffectInProgress` (two runners of one case never both call out), and
   a lease left by a crashed attempt may be taken over once it has expired;
3. a `pending` claim taken over means a previous attempt may have reached the
   provider, so ask the provider by key first and perform only if it has no trace
   (a first claim has no earlier attempt to ask about: it performs directly);
4. record `done` with the provider's answer: in a write of its own, or handed to the
   caller (`done_with`) to go in the caller's next record write (an agent's section),
   which saves a record write per effect. Until either lands, the claim stays
   `pending`: a crash in between is step 3's case.
A claim this process made is taken over before its lease ends by a later attempt in
this process once the attempt that made it has no provider call on its way (it
returned, or failed before or after calling out): a run that failed on a tier's blip
after calling out resumes at once instead of waiting out the lease. An attempt
cancelled mid-call keeps its lease (its request may still reach the provider): renewed
while the call is on its way, it runs from about the cancellation, however long the
call took. So does an attempt whose call outlived its timeout: abandoned, it may still
have reached the provider, and the attempt after the lease asks by key. Another process
always waits for the lease.
The claim write goes through the run's fencing token, so a runner that lost its
lock cannot claim either.
The provider here is simulated: it keeps its own durable ledger of every call it
honoured, so tests can count what really happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any, Protocol

from state import SectionWrite, StateError, TieredStateStore, WorkflowExists, WorkflowRecord

from .models import EffectView
from .records import UNCHANGED, set_section, write_section
from .telemetry import traced

log = logging.getLogger(__name__)

EFFECT_SECTION_PREFIX = "effect_"
# Renewals of a claim's lease per lease while its provider call is on its way: one may be
# late or fail and the next still lands before the lease ends.
CLAIM_RENEWALS_PER_LEASE = 3
# Claims of this process whose attempt has no provider call on its way, remembered for
# takeover (the oldest forgotten first: their leases have long ended).
SETTLED_CLAIMS_REMEMBERED = 10_000


# The case record's section holding the submission, and its field naming the case's
# incarnation (set when the case is created).
REQUEST_SECTION = "request"
INCARNATION_FIELD = "incarnation"


def idempotency_key(case_id: str, kind: str, incarnation: str | None = None) -> str:
    # A case created before incarnations existed keeps the key its attempts already used.
    return f"{case_id}:{kind}" if incarnation is None else f"{case_id}:{kind}:{incarnation}"


def effect_key(record: WorkflowRecord, kind: str) -> str:
    """The idempotency key of the case's effect of `kind`: the same for every attempt of this
    case, another for a case created later under the same id."""
    request = record.sections.get(REQUEST_SECTION)
    incarnation = request.get(INCARNATION_FIELD) if isinstance(request, dict) else None
    return idempotency_key(record.thread_id, kind, incarnation)


def effect_section(kind: str) -> str:
    return f"{EFFECT_SECTION_PREFIX}{kind}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


class EffectInProgress(Exception):
    """Another attempt holds a live claim on this side effect; this attempt must not call out."""

    def __init__(self, key: str, *, lease_until: float) -> None:
        super().__init__(f"side effect {key!r} is being performed by another attempt")
        self.key = key
        # When the claim's lease ends (epoch seconds): a later attempt may take it over then.
        self.lease_until = lease_until


class ProviderTimeout(Exception):
    """A provider call outlived its timeout and was abandoned: it may or may not have acted.
    The claim stays pending, for the attempt after its lease to ask the provider by key."""

    def __init__(self, key: str, *, timeout: float) -> None:
        super().__init__(f"side effect {key!r}: no answer from the provider within {timeout:g} s")
        self.key = key


class EffectProvider(Protocol):
    """An external system that acts on a request and can be asked what it did for a key."""

    async def lookup(self, key: str) -> dict[str, Any] | None: ...

    async def perform(self, key: str, kind: str, request: dict[str, Any]) -> dict[str, Any]: ...


class SimulatedProvider:
    """A stand-in payment gateway and mail sender with its own durable ledger.

    Unlike a real gateway it does not deduplicate by key: every `perform` acts
    and is recorded, so a caller that performed twice shows up as two entries.
    """

    LEDGER_PREFIX = "sim-provider-"
    AGENT_ID = "simulated-provider"

    def __init__(self, store: TieredStateStore) -> None:
        self._store = store

    @classmethod
    def ledger_id(cls, key: str) -> str:
        return f"{cls.LEDGER_PREFIX}{key.replace(':', '-')}"

    async def performed(self, key: str) -> list[dict[str, Any]]:
        # The cold tier's: a stale hot copy without the call would read "never performed",
        # and a caller deciding on it would pay twice.
        record = await self._store.get_fresh(self.ledger_id(key))
        return list(record.sections.get("performed", [])) if record else []

    async def lookup(self, key: str) -> dict[str, Any] | None:
        done = await self.performed(key)
        return done[-1] if done else None

    async def perform(self, key: str, kind: str, request: dict[str, Any]) -> dict[str, Any]:
        ledger = self.ledger_id(key)
        entry = {
            "reference": f"{kind.upper()}-{uuid.uuid4().hex[:10]}",
            "kind": kind,
            "idempotency_key": key,
            "request": request,
            "at": now_iso(),
        }

        def append(record: WorkflowRecord) -> object:
            return [*record.sections.get("performed", []), entry]

        with traced("provider.perform", kind=kind, idempotency_key=key):
            try:
                # The first call for a key (the usual case) is one write.
                await self._store.create(ledger, {"performed": [entry]}, agent_id=self.AGENT_ID)
            except WorkflowExists:
                await write_section(
                    self._store, ledger, "performed", append, agent_id=self.AGENT_ID
                )
        return entry


class Effects:
    """Runs side effects at most once per (case, kind), recorded in the case's own record."""

    def __init__(
        self,
        store: TieredStateStore,
        provider: EffectProvider,
        *,
        lease_seconds: float,
        call_timeout_seconds: float,
    ) -> None:
        self._store = store
        self._provider = provider
        self._lease_seconds = lease_seconds
        self._call_timeout = call_timeout_seconds
        self._settled_claims: OrderedDict[str, None] = OrderedDict()

    def _settle(self, token: str) -> None:
        self._settled_claims[token] = None
        while len(self._settled_claims) > SETTLED_CLAIMS_REMEMBERED:
            self._settled_claims.popitem(last=False)

    async def once(
        self,
        case_id: str,
        kind: str,
        request: dict[str, Any],
        *,
        agent_id: str,
        fencing_token: int | None = None,
        done_with: list[SectionWrite] | None = None,
    ) -> dict[str, Any]:
        """The effect's result, performed at most once. `done_with`: where to put the `done`
        entry for the caller to write (with its own section); without it, written here."""
        section = effect_section(kind)
        with traced("effect.once", kind=kind) as span:
            token = uuid.uuid4().hex
            claim: dict[str, Any] = {}

            # Whether this attempt takes over a claim an earlier attempt left pending.
            took_over = False

            def claim_unless_held(record: WorkflowRecord) -> object:
                nonlocal took_over, claim
                entry = record.sections.get(section)
                took_over = entry is not None and entry.get("status") == "pending"
                if entry is not None:
                    if entry.get("status") == "done":
                        return UNCHANGED
                    live = (entry.get("lease_until") or 0) > time.time()
                    claimant = entry.get("claim")
                    mine = claimant == token or claimant in self._settled_claims
                    if live and not mine:
                        return UNCHANGED
                claim = {
                    "kind": kind,
                    # A claim taken over keeps its key: the provider knows the call by it.
                    "idempotency_key": (entry or {}).get("idempotency_key")
                    or effect_key(record, kind),
                    "status": "pending",
                    "request": request,
                    "claim": token,
                    # A rolled-back run lists the claims it made (`effects_since`).
                    "claimed_at": now_iso(),
                }
                return {**claim, "lease_until": time.time() + self._lease_seconds}

            calling_out = False
            try:
                record = await write_section(
                    self._store,
                    case_id,
                    section,
                    claim_unless_held,
                    agent_id=agent_id,
                    fencing_token=fencing_token,
                )
                entry: dict[str, Any] = record.sections[section]
                key = str(entry["idempotency_key"])
                span.set_attribute("idempotency_key", key)
                if entry.get("status") == "done":
                    span.set_attribute("outcome", "already-done")
                    return dict(entry["result"])
                if entry.get("claim") != token:
                    span.set_attribute("outcome", "in-progress-elsewhere")
                    raise EffectInProgress(key, lease_until=entry.get("lease_until") or 0.0)
                # Only a pending claim taken over means an earlier attempt may have reached
                # the provider; a first claim has nothing to ask about.
                result = await self._provider.lookup(key) if took_over else None
                span.set_attribute("outcome", "recovered" if result else "performed")
                if result is None:
                    calling_out = True
                    result = await self._perform_leased(
                        case_id,
                        kind,
                        key,
                        request,
                        token,
                        agent_id=agent_id,
                        fencing_token=fencing_token,
                    )
                    calling_out = False
                done = done_entry(claim, result)
                if done_with is not None:
                    done_with.append(SectionWrite(section, done, agent_id))
                    return result
                await set_section(
                    self._store,
                    case_id,
                    section,
                    done,
                    agent_id=agent_id,
                    fencing_token=fencing_token,
                    current=record,
                )
                return result
            finally:
                # A perform that raised or was cancelled may still reach the provider.
                if not calling_out:
                    self._settle(token)

    async def _perform_leased(
        self,
        case_id: str,
        kind: str,
        key: str,
        request: dict[str, Any],
        token: str,
        *,
        agent_id: str,
        fencing_token: int | None,
    ) -> dict[str, Any]:
        """The provider call, the claim's lease renewed while it is on its way: an attempt
        cancelled mid-call or past its timeout (its request may still reach the provider)
        leaves a lease that runs from about then, not from a claim a slow call may have
        outlived."""
        renewing = asyncio.create_task(
            self._renew_claim(
                case_id, effect_section(kind), token, agent_id=agent_id, fencing_token=fencing_token
            )
        )
        try:
            async with asyncio.timeout(self._call_timeout):
                return await self._provider.perform(key, kind, request)
        except TimeoutError:
            raise ProviderTimeout(key, timeout=self._call_timeout) from None
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing

    async def _renew_claim(
        self, case_id: str, section: str, token: str, *, agent_id: str, fencing_token: int | None
    ) -> None:
        def extend(record: WorkflowRecord) -> object:
            entry = record.sections.get(section) or {}
            if entry.get("claim") != token or entry.get("status") != "pending":
                return UNCHANGED
            return {**entry, "lease_until": time.time() + self._lease_seconds}

        while True:
            await asyncio.sleep(self._lease_seconds / CLAIM_RENEWALS_PER_LEASE)
            try:
                await write_section(
                    self._store,
                    case_id,
                    section,
                    extend,
                    agent_id=agent_id,
                    fencing_token=fencing_token,
                )
            except StateError as error:
                # The lease from the last renewal still holds; the next one may land.
                log.warning("effect %s of case %s: lease not renewed: %s", section, case_id, error)

    async def performed(
        self, case_id: str, kind: str, *, agent_id: str, done_with: list[SectionWrite]
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The request and result of the case's effect of `kind` if it was performed:
        recorded `done`, or claimed by an attempt that may have reached the provider before
        it died (asked by key, as `once` does when it takes a claim over; what the provider
        answers goes into `done_with`, recorded `done` with the caller's section).
        Raises `EffectInProgress` while another attempt's claim is live."""
        # The cold tier's: a stale hot copy without the claim would say "never performed".
        record = await self._store.get_fresh(case_id)
        section = effect_section(kind)
        entry = None if record is None else record.sections.get(section)
        if entry is None:
            return None
        if entry.get("status") == "done":
            return dict(entry["request"]), dict(entry["result"])
        key = str(entry["idempotency_key"])
        # A live claim of another attempt may have its call on its way: the provider's
        # silence does not mean "never performed" until its lease ends, as for `once`.
        lease_until = entry.get("lease_until") or 0.0
        if lease_until > time.time() and entry.get("claim") not in self._settled_claims:
            raise EffectInProgress(key, lease_until=lease_until)
        result = await self._provider.lookup(key)
        if result is None:
            return None
        done = done_entry(entry, result)
        done_with.append(SectionWrite(section, done, agent_id))
        return dict(entry["request"]), result


def done_entry(claim: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The ledger entry of a claimed effect the provider performed, stamped now (a rolled-back
    run reports the effects done since it started)."""
    return {**claim, "status": "done", "result": result, "lease_until": None, "done_at": now_iso()}


def effects_since(record: WorkflowRecord, since: str | None) -> list[EffectView]:
    """The effects of a case done, or claimed and still `pending` (the call may have reached
    the provider), at or after `since` (ISO time): a rolled-back run's."""
    if since is None:
        return []
    views = []
    for view in effects_in(record):
        entry = record.sections[effect_section(view.kind)]
        if view.status == "pending":
            # A claim from before claims carried their time may be this run's: listed.
            at = entry.get("claimed_at") or since
        else:
            at = entry.get("done_at") or ""
        if str(at) >= since:
            views.append(view)
    return views


def effects_in(record: WorkflowRecord) -> list[EffectView]:
    """The effect ledger entries of a case record, for status views."""
    views = []
    for name, entry in sorted(record.sections.items()):
        if name.startswith(EFFECT_SECTION_PREFIX) and isinstance(entry, dict):
            views.append(
                EffectView(
                    kind=str(entry.get("kind")),
                    idempotency_key=str(entry.get("idempotency_key")),
                    status=str(entry.get("status")),
                    result=entry.get("result"),
                )
            )
    return views
