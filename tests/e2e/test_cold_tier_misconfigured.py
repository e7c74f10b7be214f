"""An API process whose settings pass validation at start, yet whose cold tier cannot be
used as they say (no credential to sign in with, a container that does not exist): every
request says so, typed, and /api/health reports the tier down with a 503. Never a bare
500, whatever the endpoint. A hot tier that cannot sign in is reported down, the cold tier
serving meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from api_server import start_uvicorn, wait_for

from devstack import free_port
from devstack.issuer import ROLES, request_token
from support_cases.demo import demo_case


@asynccontextmanager
async def started(env: dict[str, str], log: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The API process, once it answers anything at all (its tiers are opened on first
    use, so it starts whatever they are); stopped by its pid afterwards."""
    port = free_port()
    token = await asyncio.to_thread(request_token, env["AUTH_ISSUER"], "e2e-client", list(ROLES))
    process: subprocess.Popen[bytes] = start_uvicorn(env, log, port)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            timeout=30,
            headers={"Authorization": f"Bearer {token}"},
        ) as client:

            async def answering() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"the API exited with {process.returncode}")
                await client.get("/api/openapi.json")
                return True

            await wait_for(answering, "the API to start", log)
            yield client
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                await asyncio.to_thread(process.wait, 5)


async def every_endpoint(client: httpx.AsyncClient, case_id: str) -> list[httpx.Response]:
    return [
        await client.post("/api/cases", json=demo_case(case_id)),
        await client.get(f"/api/cases/{case_id}"),
        await client.get(f"/api/cases/{case_id}/events"),
        await client.post(f"/api/cases/{case_id}/review", json={"decision": "approve"}),
    ]


async def health_down(client: httpx.AsyncClient, backend: str = "cosmos") -> dict[str, object]:
    """The health report, down with a 503 (the first may be down for the open's time, not
    its outcome: the report waits for the open only so long)."""

    async def reported() -> dict[str, object] | None:
        answer = await client.get("/api/health")
        assert answer.status_code == 503, answer.text
        [tier] = answer.json()["tiers"]
        assert (tier["name"], tier["up"]) == (backend, False), tier
        return None if "no answer within" in tier["detail"] else tier

    tier: dict[str, object] = await wait_for(reported, "the open's outcome", Path(os.devnull))
    anonymous = await client.get("/api/health", headers={"Authorization": ""})
    assert anonymous.status_code == 503, anonymous.text
    assert anonymous.json()["status"] == "down"
    return tier


async def test_cosmos_without_a_key_nor_an_identity_answers_503_not_a_bare_500(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """No token could be had: the SDK's ClientAuthenticationError went unmapped, every
    request a bare 500 (health included) with the credential chain's story in the log."""
    env = {
        **stack_env,
        # No Entra identity to be found either: the credential chain narrowed to the Azure
        # CLI, signed in nowhere (a developer's own `az login` would sign the process in).
        "AZURE_TOKEN_CREDENTIALS": "AzureCliCredential",
        "AZURE_CONFIG_DIR": str(tmp_path / "az"),
        "STATE_COLD_BACKEND": "cosmos",
        "COSMOS_KEY": "",
        "COSMOS_CREATE_IF_MISSING": "true",
    }
    async with started(env, tmp_path / "api.log") as client:
        tier = await health_down(client)
        assert "BackendUnavailable" in str(tier["detail"]), tier
        assert "no access token" in str(tier["detail"]), tier
        for answer in await every_endpoint(client, "case-e2e-no-credential"):
            assert answer.status_code == 503, (answer.request.url, answer.text)
            assert answer.json()["error"].startswith("cosmos unavailable, retry later")


async def test_health_of_cosmos_whose_container_does_not_exist_is_down_not_a_500(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """A database name that is not the account's (COSMOS_CREATE_IF_MISSING off, as in
    Azure): the open is refused for good. The health report answered 500 "cosmos refused
    the request", where a tier that stops answering later is reported down (503); the
    other endpoints answer the store's refusal, typed, with an incident id."""
    env = {
        **stack_env,
        "STATE_COLD_BACKEND": "cosmos",
        "COSMOS_DATABASE": "no-such-database",
        "COSMOS_CREATE_IF_MISSING": "false",
    }
    async with started(env, tmp_path / "api.log") as client:
        tier = await health_down(client)
        assert "'no-such-database' does not exist" in str(tier["detail"]), tier
        for answer in await every_endpoint(client, "case-e2e-no-container"):
            assert answer.status_code == 500, (answer.request.url, answer.text)
            assert answer.json()["error"].startswith("cosmos refused the request (incident")


async def test_cosmos_credential_the_environment_cannot_build_answers_503_naming_it(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """No COSMOS_KEY, and a service principal whose tenant id is no tenant id: the Entra
    credential's constructor refuses it (ValueError), at the first request, not at start;
    every request was a bare 500. Settings the operator must fix: a 503 saying so."""
    env = {
        **stack_env,
        "AZURE_TOKEN_CREDENTIALS": "EnvironmentCredential",
        "AZURE_TENANT_ID": "not a tenant",
        "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000001",
        "AZURE_CLIENT_SECRET": "not-a-secret",
        "STATE_COLD_BACKEND": "cosmos",
        "COSMOS_KEY": "",
        "COSMOS_CREATE_IF_MISSING": "true",
    }
    async with started(env, tmp_path / "api.log") as client:
        health = await client.get("/api/health")
        assert health.status_code == 503, health.text
        assert health.json()["status"] == "down"
        for answer in [health, *await every_endpoint(client, "case-e2e-bad-environment")]:
            assert answer.status_code == 503, (answer.request.url, answer.text)
            error = answer.json()["error"]
            assert error.startswith("the API is not configured correctly: COSMOS_KEY is unset"), (
                error
            )
            assert "Invalid tenant ID" in error, error


# A service principal whose tenant id is no tenant id: the Entra credential's constructor
# refuses it (ValueError).
UNBUILDABLE_CREDENTIAL = {
    "AZURE_TOKEN_CREDENTIALS": "EnvironmentCredential",
    "AZURE_TENANT_ID": "not a tenant",
    "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000001",
    "AZURE_CLIENT_SECRET": "not-a-secret",
}


def no_identity(tmp_path: Path) -> dict[str, str]:
    """No Entra identity to be found: the credential chain narrowed to the Azure CLI,
    signed in nowhere."""
    return {
        "AZURE_TOKEN_CREDENTIALS": "AzureCliCredential",
        "AZURE_CONFIG_DIR": str(tmp_path / "az"),
    }


# Postgres through an Entra sign-in: the credential fails before any connection is made.
POSTGRES_ENTRA = {
    "STATE_COLD_BACKEND": "postgres",
    "POSTGRES_URL": "",
    "POSTGRES_HOST": "127.0.0.1",
    "POSTGRES_USER": "agent-state",
}


def redis_entra(stack_env: dict[str, str]) -> dict[str, str]:
    """The stack's Redis signed in to with Entra ID tokens (REDIS_HOST, no REDIS_URL)."""
    port = stack_env["REDIS_URL"].rsplit(":", 1)[1].split("/")[0]
    return {
        "STATE_COLD_BACKEND": "postgres",
        "REDIS_URL": "",
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": port,
        "REDIS_SSL": "false",
    }


async def test_postgres_credential_the_environment_cannot_build_answers_503_naming_it(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """No POSTGRES_URL (an Entra sign-in) and AZURE_* variables the credential refuses:
    the ValueError of its constructor, at the first request, was a bare 500 each time."""
    env = {**stack_env, **UNBUILDABLE_CREDENTIAL, **POSTGRES_ENTRA}
    async with started(env, tmp_path / "api.log") as client:
        health = await client.get("/api/health")
        for answer in [health, *await every_endpoint(client, "case-e2e-pg-bad-environment")]:
            assert answer.status_code == 503, (answer.request.url, answer.text)
            error = answer.json()["error"]
            assert error.startswith("the API is not configured correctly: POSTGRES_URL is unset"), (
                error
            )
            assert "Invalid tenant ID" in error, error


async def test_postgres_without_an_identity_answers_503_at_once_naming_it(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """No identity to get a token from: the pool only logged the credential's error, trying
    again and again, while health reported "no answer within 1.5 s" and every other request
    waited out the 10 s request deadline, its answer not saying why."""
    env = {**stack_env, **no_identity(tmp_path), **POSTGRES_ENTRA}
    async with started(env, tmp_path / "api.log") as client:
        tier = await health_down(client, "postgres")
        assert "BackendUnavailable" in str(tier["detail"]), tier
        assert "no access token" in str(tier["detail"]), tier
        began = time.monotonic()
        for answer in await every_endpoint(client, "case-e2e-pg-no-credential"):
            assert answer.status_code == 503, (answer.request.url, answer.text)
            assert answer.json()["error"].startswith("postgres unavailable, retry later")
        assert time.monotonic() - began < 10, "the requests waited for the pool's timeout"


async def test_redis_credential_the_environment_cannot_build_answers_503_naming_it(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """REDIS_HOST (an Entra sign-in) and an AZURE_TOKEN_CREDENTIALS the credential does not
    know: its constructor's ValueError, at the first request, was a bare 500 each time."""
    env = {**stack_env, **redis_entra(stack_env), "AZURE_TOKEN_CREDENTIALS": "NoSuchCredential"}
    async with started(env, tmp_path / "api.log") as client:
        health = await client.get("/api/health")
        for answer in [health, *await every_endpoint(client, "case-e2e-redis-bad-environment")]:
            assert answer.status_code == 503, (answer.request.url, answer.text)
            error = answer.json()["error"]
            assert error.startswith("the API is not configured correctly: REDIS_URL is unset"), (
                error
            )
            assert "Invalid value for AZURE_TOKEN_CREDENTIALS" in error, error


async def test_redis_without_an_identity_is_down_the_cold_tier_serving(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """No identity to get a Redis token from: the credential's error (not a Redis error)
    escaped every mapping of the hot tier's, and every request was a bare 500, health
    included. The hot tier is down, as if unreachable: the cold tier serves the cases."""
    env = {**stack_env, **redis_entra(stack_env), **no_identity(tmp_path)}
    async with started(env, tmp_path / "api.log") as client:
        health = await client.get("/api/health")
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "degraded", health.text
        tiers = {tier["name"]: tier for tier in health.json()["tiers"]}
        assert tiers["postgres"]["up"], tiers
        assert not tiers["redis"]["up"], tiers
        assert "no access token" in tiers["redis"]["detail"], tiers
        created, read, events, _review = await every_endpoint(
            client, "case-e2e-redis-no-credential"
        )
        assert created.status_code == 201, created.text
        assert read.status_code == 200, read.text
        assert events.status_code == 503, events.text
        assert events.json()["error"].startswith("redis unavailable, retry later"), events.text


async def test_postgres_at_a_closed_port_answers_503_at_once_naming_it(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """Nothing listens at POSTGRES_URL's port: the pool only logged each refused connect,
    trying again, while health reported "no answer within 1.5 s" and every other request
    waited out the 10 s request deadline. Cosmos says "connection refused" at once."""
    env = {**stack_env, "STATE_COLD_BACKEND": "postgres"}
    env["POSTGRES_URL"] = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    async with started(env, tmp_path / "api.log") as client:
        began = time.monotonic()
        tier = await health_down(client, "postgres")
        assert "BackendUnavailable" in str(tier["detail"]), tier
        assert "Connection refused" in str(tier["detail"]), tier
        for answer in await every_endpoint(client, "case-e2e-pg-closed-port"):
            assert answer.status_code == 503, (answer.request.url, answer.text)
            assert answer.json()["error"].startswith("postgres unavailable, retry later")
        assert time.monotonic() - began < 5, "the requests waited for the pool's timeout"
