"""The Cosmos connection refuses a container it cannot use, typed, before any request.

A deployment names its database and container (`COSMOS_DATABASE`, `COSMOS_CONTAINER`)
and does not create them (`COSMOS_CREATE_IF_MISSING` is off in Azure). Misnamed,
Cosmos answers every point read 404, which the adapters take for "no such thread":
cases read as absent while writes failed with the SDK's own error.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from azure.core.pipeline.transport import AsyncHttpResponse, HttpRequest

from state.cold.cosmos_client import CosmosConnection, EnvironmentProxyTransport
from state.errors import RequestRejected
from state.factory import open_backends
from state.settings import Settings
from support_cases.api import create_app
from support_cases.runtime import RuntimeHolder
from support_cases.settings import AppSettings


def missing_values(
    env_for: Callable[..., dict[str, str]], missing: str, name: str
) -> dict[str, str]:
    values = {key.lower(): value for key, value in env_for("cosmos", redis_url=None).items()}
    return values | {"cosmos_create_if_missing": "false", f"cosmos_{missing}": name}


@pytest.mark.parametrize("missing", ["container", "database"])
async def test_a_missing_container_is_refused_not_read_as_empty(
    missing: str, env_for: Callable[..., dict[str, str]]
) -> None:
    name = f"missing-{uuid.uuid4().hex[:8]}"
    settings = Settings.model_validate(missing_values(env_for, missing, name))
    for _ in range(2):  # every open: a failed one keeps nothing
        with pytest.raises(
            RequestRejected, match=f"{missing} '{name}'.* does not exist"
        ) as refused:
            await open_backends(settings)
        assert refused.value.code == 404


async def test_the_api_names_the_missing_container_in_its_log_only(
    env_for: Callable[..., dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    name = f"missing-{uuid.uuid4().hex[:8]}"
    values = missing_values(env_for, "container", name) | {"auth_disabled": "true"}
    app = create_app(holder=RuntimeHolder(lambda: AppSettings.model_validate(values)))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        with caplog.at_level(logging.WARNING):
            answer = await client.get("/api/cases/case_8842")
    assert answer.status_code == 500
    assert answer.json()["error"].startswith("cosmos refused the request (incident ")
    assert name not in answer.text
    assert f"container '{name}' of database" in caplog.text


class CreatingTogether(EnvironmentProxyTransport):
    """Holds each create of a database (POST .../dbs) or of a container (POST .../colls)
    until the other connection sends its own: two workers that both found it missing."""

    def __init__(self, together: dict[str, asyncio.Barrier], kind: str) -> None:
        super().__init__()
        self._together = together
        self._kind = kind

    async def send(self, request: HttpRequest, **config: Any) -> AsyncHttpResponse:
        path = request.url.split("?", 1)[0].rstrip("/")
        if request.method.upper() == "POST" and path.endswith(f"/{self._kind}"):
            await self._together[self._kind].wait()
        response: AsyncHttpResponse = await super().send(request, **config)
        return response


@pytest.mark.parametrize("kind", ["dbs", "colls"])
async def test_two_workers_creating_the_same_database_or_container_both_start(
    kind: str, env_for: Callable[..., dict[str, str]]
) -> None:
    """Two workers start at once on an account without the database (or the container)
    and COSMOS_CREATE_IF_MISSING on: both read 404, both create, one is answered 409.
    That one must take what the other created, not fail its start with the SDK's error."""
    values = {key.lower(): value for key, value in env_for("cosmos", redis_url=None).items()}
    names = {"cosmos_database": f"race-{uuid.uuid4().hex[:8]}", "cosmos_container": "state"}
    settings = Settings.model_validate(values | names)
    if kind == "colls":  # the database exists: only the container's creation races
        other = Settings.model_validate(values | names | {"cosmos_container": "other"})
        setup = CosmosConnection(other.cosmos)
        await setup.container()
        await setup.close()
    together = {kind: asyncio.Barrier(2)}
    connections = [
        CosmosConnection(settings.cosmos, transport=CreatingTogether(together, kind))
        for _ in range(2)
    ]
    try:
        containers = await asyncio.gather(*(c.container() for c in connections))
        for connection, container in zip(connections, containers, strict=True):
            async with connection.bounded():
                await container.upsert_item({"id": "probe", "thread_id": "probe"})
                assert (await container.read_item("probe", "probe"))["id"] == "probe"
    finally:
        for connection in connections:
            await connection.close()
