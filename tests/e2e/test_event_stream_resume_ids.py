"""A stream resumes only after an id it can resume from: a Last-Event-ID past every id the
case's log gave out (another case's newer one, a forged one) would wait for ids that come
only once the clock passes it, serving nothing until then (422 instead); one whose
successors were trimmed would skip them (410 instead)."""

from __future__ import annotations

import httpx
import pytest

from state.factory import EVENTS_PER_THREAD
from support_cases.demo import demo_case
from support_cases.runtime import Runtime


@pytest.mark.parametrize("sent_as", ["header", "query"])
async def test_an_id_past_the_cases_newest_event_is_refused(
    client: httpx.AsyncClient, case_id: str, sent_as: str
) -> None:
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    events = f"/api/cases/{case_id}/events"
    other = f"{case_id}-other"
    assert (await client.post("/api/cases", json=demo_case(other))).status_code == 201
    others = await client.get(f"/api/cases/{other}/events", params={"seconds": 0})
    foreign = [line[4:] for line in others.text.splitlines() if line.startswith("id: ")][-1]

    # More refusals than one caller's streams (10): a refused stream gives its slot back.
    for past in (foreign, "9999999999999-0", "9999999999999999999-9999999999999999999") * 4:
        if sent_as == "header":
            answer = await client.get(
                events, params={"seconds": 0}, headers={"Last-Event-ID": past}
            )
        else:
            answer = await client.get(events, params={"seconds": 0, "after": past})
        assert answer.status_code == 422, (past, answer.status_code, answer.text)
        assert past in answer.json()["error"]

    # The case's own newest id still resumes (nothing after it yet).
    own = await client.get(events, params={"seconds": 0})
    newest = [line[4:] for line in own.text.splitlines() if line.startswith("id: ")][-1]
    resumed = await client.get(events, params={"seconds": 0}, headers={"Last-Event-ID": newest})
    assert resumed.status_code == 200 and "id: " not in resumed.text


async def test_an_id_whose_successors_were_trimmed_is_gone(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """A case's log keeps its newest events: a client resuming after one no longer kept,
    once newer ones were dropped too, would get the kept ones as if nothing were missing.
    It is told instead (410), and how to go on."""
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    events = f"/api/cases/{case_id}/events"
    seen = await client.get(events, params={"seconds": 0})
    first = next(line[4:] for line in seen.text.splitlines() if line.startswith("id: "))
    log = runtime.backends.events
    assert log is not None
    for n in range(EVENTS_PER_THREAD + 150):
        await log.append(case_id, {"event": "filler", "n": n})

    answer = await client.get(events, params={"seconds": 0}, headers={"Last-Event-ID": first})
    assert answer.status_code == 410, (answer.status_code, answer.text[:300])
    assert first in answer.json()["error"]
    # From the oldest kept, asked for: the stream serves it.
    from_oldest = await client.get(events, params={"seconds": 0, "after": "0"})
    assert from_oldest.status_code == 200 and "event: filler" in from_oldest.text
