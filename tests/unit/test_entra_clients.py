"""Entra ID sign-in for every store client, offline: credentials are built, nothing connects.

In Azure there is no key, password or connection string with a secret: Cosmos
gets an azure-identity credential for the app's user-assigned identity, Redis a
redis-entraid credential provider, Postgres an Entra token as its password.
Each test stops at the seam where the client would open a socket (the SDK
client's constructor, the Redis client object, the connection pool) and checks
what would have been sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import azure.identity.aio
import pytest
import redis
import redis.asyncio as aioredis
import redis_entraid.cred_provider
from azure.core.credentials import AccessToken
from psycopg.conninfo import conninfo_to_dict
from redis_entraid.identity_provider import ManagedIdentityIdType, ManagedIdentityType

from state.cold import cosmos_client, postgres_client
from state.cold.cosmos_client import CosmosConnection, EnvironmentProxyTransport
from state.cold.postgres_client import ENTRA_SCOPE, PostgresConnection
from state.errors import SettingsError
from state.hot import redis_client
from state.hot.redis_client import (
    REDIS_ENTRA_SCOPE,
    EntraTokens,
    create_blocking_redis_client,
    create_redis_client,
)
from state.settings import Settings

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
COSMOS_ENDPOINT = "https://acct.documents.azure.com:443/"
REDIS_HOST = "cache.redis.cache.windows.net"
POSTGRES_HOST = "pg.postgres.database.azure.com"
POSTGRES_USER = "id-api-test"
TOKEN = "entra-token-value"

# Settings the outer environment might carry: each test states the ones it means.
SETTING_NAMES = (
    "STATE_COLD_BACKEND",
    "COSMOS_ENDPOINT",
    "COSMOS_KEY",
    "COSMOS_CREATE_IF_MISSING",
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_SSL",
    "POSTGRES_URL",
    "POSTGRES_HOST",
    "POSTGRES_USER",
    "POSTGRES_DATABASE",
    "AZURE_CLIENT_ID",
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """Settings read from exactly the given environment variables (the app's own path)."""
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)

    def build(**values: str) -> Settings:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        return Settings()

    return build


class RecordingDefaultCredential(azure.identity.aio.DefaultAzureCredential):
    """The real async DefaultAzureCredential, remembering how it was built."""

    built: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **kwargs: Any) -> None:
        RecordingDefaultCredential.built.append(kwargs)
        super().__init__(**kwargs)


@pytest.fixture
def recorded_default_credential(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[list[dict[str, Any]]]:
    RecordingDefaultCredential.built = []
    # The adapters import it from azure.identity.aio when they need it (not at module load).
    monkeypatch.setattr(azure.identity.aio, "DefaultAzureCredential", RecordingDefaultCredential)
    yield RecordingDefaultCredential.built


# ---------------------------------------------------------------------- Cosmos


@dataclass(frozen=True)
class FakeContainer:
    name: str

    async def read(self) -> dict[str, Any]:
        return {"id": self.name}


class FakeCosmosClient:
    """Stands in for azure.cosmos.aio.CosmosClient: records its arguments, never connects."""

    def __init__(self, url: str, credential: Any, **kwargs: Any) -> None:
        self.url = url
        self.credential = credential
        self.kwargs = kwargs
        self.closed = False

    def get_database_client(self, database: str) -> FakeCosmosClient:
        return self

    def get_container_client(self, container: str) -> FakeContainer:
        return FakeContainer(container)

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def cosmos_clients(monkeypatch: pytest.MonkeyPatch) -> list[FakeCosmosClient]:
    """The Cosmos clients the adapter builds, each a `FakeCosmosClient` recording its arguments."""
    clients: list[FakeCosmosClient] = []

    def fake_client(url: str, credential: Any, **kwargs: Any) -> FakeCosmosClient:
        clients.append(FakeCosmosClient(url, credential, **kwargs))
        return clients[-1]

    monkeypatch.setattr(cosmos_client, "CosmosClient", fake_client)
    return clients


async def test_cosmos_without_a_key_signs_in_as_the_user_assigned_identity(
    env: Callable[..., Settings],
    recorded_default_credential: list[dict[str, Any]],
    cosmos_clients: list[FakeCosmosClient],
) -> None:
    settings = env(COSMOS_ENDPOINT=COSMOS_ENDPOINT, AZURE_CLIENT_ID=CLIENT_ID)
    connection = CosmosConnection(settings.cosmos)
    try:
        assert await connection.container() == FakeContainer("state")
        (client,) = cosmos_clients
        assert client.url == COSMOS_ENDPOINT
        assert isinstance(client.credential, azure.identity.aio.DefaultAzureCredential)
        assert recorded_default_credential == [{"managed_identity_client_id": CLIENT_ID}]
        # A real account's certificate is verified (only the loopback emulator's is not).
        assert client.kwargs["connection_verify"] is True
    finally:
        await connection.close()
    assert client.closed


async def test_cosmos_with_a_key_uses_it_and_no_credential(
    env: Callable[..., Settings],
    recorded_default_credential: list[dict[str, Any]],
    cosmos_clients: list[FakeCosmosClient],
) -> None:
    connection = CosmosConnection(env(COSMOS_ENDPOINT=COSMOS_ENDPOINT, COSMOS_KEY="a2V5").cosmos)
    try:
        await connection.container()
    finally:
        await connection.close()
    assert cosmos_clients[0].credential == "a2V5"
    assert recorded_default_credential == []


ACCOUNT_URL = f"{COSMOS_ENDPOINT}dbs/state"
REGION_URL = "https://acct-westus.documents.azure.com:443/dbs/state"
PROXY = "http://proxy.corp:3128"


@pytest.mark.parametrize(
    ("no_proxy", "account", "region"),
    [
        ("", PROXY, PROXY),
        ("acct.documents.azure.com", None, PROXY),
        (".documents.azure.com", None, None),
        # With a port, as urllib and requests take it; spaces and case as they do too.
        ("localhost, ACCT.documents.azure.com:443", None, PROXY),
        ("acct.documents.azure.com:8081", PROXY, PROXY),
        ("*", None, None),
    ],
)
async def test_cosmos_takes_the_environments_proxy_once_per_host(
    env: Callable[..., Settings],
    cosmos_clients: list[FakeCosmosClient],
    monkeypatch: pytest.MonkeyPatch,
    no_proxy: str,
    account: str | None,
    region: str | None,
) -> None:
    """Decided per host, as aiohttp would (the SDK also sends to its regions' hosts), but
    once each: aiohttp trusting the environment reads it in worker threads per request."""
    monkeypatch.setenv("HTTPS_PROXY", PROXY)
    monkeypatch.setenv("NO_PROXY", no_proxy)
    connection = CosmosConnection(env(COSMOS_ENDPOINT=COSMOS_ENDPOINT, COSMOS_KEY="a2V5").cosmos)
    try:
        await connection.container()
    finally:
        await connection.close()
    monkeypatch.setenv("NO_PROXY", "*")  # read when the transport was built, not at first use
    (client,) = cosmos_clients
    transport = client.kwargs["transport"]
    assert isinstance(transport, EnvironmentProxyTransport)
    assert transport._use_env_settings is False
    assert (transport.proxy_for(ACCOUNT_URL), transport.proxy_for(REGION_URL)) == (account, region)
    monkeypatch.delenv("HTTPS_PROXY")  # read when the transport was built, not later
    assert transport.proxy_for(ACCOUNT_URL) == account


# ---------------------------------------------------------------------- Redis


@pytest.fixture
def recorded_redis_providers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, Any]]:
    """Wrap redis-entraid's factories: the real provider is built (offline), calls recorded."""
    calls: list[tuple[str, Any, Any]] = []
    for name in ("create_from_managed_identity", "create_from_default_azure_credential"):
        real = getattr(redis_entraid.cred_provider, name)

        def record(*args: Any, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
            provider = _real(*args, **kwargs)
            calls.append((_name, (args, kwargs), provider))
            return provider

        monkeypatch.setattr(redis_entraid.cred_provider, name, record)
    return calls


def _connection_kwargs(client: aioredis.Redis) -> dict[str, Any]:
    return dict(client.connection_pool.connection_kwargs)


@pytest.mark.parametrize(
    ("kind", "values"),
    [
        ("plain", {"REDIS_URL": "redis://127.0.0.1:6390/0"}),
        ("tls", {"REDIS_URL": "rediss://cache.example:6380/0"}),
        ("entra", {"REDIS_HOST": REDIS_HOST, "AZURE_CLIENT_ID": CLIENT_ID}),
    ],
)
async def test_every_redis_client_bounds_its_sends_in_place(
    env: Callable[..., Settings],
    recorded_redis_providers: list[tuple[str, Any, Any]],
    kind: str,
    values: dict[str, str],
) -> None:
    """Its connections' sends are bounded without a task each and aborted part way, and
    fail at once while the server timed out lately, the blocking client's too
    (`tests/faults/test_redis_frozen.py` shows what that does against a frozen server)."""
    settings = env(COSMOS_ENDPOINT=COSMOS_ENDPOINT, **values)
    client = create_redis_client(settings)
    try:
        connection_class = client.connection_pool.connection_class
        assert issubclass(connection_class, redis_client._SendBoundedInPlace)
        assert issubclass(connection_class, redis_client._FailFast)
        assert issubclass(connection_class, aioredis.SSLConnection) is (kind != "plain")
    finally:
        await client.aclose()
    blocking = create_blocking_redis_client(settings)
    try:
        blocking_class = blocking.connection_pool.connection_class
        assert issubclass(blocking_class, redis_client._BlockingFailFast)
        assert issubclass(blocking_class, redis.SSLConnection) is (kind != "plain")
    finally:
        blocking.close()


async def test_redis_host_uses_the_user_assigned_identity_over_tls(
    env: Callable[..., Settings], recorded_redis_providers: list[tuple[str, Any, Any]]
) -> None:
    settings = env(
        COSMOS_ENDPOINT=COSMOS_ENDPOINT,
        REDIS_HOST=REDIS_HOST,
        REDIS_PORT="10000",
        AZURE_CLIENT_ID=CLIENT_ID,
    )
    client = create_redis_client(settings)
    try:
        kwargs = _connection_kwargs(client)
        ((factory, (_, call_kwargs), provider),) = recorded_redis_providers
        assert factory == "create_from_managed_identity"
        assert call_kwargs["identity_type"] is ManagedIdentityType.USER_ASSIGNED
        assert call_kwargs["id_type"] is ManagedIdentityIdType.CLIENT_ID
        assert call_kwargs["id_value"] == CLIENT_ID
        assert call_kwargs["resource"] == "https://redis.azure.com"
        # Its identity provider, refreshed by `EntraTokens` (not redis-entraid's manager).
        assert isinstance(kwargs["credential_provider"], EntraTokens)
        assert kwargs["credential_provider"].identity is provider._idp
        assert kwargs["host"] == REDIS_HOST and kwargs["port"] == 10000
        assert issubclass(client.connection_pool.connection_class, aioredis.SSLConnection)
        assert kwargs.get("password") is None and kwargs.get("username") is None
    finally:
        await client.aclose()


async def test_redis_host_without_a_client_id_uses_the_default_chain(
    env: Callable[..., Settings], recorded_redis_providers: list[tuple[str, Any, Any]]
) -> None:
    client = create_redis_client(env(COSMOS_ENDPOINT=COSMOS_ENDPOINT, REDIS_HOST=REDIS_HOST))
    try:
        kwargs = _connection_kwargs(client)
        ((factory, (args, call_kwargs), provider),) = recorded_redis_providers
        assert factory == "create_from_default_azure_credential"
        assert tuple(args[0] if args else call_kwargs["scopes"]) == (REDIS_ENTRA_SCOPE,)
        # Its identity provider, refreshed by `EntraTokens` (not redis-entraid's manager).
        assert isinstance(kwargs["credential_provider"], EntraTokens)
        assert kwargs["credential_provider"].identity is provider._idp
        # REDIS_PORT / REDIS_SSL unset: Azure Cache for Redis's TLS port.
        assert kwargs["port"] == 6380
        assert issubclass(client.connection_pool.connection_class, aioredis.SSLConnection)
        assert kwargs.get("password") is None
    finally:
        await client.aclose()


# ---------------------------------------------------------------------- Postgres


class FakeTokenCredential:
    """Stands in for azure.identity.aio.DefaultAzureCredential: hands out a token offline."""

    built: ClassVar[list[dict[str, Any]]] = []
    scopes: ClassVar[list[tuple[str, ...]]] = []

    def __init__(self, **kwargs: Any) -> None:
        FakeTokenCredential.built.append(kwargs)
        self.closed = False

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        FakeTokenCredential.scopes.append(scopes)
        return AccessToken(TOKEN, 2**31)

    async def close(self) -> None:
        self.closed = True


class FakeConnection:
    """Stands in for psycopg's AsyncConnection: records each connect, never connects."""

    opened: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    @classmethod
    async def connect(cls, conninfo: str, **kwargs: Any) -> FakeConnection:
        cls.opened.append((conninfo, kwargs))
        return cls()

    async def close(self) -> None:
        pass


class FakePool:
    """Stands in for psycopg_pool.AsyncConnectionPool: records how it was built, never connects."""

    def __init__(self, conninfo: str, **kwargs: Any) -> None:
        self.conninfo = conninfo
        self.kwargs = kwargs

    async def open(self, wait: bool = True) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_postgres_host_signs_in_with_an_entra_token_over_tls(
    env: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    FakeTokenCredential.built, FakeTokenCredential.scopes = [], []
    monkeypatch.setattr(azure.identity.aio, "DefaultAzureCredential", FakeTokenCredential)
    monkeypatch.setattr(postgres_client, "AsyncConnectionPool", FakePool)
    monkeypatch.setattr(postgres_client, "AsyncConnection", FakeConnection)
    FakeConnection.opened = []
    settings = env(
        STATE_COLD_BACKEND="postgres",
        POSTGRES_HOST=POSTGRES_HOST,
        POSTGRES_USER=POSTGRES_USER,
        AZURE_CLIENT_ID=CLIENT_ID,
    )
    connection = PostgresConnection(settings.postgres)
    try:
        pool = await connection.pool()
        assert isinstance(pool, FakePool)
        assert FakeTokenCredential.built == [{"managed_identity_client_id": CLIENT_ID}]
        info = conninfo_to_dict(pool.conninfo)
        assert info["host"] == POSTGRES_HOST and info["user"] == POSTGRES_USER
        assert info["dbname"] == "agentstate"
        # The token goes only to a server whose certificate names the host.
        assert info["sslmode"] == "verify-full"
        roots = await asyncio.to_thread(Path(info["sslrootcert"]).read_text)
        assert "BEGIN CERTIFICATE" in roots
        assert "password" not in info
        # One connection before the pool opens (a server or a credential that fails is
        # reported at once), signed in as the pool's are...
        [(conninfo, kwargs)] = FakeConnection.opened
        assert conninfo == pool.conninfo and kwargs["password"] == TOKEN
        assert FakeTokenCredential.scopes == [(ENTRA_SCOPE,)]
        assert ENTRA_SCOPE == "https://ossrdbms-aad.database.windows.net/.default"
        # ...and the pool calls this for every new connection: a fresh token each time.
        connect_kwargs = await pool.kwargs["kwargs"]()
        assert connect_kwargs["password"] == TOKEN
        assert FakeTokenCredential.scopes == [(ENTRA_SCOPE,)] * 2
        await pool.kwargs["kwargs"]()
        assert len(FakeTokenCredential.scopes) == 3
    finally:
        await connection.close()


def test_an_entra_token_is_never_sent_to_redis_in_clear_text(env: Callable[..., Settings]) -> None:
    """REDIS_HOST signs in with the identity's access token (Redis's AUTH command): over a
    plain connection to another machine anyone on the path could read and reuse it."""
    with pytest.raises(SettingsError, match="REDIS_SSL=false with REDIS_HOST") as refused:
        env(COSMOS_ENDPOINT=COSMOS_ENDPOINT, REDIS_HOST=REDIS_HOST, REDIS_SSL="false")
    assert REDIS_HOST not in str(refused.value)
    # A local Redis (the token tests' own) may go without TLS; a password URL is the
    # operator's own choice of transport (redis:// or rediss://).
    local = env(COSMOS_ENDPOINT=COSMOS_ENDPOINT, REDIS_HOST="127.0.0.1", REDIS_SSL="false")
    assert not local.redis_ssl
    url = "redis://:pw@cache.example:6379/0"
    assert env(COSMOS_ENDPOINT=COSMOS_ENDPOINT, REDIS_URL=url, REDIS_SSL="false").redis_url


@pytest.mark.parametrize("host", ["LOCALHOST", "Localhost", "127.0.0.2", "::1"])
def test_a_loopback_redis_host_however_spelled_may_go_without_tls(
    env: Callable[..., Settings], host: str
) -> None:
    """Host names are read without regard to case and all of 127.0.0.0/8 is this machine:
    no token leaves it, and refusing it said "plain text is for a loopback host" of one."""
    local = env(COSMOS_ENDPOINT=COSMOS_ENDPOINT, REDIS_HOST=host, REDIS_SSL="false")
    assert local.redis_host == host and not local.redis_ssl
