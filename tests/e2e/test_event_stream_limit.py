"""A worker serves a bounded number of event streams: one more is a 503 with Retry-After,
and a stream that ended makes room again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx

from support_cases.api import create_app
from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from support_cases.settings import AppSettings


@asynccontextmanager
async def case_streams(
    e2e_settings: Callable[..., AppSettings], bearer: Callable[..., dict[str, str]], case_id: str
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client of an app serving at most 2 event streams, the case submitted: the client
    and the case's events path."""
    runtime = await Runtime.open(e2e_settings("postgres", case_max_event_streams=2))
    try:
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://streams.test", headers=bearer("streamer")
        ) as client:
            assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
            yield client, f"/api/cases/{case_id}/events"
    finally:
        await runtime.close()


async def test_one_stream_past_the_maximum_is_503_and_an_ended_one_makes_room(
    e2e_settings: Callable[..., AppSettings],
    bearer: Callable[..., dict[str, str]],
    case_id: str,
) -> None:
    async with case_streams(e2e_settings, bearer, case_id) as (client, events):
        long_ones = [
            asyncio.create_task(client.get(events, params={"seconds": 3})) for _ in range(2)
        ]
        await asyncio.sleep(0.5)  # both are open
        refused = await client.get(events, params={"seconds": 0})
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "5"
        assert "CASE_MAX_EVENT_STREAMS" in refused.json()["error"]
        assert [answer.status_code for answer in await asyncio.gather(*long_ones)] == [200, 200]
        served = await client.get(events, params={"seconds": 0})
        assert served.status_code == 200 and "run_completed" in served.text


async def test_a_burst_of_streams_opened_at_once_is_held_to_the_maximum(
    e2e_settings: Callable[..., AppSettings],
    bearer: Callable[..., dict[str, str]],
    case_id: str,
) -> None:
    """Requests arriving together all passed a bound checked before their streams started
    (each then waited on its first read): the slot is taken before that wait."""
    async with case_streams(e2e_settings, bearer, case_id) as (client, events):
        # Open long enough that all six have asked before the first two end (a slot free
        # again would rightly let one more in).
        answers = await asyncio.gather(
            *(client.get(events, params={"seconds": 3}) for _ in range(6))
        )
        assert sorted(answer.status_code for answer in answers) == [200, 200, 503, 503, 503, 503]
        # Every slot was given back: streams ended, and the refused never held one.
        again = await asyncio.gather(*(client.get(events, params={"seconds": 0}) for _ in range(2)))
        assert [answer.status_code for answer in again] == [200, 200]
