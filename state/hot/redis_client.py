"""Builds the Redis clients from settings (a URL locally, Entra ID in Azure): redis.asyncio's,
and a blocking one for the saver's sync write-behind appends; names their keys; and sends
the hot path's commands in lean round trips (`round_trip`, `run_script`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import hiredis
import redis
import redis.asyncio as aioredis
import redis.connection
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.auth.err import RequestTokenErr
from redis.auth.idp import IdentityProviderInterface
from redis.auth.token import TokenInterface
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.credentials import StreamingCredentialProvider
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as BlockingRetry
from redis.typing import EncodableT

from ..errors import SettingsError
from ..settings import ColdBackend, Settings

log = logging.getLogger(__name__)

REDIS_ENTRA_SCOPE = "https://redis.azure.com/.default"
POSTGRES_DEFAULT_PORT = "5432"
NAMESPACE_CHARS = 10

# Values a script passes to one command at most: Lua's `unpack` fails past its C stack limit
# (LUAI_MAXCSTACK, 8000 values), and some go to a command's leading arguments (a log entry's
# head). Even, so a hash field and its value share a command.
LUA_SLICE = 7000
# `sliced(command, key, args, first, last)`: `redis.call(command, key, args[first..last])`,
# as one command per LUA_SLICE values past that (in the same script, so as atomic). The
# replies are joined (HMGET's tables) or added up (integers: HSET, HDEL, DEL, XDEL).
LUA_SLICED = f"""
local function sliced(command, key, args, first, last)
  first, last = first or 1, last or #args
  if last - first < {LUA_SLICE} then return redis.call(command, key, unpack(args, first, last)) end
  local joined = nil
  for start = first, last, {LUA_SLICE} do
    local reply = redis.call(command, key, unpack(args, start, math.min(start + {LUA_SLICE - 1}, last)))
    if type(reply) == 'table' then
      joined = joined or {{}}
      for i = 1, #reply do joined[#joined + 1] = reply[i] end
    else
      joined = (joined or 0) + reply
    end
  end
  return joined
end
"""


def hot_key(thread_id: str, kind: str, *, namespace: str) -> str:
    """`{thread_id}:<namespace>:<kind>`.

    The hash tag `{thread_id}` puts every key of a thread on one cluster slot; the
    namespace (see `hot_namespace`) keeps apart cold stores that share one Redis.
    A thread id that is empty or holds a `}` is replaced by its digest, and its keys
    read `{<digest>}}:...`: raw, a leading `}` (or none) empties the tag, so Redis
    would hash each whole key to its own slot (CROSSSLOT in a cluster), and one
    inside lets two threads spell the same key ("a" with checkpoint namespace "b}:<ns>:cp4:c"
    is "a}:<ns>:cp4:b" with "c"). The doubled `}` keeps the two forms apart: a raw
    id has none, so its tag is followed by `:`.
    """
    if thread_id and "}" not in thread_id:
        return f"{{{thread_id}}}:{namespace}:{kind}"
    digest = hashlib.sha256(thread_id.encode()).hexdigest()
    return f"{{{digest}}}}}:{namespace}:{kind}"


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


# How long a command waits for one of the pool's connections when all are in use (a burst
# past REDIS_MAX_CONNECTIONS) before it fails as the tier's: under the socket timeout, so a
# full pool fails no slower than a Redis that does not answer.
POOL_WAIT_SECONDS = 1.0


# The health probe's pool (`RedisHotStore`'s `probe_client`): connections of its own, so a
# burst that holds every connection of the commands' pool is not reported as Redis down.
# Two: probes rarely overlap (a probe is one round trip), and then seldom wait.
PROBE_CONNECTIONS = 2


def create_redis_client(
    settings: Settings,
    *,
    max_connections: int | None = None,
    sharing: aioredis.Redis | None = None,
) -> aioredis.Redis:
    """The async client, its pool holding at most `max_connections` connections
    (REDIS_MAX_CONNECTIONS by default): a pool apart for the waiting reads (XREAD BLOCK,
    REDIS_MAX_WAITING_READS) and the health probe (PROBE_CONNECTIONS). `sharing`: a client
    of this process whose Entra ID tokens this one signs in with, one refresh for both."""
    kwargs = {
        **_client_kwargs(settings),
        "retry": Retry(_backoff(), retries=1),
        "max_connections": max_connections or settings.redis_max_connections,
    }
    if settings.redis_url is None:
        shared = sharing.connection_pool if sharing is not None else None
        tokens = (
            shared.tokens if isinstance(shared, _EntraConnectionPool) else _entra_tokens(settings)
        )
        return _EntraRedis.from_pool(_EntraConnectionPool(tokens, settings, kwargs))
    pool = _WaitingConnectionPool.from_url(settings.redis_url.get_secret_value(), **kwargs)
    pool.connection_class = _BOUNDED_SENDS.get(pool.connection_class, pool.connection_class)
    return aioredis.Redis.from_pool(pool)


# --------------------------------------------------------------------------- failing fast


# After a command to a server timed out, commands to it fail at once for this long; then
# one caller at a time is let through to probe it (for at most PROBE_SECONDS, which covers
# the socket timeout and the client's retry), the others still failing at once. An answer
# closes the circuit, another timeout opens it again.
FAIL_FAST_SECONDS = 0.5
PROBE_SECONDS = 5.0
# The client's retry of the call that timed out (after its backoff, at most 0.2 s) goes
# ahead: for a call whose reply was lost, the retry is how its caller learns the outcome
# (a lock taken twice with one token holds it, `acquire_lock`).
RETRY_GRACE_SECONDS = 0.5


class ServerCircuit:
    """Whether a Redis server timed out lately (frozen, failing over, cut off): every
    caller of the hot tier has a way on without it (the cold tier), but each would first
    wait out the socket timeout, twice with the client's retry. Measured before this: a
    4-node invoke took 28-65 s while the server was frozen. A refused connection fails
    at once anyway, so only timeouts open it. Shared by every client of the process
    (async and blocking) that talks to the server."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.open_until = 0.0  # monotonic; 0 while closed
        self._prober: object | None = None
        self._probe_until = 0.0
        # Connections whose call timed out: until when its retry goes ahead (0 once used).
        self._graces: dict[object, float] = {}

    def check(self, connection: object) -> None:
        """Raises `ServerTimedOutLately` unless the circuit is closed or `connection` may
        go ahead: it retries the call that timed out, or probes the server."""
        if not self.open_until:
            return
        now = time.monotonic()
        if self._graces.get(connection, 0.0) > now:
            return
        if now >= self.open_until:
            if self._prober is connection and now < self._probe_until:
                return
            if now >= self._probe_until:
                self._prober, self._probe_until = connection, now + PROBE_SECONDS
                return
        rest = max(self.open_until, self._probe_until) - now
        raise ServerTimedOutLately(
            f"Redis at {self.address} timed out lately: not tried again for {rest:.1f} s",
            rest=rest,
        )

    def timed_out(self, connection: object) -> None:
        now = time.monotonic()
        self.open_until = now + FAIL_FAST_SECONDS
        self._prober, self._probe_until = None, 0.0
        # Once: its retry timing out too (or, pooled, its next call) gets none.
        self._graces[connection] = 0.0 if connection in self._graces else now + RETRY_GRACE_SECONDS

    def answered(self) -> None:
        if self.open_until:
            self.open_until = 0.0
            self._prober, self._probe_until = None, 0.0
            self._graces.clear()


class ServerTimedOutLately(RedisError):
    """Not sent: the server timed out lately (`ServerCircuit`). Not a `ConnectionError`,
    which the client's `Retry` would retry after a backoff: nothing is gained by it.
    `rest`: seconds until a call may be sent again (as the probe)."""

    def __init__(self, message: str, *, rest: float) -> None:
        super().__init__(message)
        self.rest = rest


_CIRCUITS: dict[str, ServerCircuit] = {}


def circuit_for(host: str, port: int) -> ServerCircuit:
    address = f"{host}:{port}"
    circuit = _CIRCUITS.get(address)
    if circuit is None:
        circuit = _CIRCUITS.setdefault(address, ServerCircuit(address))
    return circuit


class _FailFast(AbstractConnection):
    """Sends through the server's `ServerCircuit`: refused while it is open, and a
    timeout (connecting, sending, or reading with the socket timeout) opens it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._circuit = circuit_for(getattr(self, "host", ""), getattr(self, "port", 0))

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        self._circuit.check(self)
        try:
            await super().connect_check_health(
                check_health=check_health, retry_socket_connect=retry_socket_connect
            )
        except RedisTimeoutError:
            self._circuit.timed_out(self)
            raise

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        self._circuit.check(self)
        try:
            await super().send_packed_command(command, check_health)
        except RedisTimeoutError:
            self._circuit.timed_out(self)
            raise

    async def read_response(
        self,
        disable_decoding: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 (redis-py's signature)
        *,
        disconnect_on_error: bool = True,
        push_request: bool | None = False,
    ) -> Any:
        try:
            response = await super().read_response(
                disable_decoding,
                timeout,
                disconnect_on_error=disconnect_on_error,
                push_request=push_request,
            )
        except RedisTimeoutError:
            if timeout is None:  # the socket timeout, not a wait the caller chose
                self._circuit.timed_out(self)
            raise
        except ResponseError:
            self._circuit.answered()  # an error reply is an answer
            raise
        self._circuit.answered()
        return response


class _BlockingFailFast(redis.connection.AbstractConnection):
    """`_FailFast` for the blocking client."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._circuit = circuit_for(getattr(self, "host", ""), getattr(self, "port", 0))

    def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        self._circuit.check(self)
        try:
            super().connect_check_health(
                check_health=check_health, retry_socket_connect=retry_socket_connect
            )
        except RedisTimeoutError:
            self._circuit.timed_out(self)
            raise

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self._circuit.check(self)
        try:
            super().send_packed_command(command, check_health)
        except RedisTimeoutError:
            self._circuit.timed_out(self)
            raise

    def read_response(self, disable_decoding: bool = False, **kwargs: Any) -> Any:
        try:
            response = super().read_response(disable_decoding, **kwargs)
        except RedisTimeoutError:
            if "timeout" not in kwargs:  # the socket timeout, not a wait the caller chose
                self._circuit.timed_out(self)
            raise
        except ResponseError:
            self._circuit.answered()  # an error reply is an answer
            raise
        self._circuit.answered()
        return response


class _SendBoundedInPlace(AbstractConnection):
    """redis-py's send, changed in two ways. Bounded by `asyncio.timeout`, not
    `asyncio.wait_for`, which on Python 3.11 runs every send as a task of its own: ~19 µs
    of a 104 µs round trip (measured), paid by every command the hot tier sends. And a
    send that fails or is cancelled part way aborts the connection: closing it (what the
    library does) first flushes what is still buffered, so a command its caller saw fail
    would still run once a stalled server reads again."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        if not self.is_connected:
            await self.connect_check_health(check_health=False)
        if check_health:
            await self.check_health()
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        writer = self._writer
        assert writer is not None  # connected above
        try:
            async with asyncio.timeout(self.socket_timeout):
                writer.writelines(command)
                await writer.drain()
        except BaseException as exc:
            writer.transport.abort()
            await self.disconnect(nowait=True)
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError("Timeout writing to socket") from None
            if isinstance(exc, OSError):
                raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
            raise


class _BoundedSendConnection(_FailFast, _SendBoundedInPlace, Connection):
    pass


class _BoundedSendSSLConnection(_FailFast, _SendBoundedInPlace, SSLConnection):
    pass


_BOUNDED_SENDS: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _BoundedSendConnection,
    SSLConnection: _BoundedSendSSLConnection,
}


class _FailFastBlockingConnection(_BlockingFailFast, redis.connection.Connection):
    pass


class _FailFastBlockingSSLConnection(_BlockingFailFast, redis.connection.SSLConnection):
    pass


_BLOCKING_FAIL_FAST: dict[type[Any], type[Any]] = {
    redis.connection.Connection: _FailFastBlockingConnection,
    redis.connection.SSLConnection: _FailFastBlockingSSLConnection,
}


def create_blocking_redis_client(settings: Settings) -> redis.Redis:
    """The same server and options for callers without an event loop (the saver's sync
    write-behind appends, made on the caller's own thread)."""
    kwargs = {
        **_client_kwargs(settings),
        "retry": BlockingRetry(_backoff(), retries=1),
        # Past it, a command fails at once (typed, as the tier's): its callers are threads.
        "max_connections": settings.redis_max_connections,
    }
    if settings.redis_url is not None:
        client = redis.Redis.from_url(settings.redis_url.get_secret_value(), **kwargs)
    else:
        address: dict[str, Any] = {"host": settings.redis_host, "port": settings.redis_port}
        client = _BlockingEntraRedis(
            **address, ssl=settings.redis_ssl, credential_provider=_entra_tokens(settings), **kwargs
        )
    pool = client.connection_pool
    pool.connection_class = _BLOCKING_FAIL_FAST.get(pool.connection_class, pool.connection_class)
    return client


def _client_kwargs(settings: Settings) -> dict[str, Any]:
    if settings.redis_url is None and not settings.redis_host:
        raise SettingsError("no hot tier configured: set REDIS_URL or REDIS_HOST")
    # Short timeouts: the hot tier is an optimisation, a slow Redis must not stall the app.
    return {"socket_timeout": 2.0, "socket_connect_timeout": 2.0, "health_check_interval": 30}


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=0.2, base=0.02)


# A token is refreshed once this share of the life it had left when it came has passed
# (redis-entraid's default). azure-identity and MSAL hand back their cached token until
# it is due (5 minutes before an hour's token expires): the new one may come only then.
ENTRA_REFRESH_RATIO = 0.7
# How long after a failed token refresh it is tried again.
ENTRA_REFRESH_RETRY_SECONDS = 10.0


class NoAccessToken(RedisError):
    """No Entra ID token to sign a new connection in with (no identity found, the identity
    endpoint down). A `RedisError`, so the tier reports itself unavailable and redis-py
    closes the connection it opened (any other error left it open, never signed in). Not a
    `ConnectionError`, which the client's `Retry` would ask the identity endpoint again for."""


class EntraTokens(StreamingCredentialProvider):
    """Entra ID tokens for Redis clients from redis-entraid's identity provider
    (azure-identity or MSAL), refreshed before they expire: one for the async clients of
    a process (their pools apart, `create_redis_client`'s `sharing`), each of their pools
    signing its own connections in again; the blocking client has its own. In place of
    redis-entraid's token manager, which
    - asks the identity endpoint on the event loop: a managed identity endpoint taking
      2 s stalled every call of the hot tier, and timed them out (measured);
    - keeps refreshing once its client is closed (a timer no close reaches, holding the
      credential and the client);
    - deadlocks a blocking client first used on a thread running an event loop: it
      waits there for its first refresh, scheduled on that very loop;
    - ends the refresh for the life of the client after one failed one (redis-py's error
      callback only raises): no connection is signed in again, and Azure drops each when
      its token expires.
    The async client's refresh is a task on its loop, the blocking client's a thread;
    `stop` (closing the client) ends either."""

    def __init__(self, identity: IdentityProviderInterface) -> None:
        self.identity = identity  # redis-entraid's: azure-identity or MSAL
        # Each client's pool signs its connections in again with a new token.
        self._on_next: list[Callable[[TokenInterface], Any]] = []
        self._refresh: asyncio.Task[None] | threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopped = threading.Event()
        self._current: TokenInterface | None = None
        # A thread of its own for the identity endpoint, not the loop's default executor:
        # the app's other blocking work filling that would hold back the refresh (and the
        # first sign-in) until the connections outlive their token.
        self._caller = ThreadPoolExecutor(max_workers=1, thread_name_prefix="entra-token")

    def on_next(self, callback: Callable[[TokenInterface], Any]) -> None:
        self._on_next.append(callback)

    def leave(self, callback: Callable[[TokenInterface], Any]) -> None:
        """A client closed: its pool takes no more tokens; the refresh ends with the last."""
        if callback in self._on_next:
            self._on_next.remove(callback)
        if not self._on_next:
            self.stop()

    def on_error(self, callback: Callable[[Exception], Any]) -> None:
        """Not called: a failed refresh is tried again here instead."""

    def is_streaming(self) -> bool:
        return self._refresh is not None

    def _held(self) -> TokenInterface | None:
        """The token last obtained, while it is valid: a new connection signs in with it
        without asking the identity endpoint (out of reach meanwhile, it would fail the
        connection while a valid token is at hand)."""
        token = self._current
        return token if token is not None and not token.is_expired() else None

    def _obtained(self, token: TokenInterface) -> TokenInterface:
        self._current = token
        return token

    def _requested(self, token: Callable[[], TokenInterface]) -> TokenInterface:
        """`token()`, kept; a failure to get one as `NoAccessToken`."""
        try:
            return self._obtained(token())
        except RequestTokenErr as error:
            lines = str(error).splitlines()
            raise NoAccessToken(f"no access token: {lines[0] if lines else error!r}") from error

    def get_credentials(self) -> tuple[str, str]:
        token = self._held() or self._requested(self.identity.request_token)
        with self._start_lock:
            if self._refresh is None and not self._stopped.is_set():
                self._refresh = threading.Thread(
                    target=self._refresh_blocking, args=(token,), name="entra-refresh", daemon=True
                )
                self._refresh.start()
        return _entra_credentials(token)

    async def get_credentials_async(self) -> tuple[str, str]:
        token = self._held() or await self._off_loop(
            lambda: self._requested(self.identity.request_token)
        )
        if self._refresh is None and not self._stopped.is_set():
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_async(token))
        return _entra_credentials(token)

    async def _off_loop(self, call: Callable[[], TokenInterface]) -> TokenInterface:
        return await asyncio.get_running_loop().run_in_executor(self._caller, call)

    def stop(self) -> None:
        self._stopped.set()
        self._caller.shutdown(wait=False)
        refresh = self._refresh
        if isinstance(refresh, asyncio.Task) and not refresh.done():
            # RuntimeError: its loop is closed, the task went with it.
            with contextlib.suppress(RuntimeError):
                refresh.get_loop().call_soon_threadsafe(refresh.cancel)

    async def _refresh_async(self, token: TokenInterface) -> None:
        delay = _refresh_in(token)
        while True:
            await asyncio.sleep(delay)
            try:
                token = await self._off_loop(self._new_token)
                if self._stopped.is_set():
                    return
                failures = [
                    await _hand_over_async(callback, token) for callback in tuple(self._on_next)
                ]
                _raise_first(failures)
            # Whatever failed (the identity endpoint, signing a connection in), the refresh
            # must go on: it alone keeps the connections signed in.
            except Exception as error:
                log.warning("Entra ID token refresh for Redis failed: %r", error)
                delay = ENTRA_REFRESH_RETRY_SECONDS
            else:
                delay = _refresh_in(token)

    def _refresh_blocking(self, token: TokenInterface) -> None:
        delay = _refresh_in(token)
        while not self._stopped.wait(delay):
            try:
                token = self._new_token()
                failures = [_hand_over(callback, token) for callback in tuple(self._on_next)]
                _raise_first(failures)
            except Exception as error:  # as in `_refresh_async`
                log.warning("Entra ID token refresh for Redis failed: %r", error)
                delay = ENTRA_REFRESH_RETRY_SECONDS
            else:
                delay = _refresh_in(token)

    def _new_token(self) -> TokenInterface:
        token = self.identity.request_token(force_refresh=True)
        if token.is_expired():
            raise RequestTokenErr("the identity provider handed out an expired token")
        return self._obtained(token)


# Each pool is handed every new token, whatever another pool's signing in did: one
# pool's failure (its retry comes sooner) must not leave the others on the old token.
async def _hand_over_async(
    callback: Callable[[TokenInterface], Awaitable[Any]], token: TokenInterface
) -> Exception | None:
    try:
        await callback(token)
    except Exception as error:
        return error
    return None


def _hand_over(
    callback: Callable[[TokenInterface], Any], token: TokenInterface
) -> Exception | None:
    try:
        callback(token)
    except Exception as error:
        return error
    return None


def _raise_first(failures: list[Exception | None]) -> None:
    for failure in failures:
        if failure is not None:
            raise failure


def _refresh_in(token: TokenInterface) -> float:
    """Seconds until `token` is refreshed. A share of the life it has left, not of its
    whole life: a credential may hand back a cached token already part used."""
    return ENTRA_REFRESH_RATIO * max(token.ttl(), 0.0) / 1000


def _entra_credentials(token: TokenInterface) -> tuple[str, str]:
    return token.try_get("oid"), token.get_value()


class _EntraRedis(aioredis.Redis):
    """Once closed, takes no more tokens: the last of the clients sharing them ends their
    refresh."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool = self.connection_pool
        if isinstance(pool, _EntraConnectionPool):
            pool.tokens.leave(pool.re_auth_callback)
        await super().aclose(close_connection_pool)


class _BlockingEntraRedis(redis.Redis):
    """Ends its token refresh once closed."""

    def close(self) -> None:
        provider = self.connection_pool.connection_kwargs.get("credential_provider")
        if isinstance(provider, EntraTokens):
            provider.stop()
        super().close()


def _entra_tokens(settings: Settings) -> EntraTokens:
    from redis_entraid.cred_provider import (
        create_from_default_azure_credential,
        create_from_managed_identity,
    )
    from redis_entraid.identity_provider import ManagedIdentityIdType, ManagedIdentityType

    # The user-assigned identity when its client id is known, else the default chain.
    try:
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
    except ValueError as exc:
        # The SDK reads the AZURE_* variables here (an unknown AZURE_TOKEN_CREDENTIALS, a
        # malformed AZURE_TENANT_ID): the operator's to fix, not a crash on every request.
        raise SettingsError(
            "REDIS_URL is unset and no Entra credential can be built from the AZURE_*"
            f" variables: {exc}"
        ) from exc
    # Its identity provider only: `EntraTokens` replaces its token manager.
    return EntraTokens(provider._idp)


class _WaitingConnectionPool(aioredis.ConnectionPool):
    """redis-py's pool, where a command finding every connection in use waits up to
    POOL_WAIT_SECONDS for one given back (redis-py's refuses it at once). Not redis-py's
    BlockingConnectionPool: it costs every command a condition and a timer (~20 us, an
    eighth of a local GET), where this one costs only the commands that wait."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        try:
            return await super().get_connection(*args, **kwargs)
        except MaxConnectionsError:
            pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + POOL_WAIT_SECONDS
        while True:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                self._pass_on(waiter)
                raise RedisConnectionError("No connection available.") from None
            except asyncio.CancelledError:
                self._pass_on(waiter)
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            try:
                return await super().get_connection(*args, **kwargs)
            except MaxConnectionsError:
                continue  # taken by a caller that did not wait: wait for the next

    async def release(self, connection: AbstractConnection) -> None:
        await super().release(connection)
        self._wake(1)

    def _pass_on(self, waiter: asyncio.Future[None]) -> None:
        """A caller woken for a connection given back, then cancelled (an event stream's
        client gone) or out of time before it took it: the wake goes to the next waiter,
        which would otherwise wait out POOL_WAIT_SECONDS, the connection idle."""
        if waiter.done() and not waiter.cancelled():
            self._wake(1)

    def _wake(self, count: int) -> None:
        """Tell up to `count` waiting callers a connection is back."""
        while count and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1


class _EntraConnectionPool(_WaitingConnectionPool):
    """The async client's pool, signing its connections in again with each new token.

    redis-py's async pool signs a connection that was in use when the token came in
    again after its release has put it back in the pool: a caller taking it meanwhile
    shares it with that AUTH, and one of the two fails (the SSE stream's XREAD, nearly
    always in use, failed so at a refresh). Here the connection is signed in before its
    release puts it back, and the idle ones are taken out of the pool while they are: a
    caller finding the pool full meanwhile waits for them (as for any connection of a
    full pool, up to POOL_WAIT_SECONDS), rather than be refused."""

    def __init__(self, tokens: EntraTokens, settings: Settings, kwargs: dict[str, Any]) -> None:
        super().__init__(
            connection_class=(
                _BoundedSendSSLConnection if settings.redis_ssl else _BoundedSendConnection
            ),
            host=settings.redis_host,
            port=settings.redis_port,
            credential_provider=tokens,
            # No protocol, as the URL client (local, CI) has it: redis-py's default, RESP3
            # with maintenance notifications; RESP2 here ran in Azure alone.
            **kwargs,
        )
        self.tokens = tokens
        self._newest_token: TokenInterface | None = None
        self._to_sign_in: weakref.WeakSet[AbstractConnection] = weakref.WeakSet()
        tokens.on_next(self.re_auth_callback)

    async def re_auth_callback(self, token: TokenInterface) -> None:
        async with self._lock:
            self._newest_token = token
            idle = list(self._available_connections)
            self._available_connections.clear()
            # Counted in use meanwhile: closing the pool still closes them.
            self._in_use_connections.update(idle)
            self._to_sign_in.update(self._in_use_connections)
        try:
            for connection in idle:
                await self._sign_in_again(connection)
        finally:
            async with self._lock:
                self._in_use_connections.difference_update(idle)
                self._available_connections.extend(idle)
            # Callers that found the pool full meanwhile wait for these.
            self._wake(len(idle))

    async def release(self, connection: AbstractConnection) -> None:
        try:
            await self._sign_in_again(connection)
        finally:
            await super().release(connection)

    async def _sign_in_again(self, connection: AbstractConnection) -> None:
        if connection not in self._to_sign_in:
            return
        self._to_sign_in.discard(connection)
        token = self._newest_token
        if token is None or not connection.is_connected:
            return  # it signs in with the newest token when it connects
        try:
            await connection.send_command("AUTH", *_entra_credentials(token))
            await connection.read_response()
        # Not signed in with the new token, it must not outlive the old one, nor pass an
        # AUTH reply to its next caller: connecting again signs it in with the newest.
        except (RedisError, OSError):
            await connection.disconnect()
        except BaseException:  # cancelled
            await connection.disconnect(nowait=True)
            raise


# --------------------------------------------------------------------------- round trips

Command = Sequence[EncodableT]


async def round_trip(
    client: aioredis.Redis,
    commands: Sequence[Command],
    *,
    resend: bool = True,
    wait_seconds: float = 0.0,
) -> list[Any]:
    """The commands in one round trip on one of the client's pooled connections; the
    server's replies in order, as sent (no response callbacks: HGETALL is a map under
    RESP3, a flat list under RESP2).

    What a non-transactional pipeline does without its per-call bookkeeping, which cost
    ~55 µs of a 220 µs two-command append (measured against the same connection pool),
    and packed by hiredis (the same bytes as redis-py's packer, ~7x faster: 69 -> 10 µs
    for an append's commands). An error reply is raised once every reply is read, so the
    connection stays in step; a lost connection is retried as the client's own commands
    are (its `Retry`), unless `resend` is False: a batch that is not safe to run twice (a
    lost reply or a timeout leaves it unknown whether it ran) is then not sent again, the
    error is raised.

    `wait_seconds`: how long a blocking command among them (`XREAD BLOCK`) may wait at the
    server, by its caller's choice. Its reply is read for that long past the socket
    timeout: within the socket timeout, a server answering every command in under a
    second would time such a read out, and the timeout would open the server's circuit
    (`ServerCircuit`) for every caller. A read that outlasts both fails typed all the
    same, without opening it (as any wait the caller chose)."""
    pool = client.connection_pool
    connection = await pool.get_connection()
    socket_timeout = connection.socket_timeout
    read_timeout = socket_timeout + wait_seconds if wait_seconds and socket_timeout else None
    try:

        async def reply() -> Any:
            if read_timeout is None:
                return await connection.read_response()
            # Not redis-py's own `timeout`: past it, redis-py answers None (a blocking read's
            # "nothing came") and leaves the connection, its reply still to come, to the
            # next command on it, which read that reply as its own (another case's events).
            # Cancelled, the read drops the connection; it fails typed, and opens no circuit.
            try:
                async with asyncio.timeout(read_timeout):
                    return await connection.read_response(timeout=math.inf)
            except TimeoutError:
                raise RedisTimeoutError(f"no reply within {read_timeout:g} s") from None

        async def exchange() -> list[Any]:
            await connection.send_packed_command([_packed(commands)])
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await reply())
                except ResponseError as error:
                    replies.append(error)
            _raise_first_error(replies)
            return replies

        async def reset(_error: Exception) -> None:
            await connection.disconnect()

        if not resend:
            if await connection.can_read():
                # Closed by the server while idle in the pool (a restart, a failover, an
                # idle timeout), or holding bytes nobody asked for: the pool skips that
                # check while maintenance notifications are on. Nothing was sent on it, so
                # the batch goes on a new connection (sending connects it again).
                await connection.disconnect()
            try:
                return await exchange()
            except (RedisConnectionError, RedisTimeoutError, OSError):
                await connection.disconnect()  # unread replies must not reach the next caller
                raise
        return await connection.retry.call_with_retry(exchange, reset)
    finally:
        await pool.release(connection)


def round_trip_blocking(
    client: redis.Redis, commands: Sequence[Command], *, resend: bool = True
) -> list[Any]:
    """`round_trip` for callers without an event loop."""
    pool = client.connection_pool
    connection = pool.get_connection()
    try:

        def exchange() -> list[Any]:
            connection.send_packed_command([_packed(commands)])
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except ResponseError as error:
                    replies.append(error)
            _raise_first_error(replies)
            return replies

        if not resend:
            try:
                return exchange()
            except (RedisConnectionError, RedisTimeoutError, OSError):
                connection.disconnect()
                raise
        return connection.retry.call_with_retry(exchange, lambda _error: connection.disconnect())
    finally:
        pool.release(connection)


def _packed(commands: Sequence[Command]) -> bytes:
    # hiredis's stub types the argument as a one-element tuple.
    return b"".join([hiredis.pack_command(tuple(command)) for command in commands])  # type: ignore[arg-type]


def _raise_first_error(replies: list[Any]) -> None:
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply


def script_call(script: AsyncScript, keys: Sequence[str], args: Sequence[EncodableT]) -> Command:
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


async def run_script(
    client: aioredis.Redis, script: AsyncScript, keys: Sequence[str], args: Sequence[EncodableT]
) -> Any:
    """A registered script in one lean round trip; loaded again if the server lost it
    (a restart, a failover), as `AsyncScript.__call__` does."""
    try:
        [reply] = await round_trip(client, [script_call(script, keys, args)])
    except NoScriptError:
        script.sha = await client.script_load(script.script)
        [reply] = await round_trip(client, [script_call(script, keys, args)])
    return reply
