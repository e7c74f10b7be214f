"""An API worker process for bench_cases.py: the app's own factory, plus request counting.

`uvicorn cases_worker:create_app --factory` serves exactly the app `support_cases.api`
builds, and adds `GET /bench/counts` (behind the same token check) answering what this
process sent to its stores since it started:

- Cosmos: HTTP requests at the azure-core transport, by kind (read, query, create,
  replace, upsert, patch, delete, meta) with the bytes each write sent;
- Postgres: statements at the psycopg cursor (a pipelined batch counts each one);
- Redis: round trips at the client (a command, a script call, a pipeline).

Requests made while the simulated payment/mail provider records a call are counted
apart (`provider`): that ledger stands for an external system, not for the case's state.
"""

from __future__ import annotations

import json
from collections import Counter
from contextvars import ContextVar
from typing import Any

import psycopg
import redis.asyncio as aioredis
from azure.core.pipeline.transport import AioHttpTransport
from fastapi import FastAPI
from redis.asyncio.client import Pipeline

from state.hot import redis_client
from support_cases.api import create_app as app_factory
from support_cases.effects import SimulatedProvider

_PROVIDER: ContextVar[bool] = ContextVar("bench_provider", default=False)
COUNTS: Counter[str] = Counter()


def _bucket(name: str) -> str:
    return f"provider.{name}" if _PROVIDER.get() else name


def cosmos_kind(request: Any) -> str:
    """What one Cosmos REST request does, from its method, path and headers."""
    headers = {key.lower(): str(value).lower() for key, value in request.headers.items()}
    if "/docs" not in request.url:
        return "meta"  # database / container metadata
    if request.method == "GET":
        return "read"
    if request.method == "POST":
        if headers.get("x-ms-documentdb-isquery") == "true":
            return "query"
        if headers.get("x-ms-documentdb-is-upsert") == "true":
            return "upsert"
        if headers.get("x-ms-cosmos-is-batch-request") == "true":
            return "batch"
        return "create"
    return {"PUT": "replace", "PATCH": "patch", "DELETE": "delete"}.get(request.method, "other")


def install() -> None:
    aio_send = AioHttpTransport.send

    async def counted_send(transport: Any, request: Any, **kwargs: Any) -> Any:
        kind = cosmos_kind(request)
        COUNTS[_bucket(f"cosmos.{kind}")] += 1
        body = request.body if request.body is not None else request.data
        if kind in ("create", "replace", "upsert", "patch", "batch") and body is not None:
            COUNTS[_bucket("cosmos.bytes_written")] += len(body)
        if kind == "batch" and body is not None:
            COUNTS[_bucket("cosmos.batch_operations")] += len(json.loads(body))
        return await aio_send(transport, request, **kwargs)

    AioHttpTransport.send = counted_send  # type: ignore[method-assign]

    for owner, name in (
        (aioredis.Redis, "execute_command"),
        (Pipeline, "execute"),
        (Pipeline, "immediate_execute_command"),
    ):
        original = owner.__dict__[name]

        def wrap(original: Any) -> Any:
            async def counted(client: Any, *args: Any, **kwargs: Any) -> Any:
                COUNTS[_bucket("redis.round_trips")] += 1
                return await original(client, *args, **kwargs)

            return counted

        setattr(owner, name, wrap(original))
    # The hot path's lean round trips, which bypass both.
    redis_client.round_trip = wrap(redis_client.round_trip)  # type: ignore[assignment]

    for name in ("execute", "executemany"):
        original = psycopg.AsyncCursor.__dict__[name]

        def wrap_pg(original: Any) -> Any:
            async def counted(cursor: Any, *args: Any, **kwargs: Any) -> Any:
                COUNTS[_bucket("postgres.statements")] += 1
                return await original(cursor, *args, **kwargs)

            return counted

        setattr(psycopg.AsyncCursor, name, wrap_pg(original))

    for name in ("perform", "lookup"):
        original = SimulatedProvider.__dict__[name]

        def wrap_provider(original: Any) -> Any:
            async def apart(provider: Any, *args: Any, **kwargs: Any) -> Any:
                token = _PROVIDER.set(True)
                try:
                    return await original(provider, *args, **kwargs)
                finally:
                    _PROVIDER.reset(token)

            return apart

        setattr(SimulatedProvider, name, wrap_provider(original))


def create_app() -> FastAPI:
    install()
    app = app_factory()

    async def counts() -> dict[str, int]:
        return dict(COUNTS)

    app.add_api_route("/bench/counts", counts, methods=["GET"])
    return app
