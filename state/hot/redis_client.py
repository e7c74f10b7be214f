"""Builds the redis.asyncio client from settings: a URL locally, Entra ID in Azure."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ..errors import SettingsError
from ..settings import Settings

REDIS_ENTRA_SCOPE = "https://redis.azure.com/.default"


def hot_key(thread_id: str, kind: str) -> str:
    """Every key of a thread carries the hash tag `{thread_id}`: one cluster slot per thread."""
    return f"{{{thread_id}}}:{kind}"


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
