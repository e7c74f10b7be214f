"""Builds the Redis clients from settings (a URL locally, Entra ID in Azure): redis.asyncio's,
and a blocking one for the saver's sync write-behind appends; and names their keys."""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import urlparse

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry as BlockingRetry

from ..errors import SettingsError
from ..settings import ColdBackend, Settings

REDIS_ENTRA_SCOPE = "https://redis.azure.com/.default"
POSTGRES_DEFAULT_PORT = "5432"
NAMESPACE_CHARS = 10


def hot_key(thread_id: str, kind: str, *, namespace: str) -> str:
    """`{thread_id}:<namespace>:<kind>`.

    The hash tag `{thread_id}` puts every key of a thread on one cluster slot; the
    namespace (see `hot_namespace`) keeps apart cold stores that share one Redis.
    """
    return f"{{{thread_id}}}:{namespace}:{kind}"


def hot_namespace(settings: Settings) -> str:
    """A short, stable name for the cold store that the hot tier caches.

    Built from where the data lives (backend, endpoint or host, database,
    container), never from credentials: rotating a key or password keeps the cache.
    """
    if settings.state_cold_backend is ColdBackend.COSMOS:
        endpoint = urlparse(settings.cosmos_endpoint or "")
        location = f"{endpoint.hostname}:{endpoint.port or 443}"
        identity = [location, settings.cosmos_database, settings.cosmos_container]
    else:
        identity = _postgres_identity(settings)
    digest = hashlib.sha256("\0".join([settings.state_cold_backend.value, *identity]).encode())
    return digest.hexdigest()[:NAMESPACE_CHARS]


def _postgres_identity(settings: Settings) -> list[str]:
    if settings.postgres_url is None:
        # The adapter connects on the default port in this mode (POSTGRES_HOST + Entra).
        return [f"{settings.postgres_host}:{POSTGRES_DEFAULT_PORT}", settings.postgres_database]
    from psycopg.conninfo import conninfo_to_dict

    # Accepts both forms the adapter does (URL or key=value); the password is never read.
    parts = conninfo_to_dict(settings.postgres_url.get_secret_value())
    host = str(parts.get("host") or parts.get("hostaddr") or "")
    port = str(parts.get("port") or POSTGRES_DEFAULT_PORT)
    return [f"{host}:{port}", str(parts.get("dbname") or parts.get("user") or "")]


def create_redis_client(settings: Settings) -> aioredis.Redis:
    kwargs = {**_client_kwargs(settings), "retry": Retry(_backoff(), retries=1)}
    if settings.redis_url is not None:
        return aioredis.Redis.from_url(settings.redis_url.get_secret_value(), **kwargs)
    return aioredis.Redis(**_entra_kwargs(settings), **kwargs)


def create_blocking_redis_client(settings: Settings) -> redis.Redis:
    """The same server and options for callers without an event loop (the saver's sync
    write-behind appends, made on the caller's own thread)."""
    kwargs = {**_client_kwargs(settings), "retry": BlockingRetry(_backoff(), retries=1)}
    if settings.redis_url is not None:
        return redis.Redis.from_url(settings.redis_url.get_secret_value(), **kwargs)
    return redis.Redis(**_entra_kwargs(settings), **kwargs)


def _client_kwargs(settings: Settings) -> dict[str, Any]:
    if settings.redis_url is None and not settings.redis_host:
        raise SettingsError("no hot tier configured: set REDIS_URL or REDIS_HOST")
    # Short timeouts: the hot tier is an optimisation, a slow Redis must not stall the app.
    return {"socket_timeout": 2.0, "socket_connect_timeout": 2.0, "health_check_interval": 30}


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=0.2, base=0.02)


def _entra_kwargs(settings: Settings) -> dict[str, Any]:
    from redis_entraid.cred_provider import (
        create_from_default_azure_credential,
        create_from_managed_identity,
    )
    from redis_entraid.identity_provider import ManagedIdentityIdType, ManagedIdentityType

    # The user-assigned identity when its client id is known, else the default chain.
    provider = (
        create_from_managed_identity(
            identity_type=ManagedIdentityType.USER_ASSIGNED,
            resource=REDIS_ENTRA_SCOPE.removesuffix("/.default"),
            id_type=ManagedIdentityIdType.CLIENT_ID,
            id_value=settings.azure_client_id,
        )
        if settings.azure_client_id
        else create_from_default_azure_credential((REDIS_ENTRA_SCOPE,))
    )
    return {
        "host": settings.redis_host,
        "port": settings.redis_port,
        "ssl": settings.redis_ssl,
        "credential_provider": provider,
    }
