"""One Postgres connection pool per app, shared by every Postgres adapter.

Connects with POSTGRES_URL locally or, in Azure, to POSTGRES_HOST as
POSTGRES_USER with a Microsoft Entra access token as the password (fetched
afresh for every new connection, since tokens expire and a pooled connection
outlives many of them). Runs the schema migrations once in `setup()`, maps
transport failures and pool timeouts to `BackendUnavailable` and the server's refusals to
the library's typed errors, refuses JSON that jsonb cannot hold (a NUL character) as
`InvalidValue` before sending it, and counts the statements sent for the benchmark and
the O(1) tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import selectors
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Self, cast

import certifi
import psycopg
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError
from psycopg import AsyncConnection, AsyncCursor, AsyncRawCursor, DataError, OperationalError
from psycopg.abc import RV, Params, PQGen, Query, QueryNoTemplate
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.errors import ReadOnlySqlTransaction
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import set_json_dumps
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolClosed

from ..errors import (
    BackendClosed,
    BackendUnavailable,
    InvalidValue,
    NoAnswer,
    RequestRejected,
    SettingsError,
    StateError,
)
from ..ports import Counters
from ..settings import PostgresConfig
from ..size import NUL_ESCAPE
from .circuit import AnswerCircuit
from .migrations import migrate

ENTRA_SCOPE = "https://ossrdbms-aad.database.windows.net/.default"
POSTGRES_PORT = 5432
# For a sign-in whose password is an Entra token: a server that cannot prove it is the
# named host (a spoofed DNS record, a taken-over address) must not receive the token.
# Azure's roots (DigiCert Global Root G2, Microsoft RSA Root CA 2017) are in the Mozilla
# bundle certifi ships.
VERIFIED_TLS = {"sslmode": "verify-full", "sslrootcert": certifi.where()}
# The planner cannot tell how many rows the recursive walks of a delta history return
# (it assumes a thousand per generate_series), so their estimated cost passes
# jit_above_cost and PostgreSQL compiles a statement that runs in a millisecond: 80 ms
# with a small chunk table, over a second with a million chunks (measured). These are
# short key lookups, where JIT never pays.
DISABLE_JIT = "SET jit = off"
# How often psycopg's waits wake to let a KeyboardInterrupt through (its own default).
WAIT_INTERVAL = 0.1
# A blocking call outlasts the statement timeout by this much: a server that is alive
# ends a slow statement first, with a typed error on a usable connection.
NO_ANSWER_GRACE_SECONDS = 1.0
# How long an async call past its time asks the server to cancel its statement, which a
# silent server never does (psycopg alone would wait ten seconds for it).
CANCEL_SECONDS = 1.0
# How long the app's start may spend applying migrations, or waiting for another process
# (an instance of a newer release, the deploy hook) to finish applying them. A longer
# migration goes through the deploy hook (scripts/azd/postgres_access.py), which has no
# bound.
MIGRATION_SECONDS = 300.0
# How long after a failed first connection (`_reachable`) the next call tries again.
OPEN_RETRY_SECONDS = 1.0
# SQLSTATE class 54, program_limit_exceeded (psycopg files it under OperationalError, with
# transient trouble), and its general code: a value over a server limit (an index entry
# over btree's 2704 bytes, a jsonb value over 256 MB).
PROGRAM_LIMIT_CLASS = "54"
PROGRAM_LIMIT_EXCEEDED = "54000"


class ServerSilent(OperationalError):
    """The server did not answer in time; the connection was closed, its protocol state
    unknown."""


def _wait_bound(deadline: float | None, answer_timeout: float | None) -> float | None:
    """How long a wait for the server may last: until the operation's deadline, or, for
    the pool's own use of a connection between operations, `answer_timeout`."""
    if deadline is not None:
        return max(0.0, deadline - time.monotonic())
    return answer_timeout


def _closed_by_server(conn: psycopg.BaseConnection[Any]) -> bool:
    """Whether the server has closed an idle pooled connection: it sends an idle session
    nothing unless it is ending it (a restart, `pg_terminate_backend`, a failover: a FATAL
    message, then the close), so a readable socket means a dead connection. One local
    poll instead of psycopg_pool's `check`, a round trip on every checkout."""
    # `poll` and not a selector: one system call, where an epoll selector makes four.
    poller = select.poll()
    poller.register(conn.pgconn.socket, select.POLLIN)
    return bool(poller.poll(0))


@asynccontextmanager
async def _live_connection(
    pool: AsyncConnectionPool[CountedConnection],
) -> AsyncIterator[CountedConnection]:
    """`pool.connection()`, passing over connections the server closed while they were
    idle: nothing was sent on them, so taking another is no repeat, even of a write.
    (Not the pool's own `check` hook: each connection it fails sleeps the caller a second,
    doubling, before the next.)"""
    while True:
        conn = await pool.getconn()
        if not _closed_by_server(conn):
            break
        await conn.close()
        await pool.putconn(conn)  # discarded: the pool opens a replacement
    try:
        async with conn:
            yield conn
    finally:
        await pool.putconn(conn)


@contextmanager
def _live_blocking_connection(
    pool: ConnectionPool[CountedBlockingConnection],
) -> Iterator[CountedBlockingConnection]:
    """`_live_connection` for the blocking pool."""
    while True:
        conn = pool.getconn()
        if not _closed_by_server(conn):
            break
        conn.close()
        pool.putconn(conn)
    try:
        with conn:
            yield conn
    finally:
        pool.putconn(conn)


def _noting_reads(gen: PQGen[RV], read: list[bool]) -> PQGen[RV]:
    """`gen`, setting `read[0]` once its socket was found readable: only then did the
    server send something. A wait that only sent (a pipeline flushing its queue, a COPY
    block) heard nothing from it, whatever the kernel buffered."""
    try:
        wait = next(gen)
        while True:
            ready = yield wait  # None when psycopg resumes it after an interrupt
            if ready and ready & selectors.EVENT_READ:
                read[0] = True
            wait = gen.send(ready)
    except StopIteration as ex:
        return cast(RV, ex.value)


class CountedConnection(AsyncConnection[DictRow]):
    """A pooled connection that knows which counters and operation its statements belong
    to, and bounds each wait for the server by the operation's deadline: cancelled by the
    event loop instead, psycopg would first wait ten seconds for a silent server to
    cancel the statement."""

    counters: Counters | None = None
    operation: str = "statement"
    deadline: float | None = None  # monotonic, while an operation has the connection
    answer_timeout: float | None = None
    circuit: AnswerCircuit | None = None
    # Monotonic: when first lent, which is after the pool dated it (for its drains).
    first_lent: float = float("inf")

    async def wait(
        self,
        gen: PQGen[RV],
        interval: float = WAIT_INTERVAL,
        timeout: float | None = None,  # noqa: ASYNC109 (psycopg's signature)
    ) -> RV:
        if timeout is not None:  # a wait the caller bounded itself: its timeout is its own
            return await super().wait(gen, interval, timeout)
        read = [False]
        # What it reads answers what this wait sends, not earlier: an answer read late
        # (the event loop busy) must not count as news of the store since.
        circuit = self.circuit
        sent = circuit.now() if circuit is not None else 0.0
        try:
            result = await super().wait(
                _noting_reads(gen, read), interval, _wait_bound(self.deadline, self.answer_timeout)
            )
        except psycopg.errors._WaitTimeout as exc:  # psycopg's own, raised for `timeout`
            cancelled = circuit.now() if circuit is not None else 0.0
            try:
                await self.cancel_safe(timeout=CANCEL_SECONDS)  # a live server stops it
            except psycopg.Error:
                pass
            else:
                # The server acknowledged the cancel: alive, only slow (or waiting on a
                # lock held elsewhere), which must not open the circuit.
                if circuit is not None:
                    circuit.heard(cancelled)
            finally:
                self.pgconn.finish()
            raise ServerSilent("no answer in time") from exc
        if circuit is not None and read[0]:
            circuit.heard(sent)
        return result


class CountingCursor(AsyncCursor[DictRow]):
    """Counts each statement sent; `executemany` counts once (it is sent as one pipeline)."""

    def _count(self) -> None:
        connection = self.connection
        if isinstance(connection, CountedConnection) and connection.counters is not None:
            connection.counters.count(connection.operation)

    async def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        self._count()
        # The cast only picks the base overload; a template query passes through unchanged.
        return await super().execute(
            cast(QueryNoTemplate, query), params, prepare=prepare, binary=binary
        )

    async def executemany(self, query: Query, params_seq: Any, *, returning: bool = False) -> None:
        self._count()
        await super().executemany(query, params_seq, returning=returning)


class CountingRawCursor(CountingCursor, AsyncRawCursor[DictRow]):
    """A `CountingCursor` for statements written with the server's own placeholders (`$1`):
    psycopg sends them as they are, without parsing them first."""


class CountedBlockingConnection(psycopg.Connection[DictRow]):
    """`CountedConnection` for the blocking pool. The bound on each wait matters more
    here: no socket timeout notices a server that stops answering while its host still
    acknowledges (a paused or hung process), and no event loop bounds the caller, whose
    thread would wait for ever."""

    counters: Counters | None = None
    operation: str = "statement"
    deadline: float | None = None
    answer_timeout: float | None = None
    circuit: AnswerCircuit | None = None
    # Monotonic: when first lent, which is after the pool dated it (for its drains).
    first_lent: float = float("inf")

    def wait(
        self, gen: PQGen[RV], interval: float = WAIT_INTERVAL, timeout: float | None = None
    ) -> RV:
        if timeout is not None:  # a wait the caller bounded itself: its timeout is its own
            return super().wait(gen, interval, timeout)
        read = [False]
        circuit = self.circuit
        sent = circuit.now() if circuit is not None else 0.0  # as in `CountedConnection.wait`
        try:
            result = super().wait(
                _noting_reads(gen, read), interval, _wait_bound(self.deadline, self.answer_timeout)
            )
        except psycopg.errors._WaitTimeout as exc:  # psycopg's own, raised for `timeout`
            # Not asked to cancel: `statement_timeout` has stopped it if the server is alive.
            self.pgconn.finish()
            raise ServerSilent("no answer in time") from exc
        if circuit is not None and read[0]:
            circuit.heard(sent)  # an earlier statement of a long call answered
        return result


class CountingBlockingCursor(psycopg.Cursor[DictRow]):
    """`CountingCursor` on a blocking connection."""

    def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        connection = self.connection
        if isinstance(connection, CountedBlockingConnection) and connection.counters is not None:
            connection.counters.count(connection.operation)
        return super().execute(cast(QueryNoTemplate, query), params, prepare=prepare, binary=binary)


class CountingBlockingRawCursor(CountingBlockingCursor, psycopg.RawCursor[DictRow]):
    """`CountingRawCursor` on a blocking connection."""


class PostgresConnection:
    """Lazily opened pool; safe to share between adapters in one event loop."""

    name = "postgres"

    def __init__(
        self,
        config: PostgresConfig,
        *,
        credential: AsyncTokenCredential | None = None,
    ) -> None:
        """`credential`: sign in with its Entra tokens (the caller closes it). Without
        one, POSTGRES_URL carries any password, or else DefaultAzureCredential is used."""
        self._config = config
        self._pool: AsyncConnectionPool[CountedConnection] | None = None
        self._credential = credential
        self._owned_credential: AsyncTokenCredential | None = None
        self._lock = asyncio.Lock()
        # The connection `_reachable` makes while `pool()` holds the lock: `close` ends it
        # rather than wait out a blackholed server's connect timeout for the lock.
        self._reaching: asyncio.Task[None] | None = None
        self._migrated = False
        self.counters = Counters()
        self._blocking_pool: ConnectionPool[CountedBlockingConnection] | None = None
        self._blocking_lock = threading.Lock()
        # Held while the blocking pool's first connection is made (`_open_blocking`).
        self._blocking_open_lock = threading.Lock()
        # When each pool was last drained (`_drain_for`).
        self._drained_at = self._blocking_drained_at = float("-inf")
        self._circuit = AnswerCircuit(self.name, probe_seconds=config.operation_timeout_seconds)
        # Once closed, never opened again: a call still in flight while the owner closes
        # (a sync caller's thread, a task finishing) would open a pool nobody closes.
        self._closed = False
        # When the connection before the pool's open last failed, and how (`_reachable`).
        self._open_failed: tuple[float, str] | None = None

    @property
    def blocking_available(self) -> bool:
        """Whether `blocking_connection` can connect: POSTGRES_URL carries the credentials.
        An Entra sign-in's token comes from an async credential, so the saver's sync API
        then goes through the event loop's pool instead."""
        return self._config.url is not None and self._credential is None

    def _conninfo(self) -> str:
        config = self._config
        if config.url is not None:
            return config.url.get_secret_value()
        return make_conninfo(
            host=config.host,
            port=POSTGRES_PORT,
            dbname=config.database,
            user=config.user,
            **VERIFIED_TLS,
        )

    def _session_options(self, seconds: float) -> str:
        """Server-side bounds for a pool's sessions: the server ends a statement
        (`statement_timeout`) or an open transaction left idle
        (`idle_in_transaction_session_timeout`) after `seconds` by itself. The client
        gives up by then too, but its cancel request and its close can be lost (a
        partition), and the session would otherwise keep its locks, and may apply an
        abandoned write, until TCP gives up on the peer (hours). Added to the URL's own
        options (a search_path, say), not instead."""
        timeout_ms = int(seconds * 1000)
        return " ".join(
            part
            for part in (
                str(conninfo_to_dict(self._conninfo()).get("options") or ""),
                f"-c statement_timeout={timeout_ms}",
                f"-c idle_in_transaction_session_timeout={timeout_ms}",
            )
            if part
        )

    def _connect_timeout(self) -> dict[str, int]:
        """Each pool's bound on one connection attempt (per host of the URL), as keyword
        arguments: without one psycopg waits 130 s on a server that swallows packets (a
        partition, a vanished host), and the pool makes no other attempt meanwhile.
        psycopg waits 2 s at least. Empty when the URL sets its own: keyword arguments
        override the URL's, and the operator's choice (validated by the settings) wins,
        unless it is 0 or less: libpq's "no bound", which psycopg makes its 130 s."""
        own = conninfo_to_dict(self._conninfo()).get("connect_timeout")
        if own is not None and int(float(str(own))) > 0:
            return {}
        # libpq's own setting, read by psycopg when no keyword argument overrides it.
        environment = os.environ.get("PGCONNECT_TIMEOUT")
        try:
            if own is None and environment is not None and int(float(environment)) > 0:
                return {}
        except (ValueError, OverflowError):
            pass  # not a number (or infinite): the keyword argument overrides it
        config = self._config
        # No longer than a caller waits for a connection either: an attempt past that
        # only delays the pool's next one, or the URL's next host.
        bound = min(config.operation_timeout_seconds, config.pool_timeout_seconds)
        return {"connect_timeout": max(1, int(bound))}

    async def _connect_kwargs(self) -> dict[str, Any]:
        """Called by the pool for every new connection, so each gets a fresh token."""
        kwargs: dict[str, Any] = {
            # Reads need no transaction; writes open one explicitly.
            "autocommit": True,
            **self._connect_timeout(),
            # Once the client's own cancel had its time: a server that is reached ends
            # a slow statement at the operation timeout, as before, on the client's word.
            "options": self._session_options(
                self._config.operation_timeout_seconds + CANCEL_SECONDS
            ),
            "row_factory": dict_row,
            "cursor_factory": CountingCursor,
        }
        if self._credential is not None:
            token = await self._credential.get_token(ENTRA_SCOPE)
            kwargs["password"] = token.token
        return kwargs

    async def _configure(self, connection: CountedConnection) -> None:
        connection.answer_timeout = self._config.operation_timeout_seconds
        connection.circuit = self._circuit
        # Before the counters: the session's own setup is not a statement of any operation.
        await connection.execute(DISABLE_JIT)
        connection.counters = self.counters
        set_json_dumps(dump_json, connection)

    async def pool(self) -> AsyncConnectionPool[CountedConnection]:
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._closed:
                raise BackendClosed(self.name)
            if self._pool is None:
                self._pool = await self._open()
        return self._pool

    async def _reachable(self) -> None:
        """One connection, closed at once, before the pool opens: the pool only logs a
        failed connect (a closed port, no access token, a refused sign-in) and tries again,
        while every caller waits out its timeout for "couldn't get a connection" (or the
        request its deadline). Failed, the pool is not opened: a call tries again, once per
        OPEN_RETRY_SECONDS at most (the others meanwhile fail as it did), so a server
        refusing sign-ins is not asked by every request."""
        self._raise_recent_failure()
        try:
            connection = await AsyncConnection.connect(
                self._conninfo(), **await self._connect_kwargs()
            )
        except (ClientAuthenticationError, OperationalError) as exc:
            raise self._unreachable(exc) from exc
        await connection.close()
        self._open_failed = None

    def _reachable_blocking(self) -> None:
        """`_reachable` before the blocking pool opens (the same server: either pool's
        failure holds for both)."""
        self._raise_recent_failure()
        try:
            connection = psycopg.Connection.connect(self._conninfo(), **self._blocking_kwargs())
        except OperationalError as exc:
            raise self._unreachable(exc) from exc
        connection.close()
        self._open_failed = None

    def _raise_recent_failure(self) -> None:
        failed = self._open_failed
        if failed is not None and time.monotonic() - failed[0] < OPEN_RETRY_SECONDS:
            raise BackendUnavailable(self.name, failed[1])

    def _unreachable(self, exc: ClientAuthenticationError | OperationalError) -> BackendUnavailable:
        """A failed first connection, remembered (`_reachable`)."""
        detail = _first_line(exc)
        if isinstance(exc, ClientAuthenticationError):
            # No Entra token (no identity found, the identity endpoint down): not sent.
            detail = f"no access token: {detail}"
        self._open_failed = (time.monotonic(), detail)
        return BackendUnavailable(self.name, detail)

    async def _open(self) -> AsyncConnectionPool[CountedConnection]:
        config = self._config
        if self._credential is None and config.url is None:
            from azure.identity.aio import DefaultAzureCredential

            try:
                self._owned_credential = DefaultAzureCredential(
                    managed_identity_client_id=config.client_id
                )
            except ValueError as exc:
                # As for Cosmos: the SDK reads the AZURE_* variables only here, at the first
                # request. One it cannot use is the operator's to fix, not a crash each time.
                raise SettingsError(
                    "POSTGRES_URL is unset and no Entra credential can be built from the"
                    f" AZURE_* variables: {exc}"
                ) from exc
            self._credential = self._owned_credential
        reaching = self._reaching = asyncio.create_task(self._reachable())
        try:
            await reaching
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and not (task is not None and task.cancelling()):
                raise BackendClosed(self.name) from None  # ended by `close`
            raise
        finally:
            self._reaching = None
        pool = AsyncConnectionPool(
            self._conninfo(),
            connection_class=CountedConnection,
            kwargs=self._connect_kwargs,
            configure=self._configure,
            min_size=config.pool_min_size,
            max_size=config.pool_max_size,
            timeout=config.pool_timeout_seconds,
            name="agent-state",
            open=False,
        )
        # Not waiting for min_size connections: the server answered just now.
        await pool.open(wait=False)
        return pool

    @asynccontextmanager
    async def connection(
        self, operation: str, *, seconds: float | None = None
    ) -> AsyncIterator[CountedConnection]:
        """A pooled connection (autocommit) whose statements count under `operation`,
        bounded by `seconds` (default: the operation timeout) from when it is lent; the
        wait for it by the pool's timeout alone (`BackendUnavailable`: nothing was sent)."""
        pool = await self.pool()
        if seconds is None:
            seconds = self._config.operation_timeout_seconds
        with self._circuit.call(), postgres_errors():
            # Counted from the lending, not the call's start: time spent waiting for the
            # connection (a busy pool, a slow connect) is no silence of the server's, and
            # cutting it short (or its first statement) would report NoAnswer, an outcome
            # unknown, for a call that sent nothing, or drop a healthy connection. The
            # connection's deadline ends a wait for the server; the timeout bounds the rest,
            # past what ending such a wait may take.
            async with (
                _live_connection(pool) as conn,
                asyncio.timeout(seconds + CANCEL_SECONDS + NO_ANSWER_GRACE_SECONDS),
            ):
                lent = time.monotonic()
                conn.deadline = lent + seconds
                conn.operation = operation
                conn.first_lent = min(conn.first_lent, lent)
                try:
                    yield conn
                except ServerSilent:
                    raise  # checking the other connections would wait as long for each
                except OperationalError:
                    if conn.broken:
                        # The server went away (restart, failover): drop the other idle
                        # connections now, so one caller sees the outage instead of each.
                        await pool.check()
                    raise
                except ReadOnlySqlTransaction:
                    # Connected to a server in recovery (a failover demoted it, or the
                    # host name still points at it): every session opened there refuses
                    # writes alike, for as long as it lives. Open new ones, which reach
                    # whichever server is writable by then.
                    if self._drain_for(conn.first_lent):
                        await pool.drain()
                    raise
                finally:
                    conn.deadline = None

    @contextmanager
    def blocking_connection(self, operation: str) -> Iterator[CountedBlockingConnection]:
        """`connection` for a caller with no event loop (the saver's sync API), from a pool
        of its own opened on first use. No event loop bounds the call: a slow statement
        is cut by the server's `statement_timeout` and unacknowledged data by the socket's
        `tcp_user_timeout` (both the operation timeout), and a server that stops answering
        while its host still acknowledges (a paused process) by the connection's bounded
        waits (`NoAnswer`, a second past the operation timeout)."""
        if not self.blocking_available:
            raise StateError("blocking Postgres calls need POSTGRES_URL (no Entra sign-in)")
        pool = self._blocking_pool or self._open_blocking()
        with self._circuit.call(), postgres_errors(), _live_blocking_connection(pool) as conn:
            lent = time.monotonic()
            # From the lending, as in `connection`: the pool's wait is bounded by its own
            # timeout.
            conn.deadline = lent + self._config.operation_timeout_seconds + NO_ANSWER_GRACE_SECONDS
            conn.operation = operation
            conn.first_lent = min(conn.first_lent, lent)
            try:
                yield conn
            except ServerSilent:
                raise  # checking the other connections would wait as long for each
            except OperationalError:
                if conn.broken:
                    pool.check()
                raise
            except ReadOnlySqlTransaction:
                if self._drain_for(conn.first_lent, blocking=True):
                    pool.drain()  # as in `connection`
                raise
            finally:
                conn.deadline = None

    def _drain_for(self, first_lent: float, *, blocking: bool = False) -> bool:
        """Whether a session refused read-only calls for a drain of its pool (now dated),
        not only its own close. One lent before the last drain is closed as it returns
        (the pool dated it earlier still): draining again would close those opened since,
        on the writable server by then, once per request of a storm refused at once.
        (Two threads checking at once may both drain: harmless.)"""
        last = self._blocking_drained_at if blocking else self._drained_at
        if first_lent <= last:
            return False
        if blocking:
            self._blocking_drained_at = time.monotonic()
        else:
            self._drained_at = time.monotonic()
        return True

    def _blocking_kwargs(self) -> dict[str, Any]:
        """The blocking pool's connection arguments (its first connection's too)."""
        timeout_ms = int(self._config.operation_timeout_seconds * 1000)
        return {
            "autocommit": True,
            "row_factory": dict_row,
            "cursor_factory": CountingBlockingCursor,
            "options": self._session_options(self._config.operation_timeout_seconds),
            "tcp_user_timeout": timeout_ms,
            **self._connect_timeout(),
        }

    def _open_blocking(self) -> ConnectionPool[CountedBlockingConnection]:
        # Its own lock, not `_blocking_lock`: `close` takes that on the event loop, which
        # must not wait out a connection attempt at a blackholed server.
        with self._blocking_open_lock:
            if self._blocking_pool is None and not self._closed:
                try:
                    self._reachable_blocking()
                except BackendUnavailable:
                    # Closed meanwhile (`close` cannot end this attempt as it ends
                    # `_reachable`'s): the call fails as closed, as that one does.
                    if self._closed:
                        raise BackendClosed(self.name) from None
                    raise
            return self._blocking_pool_opened()

    def _blocking_pool_opened(self) -> ConnectionPool[CountedBlockingConnection]:
        with self._blocking_lock:
            if self._closed:
                raise BackendClosed(self.name)
            if self._blocking_pool is None:
                config = self._config

                def configure(connection: CountedBlockingConnection) -> None:
                    connection.answer_timeout = (
                        config.operation_timeout_seconds + NO_ANSWER_GRACE_SECONDS
                    )
                    connection.circuit = self._circuit
                    connection.execute(DISABLE_JIT)
                    connection.counters = self.counters
                    set_json_dumps(dump_json, connection)

                pool = ConnectionPool(
                    self._conninfo(),
                    connection_class=CountedBlockingConnection,
                    kwargs=self._blocking_kwargs(),
                    configure=configure,
                    min_size=1,
                    max_size=config.pool_max_size,
                    timeout=config.pool_timeout_seconds,
                    name="agent-state-blocking",
                    open=False,
                )
                pool.open(wait=False)
                self._blocking_pool = pool
            return self._blocking_pool

    @asynccontextmanager
    async def transaction(self, operation: str) -> AsyncIterator[CountedConnection]:
        """A pooled connection inside one transaction: committed on exit, rolled back on error."""
        async with self.connection(operation) as conn, conn.transaction():
            yield conn

    async def setup(self) -> None:
        """Apply pending migrations once per process (each adapter's setup calls this)."""
        if self._migrated:
            return
        # Two adapters setting up at once both migrate: harmless, Postgres serializes them.
        # Not the operation timeout: waiting for another process's migration, or a long
        # one of its own, must not fail the app's start after 30 s.
        async with self.connection("migrate", seconds=MIGRATION_SECONDS) as conn:
            await migrate(conn, statement_timeout_seconds=MIGRATION_SECONDS)
        self._migrated = True

    async def close(self) -> None:
        self._closed = True  # before the lock: `pool()` may hold it, connecting
        if self._reaching is not None:
            self._reaching.cancel()
        async with self._lock:
            with self._blocking_lock:  # a blocking pool being opened is taken once it is
                blocking, self._blocking_pool = self._blocking_pool, None
            pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        if blocking is not None:
            # Off the loop: closing joins the pool's worker threads.
            await asyncio.to_thread(blocking.close)
        if self._owned_credential is not None:
            await self._owned_credential.close()
            self._owned_credential = None
            self._credential = None


def dump_json(value: Any) -> str:
    """JSON for a jsonb parameter; what jsonb cannot hold (a NUL character, a number JSON
    cannot carry) is the caller's error, found before sending."""
    try:
        text = json.dumps(value, allow_nan=False)
    except ValueError as exc:  # NaN, Infinity (or a value that contains itself)
        # What the server answers for NaN (invalid_text_representation).
        raise InvalidValue("postgres", f"not valid JSON: {exc}", code="22P02") from exc
    if "\\u0000" in text and NUL_ESCAPE.search(text):
        raise InvalidValue(
            "postgres",
            "JSON text contains a NUL character (\\u0000), which jsonb cannot hold",
            # What the server answers for it (untranslatable_character): found before sending.
            code="22P05",
        )
    if "e+" in text:
        # Marked floats as strings, then written bare: no string of the value can hold the
        # marker's NUL (refused above).
        text = _WHOLE_FLOAT.sub(r"\1", json.dumps(_whole_floats_marked(value)))
    return text


# jsonb keeps a number's digits, not its type: a float Python writes with an exponent
# (every one from 1e16 on, all whole) comes back an integer, 2.0**60 (1.152921504606847e+18)
# as 1152921504606847000, another number. Written with all its digits and ".0", it is kept.
_WHOLE_FLOAT = re.compile(r'"\\u0000(-?\d+\.0)"')


def _whole_floats_marked(value: Any) -> Any:
    if isinstance(value, float) and "e+" in repr(value):
        return f"\x00{int(value)}.0"
    if isinstance(value, dict):
        return {key: _whole_floats_marked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_whole_floats_marked(item) for item in value]
    return value


@contextmanager
def postgres_errors() -> Iterator[None]:
    """Connection failures, pool timeouts, stalled servers and a server in recovery (a
    write refused as read-only after a failover) become `BackendUnavailable`; data errors
    (SQLSTATE class 22: a NUL character in JSON, a number JSON cannot carry), text that is
    not UTF-8 and values over a server limit (54000) become `InvalidValue`, and any other
    error the server or driver raises becomes `RequestRejected`."""
    try:
        yield
    except PoolClosed as exc:
        # A caller that took the pool just before its owner closed it.
        raise BackendClosed("postgres") from exc
    except ServerSilent as exc:
        raise NoAnswer("postgres", "no answer in time") from exc
    except OperationalError as exc:
        if exc.sqlstate is not None and exc.sqlstate.startswith(PROGRAM_LIMIT_CLASS):
            # Past a fixed limit of the server's: sent again, it fails the same way.
            # 54000 is a value too large for it (an index entry, a jsonb value).
            refusal = InvalidValue if exc.sqlstate == PROGRAM_LIMIT_EXCEEDED else RequestRejected
            raise refusal("postgres", _describe(exc), code=exc.sqlstate) from exc
        raise BackendUnavailable("postgres", str(exc) or type(exc).__name__) from exc
    except ReadOnlySqlTransaction as exc:
        # A server in recovery (after a failover) refuses a write until the pool reaches
        # the new primary: an outage, not a refusal for good.
        raise BackendUnavailable("postgres", _describe(exc)) from exc
    except TimeoutError as exc:
        raise NoAnswer("postgres", "no answer in time") from exc
    except DataError as exc:
        raise InvalidValue("postgres", _describe(exc), code=exc.sqlstate) from exc
    except UnicodeEncodeError as exc:
        # psycopg encoding a text parameter with a lone surrogate: found before sending.
        raise InvalidValue(
            "postgres",
            "a lone surrogate (not UTF-8) in a text value",
            # What the server answers for text that is not UTF-8 (character_not_in_repertoire).
            code="22021",
        ) from exc
    except psycopg.Error as exc:
        raise RequestRejected("postgres", _describe(exc), code=exc.sqlstate) from exc


def _describe(exc: psycopg.Error) -> str:
    """The server's message and detail, never the statement or its parameters."""
    lines = str(exc).splitlines()
    primary = exc.diag.message_primary or (lines[0] if lines else "")
    detail = exc.diag.message_detail
    text = f"{primary} ({detail})" if detail else primary
    return text or type(exc).__name__


def _first_line(exc: Exception) -> str:
    """An exception's first line: the credential chain's message goes on for lines."""
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__
