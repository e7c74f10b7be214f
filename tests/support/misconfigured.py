"""The API started as a worker starts it, from this environment's settings, whatever they
hold: for tests of what a misconfigured app answers (no store is reached)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from support_cases.api import create_app
from support_cases.runtime import RuntimeHolder
from support_cases.settings import AppSettings


@asynccontextmanager
async def api_from_environment() -> AsyncIterator[httpx.AsyncClient]:
    """A client of the API, its lifespan running; the settings are read as a worker reads
    them, at its first request."""
    app = create_app(holder=RuntimeHolder(AppSettings))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://u.test") as client,
    ):
        yield client
