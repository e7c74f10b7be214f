"""A real API process (uvicorn running the app's own factory) on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from devstack import free_port
from devstack.issuer import request_token
from support_cases.runtime import Runtime

REPO_ROOT = Path(__file__).resolve().parents[2]


def app_env(runtime: Runtime, stack_env: dict[str, str]) -> dict[str, str]:
    """The environment of an API process configured like `runtime` (same tiers)."""
    assert runtime.settings.redis_url is not None
    return {
        **stack_env,
        "REDIS_URL": runtime.settings.redis_url.get_secret_value(),
        "STATE_COLD_BACKEND": runtime.settings.state_cold_backend.value,
        "COSMOS_CREATE_IF_MISSING": "true",
        # Short enough that a dead process's lock and heartbeat expire within a test.
        "STATE_LOCK_TTL_MS": "1500",
        "CASE_STALE_AFTER_SECONDS": "2",
        "CASE_SYNC_WAIT_SECONDS": "1",
    }


async def wait_for(check: Callable[[], Any], what: str, log: Path, within: float = 60.0) -> Any:
    """Poll `check` (async) until it returns something truthy; fail with the server log."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            result = await check()
        except httpx.TransportError:
            result = None
        if result:
            return result
        await asyncio.sleep(0.2)
    tail = await asyncio.to_thread(log.read_text)
    raise AssertionError(f"timed out waiting for {what}; server log:\n{tail[-3000:]}")


APP_FACTORY = "support_cases.api:create_app"


def start_uvicorn(
    env: dict[str, str], log: Path, port: int, factory: str = APP_FACTORY
) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                factory,
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env={**os.environ, **env},
            cwd=REPO_ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@asynccontextmanager
async def api_process(
    env: dict[str, str], log: Path, factory: str = APP_FACTORY
) -> AsyncIterator[tuple[subprocess.Popen[bytes], httpx.AsyncClient]]:
    """Start the API (`factory`: the app's own), wait until /api/health answers, stop it
    (by its pid) afterwards.

    The client calls as "e2e-client" with every role, its token from the stack's issuer.
    """
    port = free_port()
    token = await asyncio.to_thread(request_token, env["AUTH_ISSUER"], "e2e-client")
    process = start_uvicorn(env, log, port, factory)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            timeout=30,
            headers={"Authorization": f"Bearer {token}"},
        ) as client:

            async def healthy() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"the API exited with {process.returncode}")
                return (await client.get("/api/health")).status_code == 200

            await wait_for(healthy, "the API to start", log)
            yield process, client
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                await asyncio.to_thread(process.wait, 5)
