"""Builds the redis.asyncio client from settings (a URL locally, Entra ID in Azure) and
names its keys."""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

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
    # Short timeouts: the hot tier is an optimisation, a slow Redis must not stall the app.
    common: dict[str, Any] = {
        "socket_timeout": 2.0,
        "socket_connect_timeout": 2.0,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
        "health_check_interval": 30,
    }
    if settings.redis_url is not None:
        return aioredis.Redis.from_url(settings.redis_url.get_secret_value(), **common)
    if settings.redis_host:
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
        return aioredis.Redis(
            host=settings.redis_host,
            port=settings.redis_port,
            ssl=settings.redis_ssl,
            credential_provider=provider,
            **common,
        )
    raise SettingsError("no hot tier configured: set REDIS_URL or REDIS_HOST")
