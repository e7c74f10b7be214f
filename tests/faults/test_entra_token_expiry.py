"""Entra ID tokens expire (about an hour in Azure): what the hot tier and Postgres do then.

Azure Redis closes a connection whose token expired unless the client sent AUTH with a
fresh one on it first; Postgres checks the token only when a connection opens. Here the
tokens live seconds, and real servers play Azure's part: each Redis token is an ACL user
of its own (named by the token's `oid`), killed and deleted when the token expires, so a
connection still signed in with it is dropped as Azure drops it; Postgres's role takes
each new token as its password, the old one no longer accepted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis
import redis.asyncio as aioredis
import redis_entraid.cred_provider
from azure.core.credentials import AccessToken
from psycopg import sql
from psycopg.conninfo import make_conninfo
from pydantic import SecretStr
from redis.auth.err import RequestTokenErr
from redis.auth.idp import IdentityProviderInterface
from redis.auth.token import SimpleToken, TokenInterface
from redis.auth.token_manager import RetryPolicy, TokenManagerConfig
from redis_entraid.cred_provider import (
    DEFAULT_DELAY_IN_MS,
    DEFAULT_EXPIRATION_REFRESH_RATIO,
    DEFAULT_LOWER_REFRESH_BOUND_MILLIS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TOKEN_REQUEST_EXECUTION_TIMEOUT_IN_MS,
    EntraIdCredentialsProvider,
)

from devstack import PostgresServer, RedisServer
from devstack.servers import LOOPBACK
from state.cold.postgres_client import ENTRA_SCOPE, PostgresConnection
from state.errors import BackendUnavailable
from state.factory import backends_for
from state.hot import redis_client
from state.hot.redis_client import (
    create_blocking_redis_client,
    create_redis_client,
    round_trip,
    round_trip_blocking,
)
from state.hot.redis_events import RedisEventLog
from state.settings import Settings

TOKEN_SECONDS = 12.0
# The SSE stream's XREAD holds its connection this long at most: signed in again only on
# its release, it must be released before its token expires.
XREAD_SECONDS = 1.5
# Tests that need a refresh to happen, not its timing against the token's expiry, refresh
# at this share of the token's life (the app's 70 % would have them wait 8.4 s for it).
EARLY_REFRESH_RATIO = 0.1
PAST_AN_EARLY_REFRESH = TOKEN_SECONDS * (EARLY_REFRESH_RATIO + 0.1)


class ExpiringTokens(IdentityProviderInterface):
    """Entra ID for Redis: tokens that live `lifetime` seconds, each its own ACL user. A
    token asked for without `force_refresh` is the cached one while it has most of its
    life left, as azure-identity and MSAL hand out."""

    def __init__(self, admin: redis.Redis) -> None:
        self._admin = admin
        self.lifetime = TOKEN_SECONDS
        self._lock = threading.Lock()
        self.issued: list[SimpleToken] = []
        # While time.time() is in [start, end), refreshes fail (Entra ID or the managed
        # identity endpoint briefly unreachable); a cached token is still handed out.
        self.outage = (0.0, 0.0)
        self.failed = 0
        # Once the test is over, a refresh fails at once rather than reach a stopped server
        # (a client the test left open).
        self.closed = False
        # How long issuing a new token takes (a slow managed identity endpoint), and how
        # many tokens were asked for.
        self.latency = 0.0
        self.requests = 0

    def request_token(self, force_refresh: bool = False) -> TokenInterface:
        with self._lock:
            now = time.time() * 1000
            self.requests += 1
            if self.closed:
                raise RequestTokenErr("test over")
            if force_refresh and self.outage[0] <= now / 1000 < self.outage[1]:
                self.failed += 1
                raise RequestTokenErr("identity endpoint unreachable")
            if (
                not force_refresh
                and self.issued
                and self.issued[-1].get_expires_at_ms() - now > self.lifetime * 1000 / 2
            ):
                return self.issued[-1]
            time.sleep(self.latency)
            now = time.time() * 1000
            user, secret = f"entra-{len(self.issued) + 1}", f"token-{len(self.issued) + 1}"
            self._admin.acl_setuser(
                user, enabled=True, passwords=[f"+{secret}"], keys=["~*"], commands=["+@all"]
            )
            token = SimpleToken(secret, now + self.lifetime * 1000, now, {"oid": user})
            self.issued.append(token)
            return token

    def expire(self) -> int:
        """Drops the connections of every token past its expiry; how many there were."""
        killed = 0
        with self._lock:
            now = time.time() * 1000
            for token in self.issued:
                user = token.try_get("oid")
                if token.get_expires_at_ms() <= now and self._admin.acl_getuser(user):
                    killed += int(self._admin.execute_command("CLIENT", "KILL", "USER", user))
                    self._admin.acl_deluser(user)
        return killed

    def expired_by(self, moment: float) -> int:
        """How many of the tokens issued had expired by `moment` (a `time.time()`)."""
        return sum(token.get_expires_at_ms() <= moment * 1000 for token in self.issued)


@pytest.fixture
def entra_redis(
    redis_server: Callable[..., RedisServer], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Settings, ExpiringTokens]]:
    """A dedicated Redis signing the hot tier in with `ExpiringTokens` through the
    project's own Entra wiring (`_entra_tokens`, `EntraTokens`)."""
    server = redis_server()
    admin = redis.Redis(host="127.0.0.1", port=server.port)
    admin.config_set("requirepass", "admin")  # the default user: the admin only
    admin = redis.Redis(host="127.0.0.1", port=server.port, password="admin")
    tokens = ExpiringTokens(admin)
    config = TokenManagerConfig(
        DEFAULT_EXPIRATION_REFRESH_RATIO,
        DEFAULT_LOWER_REFRESH_BOUND_MILLIS,
        DEFAULT_TOKEN_REQUEST_EXECUTION_TIMEOUT_IN_MS,
        RetryPolicy(DEFAULT_MAX_ATTEMPTS, DEFAULT_DELAY_IN_MS),
    )

    def provider(*_: Any, **__: Any) -> EntraIdCredentialsProvider:
        return EntraIdCredentialsProvider(tokens, config)

    monkeypatch.setattr(
        redis_entraid.cred_provider, "create_from_default_azure_credential", provider
    )
    settings = Settings(
        state_cold_backend="postgres",
        postgres_url="postgresql://unused@127.0.0.1/unused",
        redis_host="127.0.0.1",
        redis_port=server.port,
        redis_ssl=False,
    )
    try:
        yield settings, tokens
    finally:
        tokens.closed = True
        admin.close()


async def _steady_use(
    settings: Settings, tokens: ExpiringTokens, seconds: float, xread_seconds: float
) -> tuple[list[str], int]:
    """`seconds` of steady use of the hot tier: lean round trips (not resent, so a
    dropped connection shows), the client's own commands, the SSE stream's blocking XREAD
    (each `xread_seconds` long), the blocking client's appends. The calls that failed, and
    how many connections were still signed in with a token when it expired."""
    client = create_redis_client(settings)
    blocking = create_blocking_redis_client(settings)
    events = RedisEventLog(client, namespace="ns", max_events=100, ttl_seconds=60)
    errors: list[str] = []
    killed = 0
    stop = time.monotonic() + seconds

    async def lean() -> None:
        n = 0
        while time.monotonic() < stop:
            n += 1
            try:
                await round_trip(client, [("SET", "lean", n)], resend=False)
                await client.get("lean")
            except Exception as error:
                errors.append(f"async: {error!r}")
            await asyncio.sleep(0.05)

    async def stream() -> None:
        while time.monotonic() < stop:
            try:
                await events.read("quiet", after="$", wait_ms=int(xread_seconds * 1000))
            except Exception as error:
                errors.append(f"xread: {error!r}")

    def appends() -> None:
        n = 0
        while time.monotonic() < stop:
            n += 1
            try:
                round_trip_blocking(blocking, [("SET", "blocking", n)], resend=False)
            except Exception as error:
                errors.append(f"blocking: {error!r}")
            time.sleep(0.05)

    async def expire() -> None:
        nonlocal killed
        while time.monotonic() < stop:
            killed += await asyncio.to_thread(tokens.expire)
            await asyncio.sleep(0.05)

    try:
        await asyncio.gather(lean(), stream(), asyncio.to_thread(appends), expire())
    finally:
        await client.aclose()
        blocking.close()
    return errors, killed


async def test_hot_tier_signs_in_again_before_each_token_expires(
    entra_redis: tuple[Settings, ExpiringTokens],
) -> None:
    """The hot tier refreshes at 70 % of the life a token has left and sends AUTH on every pooled
    connection (one in use, on its release): no call fails, no connection is dropped."""
    settings, tokens = entra_redis
    # Token and XREAD two thirds as long as the module's: the refresh still comes 1.4 s
    # before a token expires after the XREAD holding a connection ends, and the run
    # lasts past two tokens' expiry (the first's and its successor's) in 15 s, not 22.
    tokens.lifetime = TOKEN_SECONDS * 2 / 3
    run_seconds = tokens.lifetime * (1 + redis_client.ENTRA_REFRESH_RATIO) + 1
    errors, killed = await _steady_use(settings, tokens, run_seconds, XREAD_SECONDS * 2 / 3)
    assert len(tokens.issued) >= run_seconds / tokens.lifetime, "tokens were not refreshed"
    assert errors == []
    assert killed == 0, f"{killed} connections still on an expired token"
    assert tokens.expired_by(time.time()) >= 2, "the run ended before two tokens expired"


async def test_a_failed_refresh_is_tried_again_before_the_token_expires(
    entra_redis: tuple[Settings, ExpiringTokens], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh due at 70 % of the first token's life fails (every attempt, for a
    tenth of its life); the token still has minutes to live in Azure, and a later try
    must sign the connections in again before it expires."""
    settings, tokens = entra_redis
    # Scaled as the token's life is (3 minutes of an hour's token).
    monkeypatch.setattr(redis_client, "ENTRA_REFRESH_RETRY_SECONDS", TOKEN_SECONDS / 20)
    start = time.time()
    tokens.outage = (start + TOKEN_SECONDS * 0.6, start + TOKEN_SECONDS * 0.75)
    # Past the first token's expiry, the one whose refresh failed (not the next's too).
    errors, killed = await _steady_use(settings, tokens, TOKEN_SECONDS + 1.5, XREAD_SECONDS)
    assert tokens.failed > 0
    assert errors == []
    assert killed == 0, f"{killed} connections still on an expired token"
    assert tokens.expired_by(time.time()) >= 1, "the run ended before the first token expired"


async def test_a_connection_signed_in_again_on_its_release_is_not_lent_out_meanwhile(
    entra_redis: tuple[Settings, ExpiringTokens], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new token comes while a connection is in use (the SSE stream's XREAD nearly
    always is): it must be signed in with it before the pool lends it to another caller,
    not while that caller is already using it."""
    settings, tokens = entra_redis
    monkeypatch.setattr(redis_client, "ENTRA_REFRESH_RATIO", 0.1)  # the first in ~1.2 s
    client = create_redis_client(settings)
    pool = client.connection_pool
    try:
        await client.ping()
        busy = await pool.get_connection()
        issued = len(tokens.issued)
        for _ in range(500):
            if len(tokens.issued) > issued:
                break
            await asyncio.sleep(0.02)
        assert len(tokens.issued) > issued, "no token refresh while the connection was in use"
        newest = tokens.issued[-1].try_get("oid")
        # The new token handed to the pool: its idle connection answers as the new user.
        for _ in range(250):
            if _text(await client.execute_command("ACL", "WHOAMI")) == newest:
                break
            await asyncio.sleep(0.02)
        outcomes = await asyncio.gather(
            pool.release(busy),
            *(client.execute_command("ACL", "WHOAMI") for _ in range(4)),
            return_exceptions=True,
        )
        assert [o for o in outcomes if isinstance(o, BaseException)] == []
        # Every connection (the released one too) is signed in with the newest token.
        whoami = await asyncio.gather(*(client.execute_command("ACL", "WHOAMI") for _ in range(4)))
        assert {_text(user) for user in whoami} == {newest}
    finally:
        await client.aclose()


async def test_a_caller_is_not_refused_while_the_idle_connections_are_signed_in_again(
    entra_redis: tuple[Settings, ExpiringTokens],
) -> None:
    """A new token signs the pool's idle connections in again: a caller asking for one
    meanwhile, its pool at its size limit, waits for one (as in redis-py's pool), not
    refused with "Too many connections" (each idle one counted in use while signed in)."""
    settings, tokens = entra_redis
    client = create_redis_client(settings)
    pool = client.connection_pool
    admin = redis.Redis(host="127.0.0.1", port=settings.redis_port, password="admin")
    try:
        pool.max_connections = 2
        held = [await pool.get_connection() for _ in range(pool.max_connections)]
        for connection in held:
            await pool.release(connection)
        new_token = await asyncio.to_thread(tokens.request_token, True)
        # The server holds back the sign-ins: the pool's idle connections stay out meanwhile.
        admin.execute_command("CLIENT", "PAUSE", 300, "ALL")
        signing_in = asyncio.create_task(pool.re_auth_callback(new_token))
        await asyncio.sleep(0)  # it runs up to its first reply awaited
        try:
            assert await round_trip(client, [("PING",)], resend=False) == [b"PONG"]
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
            await signing_in
    finally:
        admin.close()
        await client.aclose()


async def test_the_entra_client_speaks_to_the_server_as_the_url_client_does(
    entra_redis: tuple[Settings, ExpiringTokens],
) -> None:
    """The Entra client (Azure) builds its pool itself: it must still speak the protocol,
    and take the maintenance notifications, of the client built from a URL (local, CI),
    which is redis-py's default; not a protocol only Azure runs on."""
    settings, _tokens = entra_redis
    url = f"redis://:admin@127.0.0.1:{settings.redis_port}"
    entra = create_redis_client(settings)
    by_url = create_redis_client(settings.model_copy(update={"redis_url": SecretStr(url)}))
    try:
        entra_info, url_info = await asyncio.gather(entra.client_info(), by_url.client_info())
        assert entra_info["resp"] == url_info["resp"]
        assert _maint_notifications(entra) == _maint_notifications(by_url)
    finally:
        await asyncio.gather(entra.aclose(), by_url.aclose())


def _maint_notifications(client: aioredis.Redis) -> object:
    config = client.connection_pool.connection_kwargs.get("maint_notifications_config")
    return config and config.enabled


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- Postgres

PG_ROLE = "entra_app"


class RotatingPostgresToken:
    """Entra ID for Postgres (an `AsyncTokenCredential`): the current token until the test
    rotates it; a rotated token is the role's only password, as an expired one is no
    longer accepted in Azure. Records the tokens handed out."""

    def __init__(self, admin_url: str) -> None:
        self._admin_url = admin_url
        self.current = ""
        self.handed_out: list[str] = []

    def rotate(self) -> None:
        self.current = f"token-{len(self.handed_out)}-{time.monotonic_ns()}"
        with psycopg.connect(self._admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(PG_ROLE), sql.Literal(self.current)
                )
            )

    async def get_token(self, *scopes: str, **_: object) -> AccessToken:
        assert scopes == (ENTRA_SCOPE,)
        self.handed_out.append(self.current)
        return AccessToken(self.current, int(time.time()) + 3600)

    async def close(self) -> None:
        """Nothing to release."""


@pytest.fixture
def password_postgres(postgres_server: PostgresServer) -> str:
    """The dedicated server checking passwords over TCP (the stack trusts every
    connection), with a login role for the app; its admin's URL."""
    hba = postgres_server.data_dir / "pg_hba.conf"
    hba.write_text(
        f"local all all trust\n"
        f"host all postgres {LOOPBACK}/32 trust\n"
        f"host all all {LOOPBACK}/32 scram-sha-256\n"
    )
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute("SELECT pg_reload_conf()")
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(PG_ROLE)))
    return postgres_server.url


async def test_postgres_pools_sign_in_with_the_token_current_when_they_connect(
    password_postgres: str,
) -> None:
    """The pool outlives its first token: a connection it opens after the token changed
    signs in with the new one, whether the old connections stay (Postgres checks a token
    only at sign-in) or the server ends them (a restart, a failover)."""
    credential = RotatingPostgresToken(password_postgres)
    await asyncio.to_thread(credential.rotate)
    url = make_conninfo(password_postgres, user=PG_ROLE)
    settings = Settings(state_cold_backend="postgres", postgres_url=url)
    pg = PostgresConnection(settings.postgres, credential=credential)
    assert not pg.blocking_available  # the sync API goes through this pool instead
    try:
        async with pg.connection("first") as conn:
            assert conn.info.password == credential.current
        await asyncio.to_thread(credential.rotate)
        # The old sessions still work; new ones (the pool grows) need the new token.
        async with pg.connection("a") as a, pg.connection("b") as b, pg.connection("c") as c:
            for conn in (a, b, c):
                await conn.execute("SELECT 1")
            assert credential.current in {a.info.password, b.info.password, c.info.password}
        await asyncio.to_thread(credential.rotate)
        with psycopg.connect(password_postgres, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (PG_ROLE,),
            )
        # One call may meet a connection the server ended; the next signs in afresh.
        failed = 0
        for _ in range(2):
            try:
                async with pg.connection("after") as conn:
                    await conn.execute("SELECT 1")
                    assert conn.info.password == credential.current
            except BackendUnavailable:
                failed += 1
        assert failed <= 1
    finally:
        await pg.close()


# --------------------------------------------------------------------------- the token manager


async def test_a_slow_identity_endpoint_does_not_stall_the_event_loop(
    entra_redis: tuple[Settings, ExpiringTokens], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new token takes 2 s to come (a slow managed identity endpoint): the first sign-in
    and the refresh wait for it, other calls on the loop do not."""
    settings, tokens = entra_redis
    monkeypatch.setattr(redis_client, "ENTRA_REFRESH_RATIO", EARLY_REFRESH_RATIO)
    tokens.latency = 2.0
    client = create_redis_client(settings)
    stalls: list[float] = []
    # Past the refresh: 2 s to sign in, the token's life to its refresh, 2 s for the new one.
    stop = time.monotonic() + TOKEN_SECONDS * EARLY_REFRESH_RATIO + 2 * tokens.latency + 1

    async def ticker() -> None:
        while time.monotonic() < stop:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            stalls.append(time.monotonic() - before)

    async def calls() -> None:
        while time.monotonic() < stop:
            await client.set("k", "v")
            await asyncio.sleep(0.05)

    try:
        await asyncio.gather(ticker(), calls())
    finally:
        await client.aclose()
    assert len(tokens.issued) >= 2, "the token was not refreshed"
    assert max(stalls) < 0.5, f"the loop stalled for {max(stalls):.2f} s"


@pytest.mark.parametrize("kind", ["async", "blocking"])
async def test_a_closed_client_asks_for_no_more_tokens(
    entra_redis: tuple[Settings, ExpiringTokens], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the client is closed its token refresh stops: nothing keeps asking the
    identity endpoint for tokens (nor holds the credential and the client)."""
    settings, tokens = entra_redis
    monkeypatch.setattr(redis_client, "ENTRA_REFRESH_RATIO", EARLY_REFRESH_RATIO)
    if kind == "async":
        client = create_redis_client(settings)
        await client.set("k", "v")
        await client.aclose()
    else:
        blocking = create_blocking_redis_client(settings)
        await asyncio.to_thread(blocking.set, "k", "v")
        blocking.close()
    asked = tokens.requests
    await asyncio.sleep(PAST_AN_EARLY_REFRESH)
    assert tokens.requests == asked, f"{tokens.requests - asked} tokens asked for after close"


async def test_new_connections_sign_in_with_the_token_held_without_asking_for_one(
    entra_redis: tuple[Settings, ExpiringTokens],
) -> None:
    """A pool growing under load signs each new connection in with the client's valid
    token: the identity endpoint is asked once, not once per connection (out of reach
    meanwhile, it would fail connections while a valid token is at hand)."""
    settings, tokens = entra_redis
    client = create_redis_client(settings)
    try:
        await client.set("k", "v")
        asked = tokens.requests
        # Blocking reads hold their connections: eight at once need eight connections.
        await asyncio.gather(*(client.blpop([f"none-{n}"], timeout=0.2) for n in range(8)))
        assert len(client.connection_pool._available_connections) >= 8
        assert tokens.requests == asked, f"{tokens.requests - asked} tokens asked for"
    finally:
        await client.aclose()


async def test_the_refresh_does_not_wait_for_the_event_loops_default_executor(
    entra_redis: tuple[Settings, ExpiringTokens], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's other `asyncio.to_thread` work (blocking calls, a stuck one) can fill the
    loop's default executor: the token refresh must not queue behind it, or every
    connection of the client outlives its token."""
    settings, tokens = entra_redis
    monkeypatch.setattr(redis_client, "ENTRA_REFRESH_RATIO", EARLY_REFRESH_RATIO)
    client = create_redis_client(settings)
    release = threading.Event()
    loop = asyncio.get_running_loop()
    busy = [loop.run_in_executor(None, release.wait) for _ in range(64)]
    try:
        await client.set("k", "v")
        asked = tokens.requests
        await asyncio.sleep(PAST_AN_EARLY_REFRESH)
        assert tokens.requests > asked, "the refresh waited for the default executor"
        assert tokens.expire() == 0, "a connection outlived its token"
        await client.set("k", "v2")
    finally:
        release.set()
        await asyncio.gather(*busy)
        await client.aclose()


def test_the_blocking_client_signs_in_on_a_thread_running_another_loop(
    entra_redis: tuple[Settings, ExpiringTokens], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saver's sync API runs on its caller's thread, which may be running an event
    loop of its own (a sync graph called from async code): the blocking client's first
    command there signs in and answers, and its token is refreshed."""
    settings, tokens = entra_redis
    monkeypatch.setattr(redis_client, "ENTRA_REFRESH_RATIO", EARLY_REFRESH_RATIO)
    blocking = create_blocking_redis_client(settings)
    answers: list[Any] = []

    async def sync_call_inside_a_loop() -> None:
        answers.append(blocking.set("k", "v"))

    thread = threading.Thread(target=asyncio.run, args=(sync_call_inside_a_loop(),), daemon=True)
    thread.start()
    thread.join(5)
    try:
        assert not thread.is_alive(), "the first command hung"
        assert answers == [True]
        time.sleep(PAST_AN_EARLY_REFRESH)  # the loop that thread ran is gone by now
        assert len(tokens.issued) >= 2, "the token was not refreshed"
        assert blocking.set("k", "w")
    finally:
        blocking.close()


async def test_the_backends_redis_pools_share_one_token_refresh(
    entra_redis: tuple[Settings, ExpiringTokens],
    stack_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hot tier's pools apart (commands, the event streams' waiting reads, the health
    probe) each built an Entra ID token source and refresh of its own: the identity
    endpoint asked once per pool for each token. One serves them all, and each pool signs
    its own connections in again with every new token."""
    settings, tokens = entra_redis
    monkeypatch.setattr(redis_client, "ENTRA_REFRESH_RATIO", EARLY_REFRESH_RATIO)
    settings = settings.model_copy(update={"postgres_url": SecretStr(stack_env["POSTGRES_URL"])})
    admin = redis.Redis(host="127.0.0.1", port=settings.redis_port, password="admin")

    def signed_in() -> set[str]:
        users = {client["user"] for client in admin.client_list()}
        return users - {"default"}

    try:
        async with backends_for(settings) as backends:
            assert backends.hot is not None and backends.events is not None
            await backends.events.append("t", {"n": 1})
            assert await backends.events.read("t", wait_ms=10) != []
            assert (await backends.hot.health()).up
            assert tokens.requests == 1, f"{tokens.requests} token requests for one token"
            first = tokens.issued[-1].try_get("oid")
            assert signed_in() == {first}
            for _ in range(500):
                if len(tokens.issued) >= 2:
                    break
                await asyncio.sleep(0.02)
            assert len(tokens.issued) >= 2, "the token was not refreshed"
            newest = tokens.issued[-1].try_get("oid")
            # Every pool's connections: the commands', the waiting reads', the probe's.
            for _ in range(250):
                if signed_in() == {newest}:
                    break
                await asyncio.sleep(0.02)
            assert signed_in() == {newest}
            # The refresh asked for the new token once, for every pool.
            assert tokens.requests == len(tokens.issued)
    finally:
        admin.close()


async def test_a_client_sharing_tokens_closed_leaves_the_others_refresh_running(
    entra_redis: tuple[Settings, ExpiringTokens], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiting reads' client closes first (the backends close in reverse order): the
    refresh it shares goes on for the commands' client, and ends with it."""
    settings, tokens = entra_redis
    monkeypatch.setattr(redis_client, "ENTRA_REFRESH_RATIO", EARLY_REFRESH_RATIO)
    client = create_redis_client(settings)
    waiting = create_redis_client(settings, max_connections=2, sharing=client)
    try:
        await client.set("k", "v")
        await waiting.get("k")
        await waiting.aclose()
        asked = tokens.requests
        await asyncio.sleep(PAST_AN_EARLY_REFRESH)
        assert tokens.requests > asked, "the refresh ended with the first client closed"
        assert tokens.expire() == 0, "a connection outlived its token"
        await client.set("k", "v2")
    finally:
        await client.aclose()
    asked = tokens.requests
    await asyncio.sleep(PAST_AN_EARLY_REFRESH)
    assert tokens.requests == asked, f"{tokens.requests - asked} tokens asked for after close"
