"""One Cosmos DB container per app, shared by every Cosmos adapter.

Builds the async client from settings (emulator key locally, Entra ID in
Azure), creates the database and container only when the settings allow it,
maps transport failures to `BackendUnavailable` and refusals to the library's typed
errors, and counts round trips and request charge for the benchmark and the O(1) tests.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from azure.core.exceptions import (
    ClientAuthenticationError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.transport import AioHttpTransport, AsyncHttpTransport
from azure.cosmos import PartitionKey
from azure.cosmos.aio import ContainerProxy, CosmosClient
from azure.cosmos.exceptions import (
    CosmosHttpResponseError,
    CosmosResourceExistsError,
    CosmosResourceNotFoundError,
)

from ..errors import (
    BackendClosed,
    BackendUnavailable,
    InvalidValue,
    NoAnswer,
    RequestRejected,
    SettingsError,
)
from ..ports import Counters, cold_operation
from ..settings import CosmosConfig
from .circuit import AnswerCircuit

PARTITION_KEY_PATH = "/thread_id"
# Status codes that mean "the service could not do it now", not "your request is wrong".
UNAVAILABLE_STATUS = frozenset({408, 429, 449, 500, 502, 503, 504})
# Answers to a conditional request (absent, exists, changed meanwhile) the adapters handle.
ANSWER_STATUS = frozenset({404, 409, 412})
# Refusals of what was sent: a malformed document or query, an entity over the size limit.
INVALID_VALUE_STATUS = frozenset({400, 413})
# How much of the service's message an error carries.
MESSAGE_CHARS = 300
# Where a request's pipeline context keeps when that attempt was sent (`AnswerCircuit.now`).
SENT_AT = "answer_circuit_sent_at"
CONTAINER_DEFAULT_TTL = -1
# Blob payloads are never queried: keeping them out of the index saves RU and storage.
# Those under `values` cannot be: a path's wildcard may only end it, and queries filter
# on `values/<channel>/version`.
INDEXING_POLICY: dict[str, Any] = {
    "indexingMode": "consistent",
    "includedPaths": [{"path": "/*"}],
    "excludedPaths": [
        {"path": "/data/?"},
        {"path": "/checkpoint/*"},
        {"path": "/writes/*"},
        {"path": "/chunks/*"},
        {"path": "/sections/*"},
        {"path": "/before/*"},
        {"path": "/after/*"},
        {"path": '/"_etag"/?'},
    ],
}


class EnvironmentProxyTransport(AioHttpTransport):
    """aiohttp with the environment's proxy (`HTTPS_PROXY`, unless `NO_PROXY` names the
    host) decided once per host. Trusting the environment, aiohttp would look up .netrc
    and the proxy variables in worker threads on every request: half the client's CPU
    for a point read (1.3 ms against 0.65 ms, measured). Per host, not per client: the
    SDK sends to the account's host and to its regions' hosts."""

    def __init__(self) -> None:
        super().__init__(use_env_settings=False)
        self._proxies = urllib.request.getproxies_environment()
        self._by_host: dict[str, str | None] = {}

    def proxy_for(self, url: str) -> str | None:
        where = _host_and_port(url)
        if where not in self._by_host:
            self._by_host[where] = environment_proxy(url, self._proxies)
        return self._by_host[where]

    async def send(self, request: Any, **config: Any) -> Any:
        proxy = self.proxy_for(request.url)
        if proxy is not None:
            config.setdefault("proxy", proxy)
        return await super().send(request, **config)


def _host_and_port(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    # With its port, as urllib's ProxyHandler asks: `NO_PROXY` may name `host:port`.
    return host if parts.port is None else f"{host}:{parts.port}"


def environment_proxy(url: str, proxies: Mapping[str, str]) -> str | None:
    """The proxy of `proxies` (the environment's, as read once) that `url` goes through."""
    proxy = proxies.get(urllib.parse.urlsplit(url).scheme)
    # `NO_PROXY` as read at build too, not as the environment is at first use
    # (what `urllib.request.proxy_bypass` reads; typeshed omits this function).
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    bypassed = proxy is None or bool(bypass(_host_and_port(url), proxies))
    return None if bypassed else proxy


class CosmosConnection:
    """Lazily opened client + container; safe to share between adapters in one event loop."""

    name = "cosmos"

    def __init__(
        self, config: CosmosConfig, *, transport: AsyncHttpTransport | None = None
    ) -> None:
        self._config = config
        # None: `EnvironmentProxyTransport`. Fault tests pass a wrapper around the SDK's own.
        self._transport = transport
        self._client: CosmosClient | None = None
        self._container: ContainerProxy | None = None
        self._credential: Any = None
        # Set by `close`: a call after it is refused, as Postgres refuses it, rather than
        # open a client again that nothing would close (its HTTP session leaked).
        self._closed = False
        self._lock = asyncio.Lock()
        self.counters = Counters()
        self._circuit = AnswerCircuit(self.name, probe_seconds=config.operation_timeout_seconds)

    async def accepting(self) -> None:
        """`BackendUnavailable` if the endpoint refuses a TCP connection (nothing listens on
        its port): the SDK retries a refused connection past any probe's bound, so its own
        call cannot tell a stopped server from a silent one. Any other outcome tells nothing
        here (the call's own answer does), nor is it asked where the client does not connect
        to the endpoint itself (through a proxy, or a transport passed in)."""
        endpoint = self._config.endpoint
        if self._transport is not None or environment_proxy(
            endpoint, urllib.request.getproxies_environment()
        ):
            return
        parts = urllib.parse.urlsplit(endpoint)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        loop = asyncio.get_running_loop()
        try:
            addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return
        # Each address in turn, as `open_connection` tries them: but one refusing them all
        # (`localhost`: ::1 and 127.0.0.1) raises its plain "Multiple exceptions" OSError.
        refused: ConnectionRefusedError | None = None
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as sock:
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, address)
                except ConnectionRefusedError as exc:
                    refused = exc
                    continue
                except OSError:
                    pass  # unreachable, reset, ...: tells nothing
                return
        if refused is not None:
            raise BackendUnavailable("cosmos", f"connection refused by {host}:{port}") from refused

    @property
    def operation_timeout_seconds(self) -> float:
        """The bound on one call to the service, its retries included (`bounded`)."""
        return self._config.operation_timeout_seconds

    def _hook(self, headers: Mapping[str, Any], _body: Any) -> None:
        charge = headers.get("x-ms-request-charge") if headers else None
        operation = cold_operation.get() or "request"
        self.counters.count(operation, float(charge) if charge else 0.0)

    def _sending(self, request: PipelineRequest[Any]) -> None:
        # Each attempt, the SDK's retries included, just before the transport sends it.
        request.context[SENT_AT] = self._circuit.now()

    def _heard(self, response: PipelineResponse[Any, Any]) -> None:
        # As of when its request was sent: an answer to one sent before a call began, read
        # late on a busy event loop, tells nothing of the service since.
        self._circuit.heard(response.context.get(SENT_AT))

    async def container(self) -> ContainerProxy:
        if self._container is not None:
            return self._container
        async with self._lock:
            if self._closed:
                raise BackendClosed(self.name)
            if self._container is None:
                self._container = await self._open()
        return self._container

    async def _open(self) -> ContainerProxy:
        config = self._config
        if self._client is None:  # else kept from an open that failed: one client per connection
            self._client = self._new_client()
        if not config.create_if_missing:
            database_client = self._client.get_database_client(config.database)
            container = database_client.get_container_client(config.container)
            await self._check_exists(container)
            return container
        # The SDK reads, then creates on a 404: another worker starting at the same moment
        # may create it in between, and this create is answered 409. What it created is
        # the one to use (a container's settings are those of the first create).
        async with self.bounded():
            try:
                database = await self._client.create_database_if_not_exists(config.database)
            except CosmosResourceExistsError:
                database = self._client.get_database_client(config.database)
            try:
                return await database.create_container_if_not_exists(
                    config.container,
                    partition_key=PartitionKey(path=PARTITION_KEY_PATH),
                    indexing_policy=INDEXING_POLICY,
                    # TTL on, nothing expires by itself: retention sweeps whole threads
                    # (`cosmos_retention`), since an item's own age says nothing of whether
                    # a live thread still names it.
                    default_ttl=CONTAINER_DEFAULT_TTL,
                )
            except CosmosResourceExistsError:
                return database.get_container_client(config.container)

    def _new_client(self) -> CosmosClient:
        config = self._config
        credential: Any
        if config.key is not None:
            credential = config.key.get_secret_value()
        else:
            from azure.identity.aio import DefaultAzureCredential

            try:
                self._credential = DefaultAzureCredential(
                    managed_identity_client_id=config.client_id
                )
            except ValueError as exc:
                # The SDK reads the AZURE_* variables only here, at the first request: one it
                # cannot use (a malformed AZURE_TENANT_ID, an unknown AZURE_TOKEN_CREDENTIALS)
                # is the operator's to fix, not a crash on every request.
                raise SettingsError(
                    "COSMOS_KEY is unset and no Entra credential can be built from the"
                    f" AZURE_* variables: {exc}"
                ) from exc
            credential = self._credential
        return CosmosClient(
            config.endpoint,
            credential=credential,
            connection_verify=config.verify_tls,
            consistency_level="Session",
            # Item bodies as UTF-8, the size this project checks against the item limit; the
            # SDK's default escapes every non-ASCII character (`\u00e9`: six bytes for two).
            enable_compact_utf8_item_writes=True,
            transport=self._transport or EnvironmentProxyTransport(),
            # Per attempt; `bounded` bounds a whole call, the SDK's retries included.
            read_timeout=config.operation_timeout_seconds,
            # Every response, a 429 the SDK retries included, shows the service alive:
            # a call that outlasts its bound on throttling opens no circuit.
            raw_request_hook=self._sending,
            raw_response_hook=self._heard,
        )

    async def _check_exists(self, container: ContainerProxy) -> None:
        """Read the container's properties once (the SDK keeps them for its requests).
        Missing, it would answer every point read "not found", as if each thread were
        empty, and fail every write with the SDK's own error."""
        try:
            async with self.bounded():
                await container.read()
        except CosmosResourceNotFoundError as exc:
            config = self._config
            raise RequestRejected(
                "cosmos",
                f"container {config.container!r} of database {config.database!r} does not exist",
                code=404,
            ) from exc

    @asynccontextmanager
    async def bounded(self) -> AsyncIterator[None]:
        """One call to the service, errors mapped (`cosmos_errors`) and bounded in time:
        the SDK retries a read that gets no answer up to three times, each waiting out its
        read timeout, so a cut network would hold a caller for minutes."""
        seconds = self._config.operation_timeout_seconds
        deadline = asyncio.timeout(seconds)
        with self._circuit.call(), cosmos_errors():
            try:
                async with deadline:
                    yield
            except TimeoutError as exc:
                if not deadline.expired():
                    raise
                raise NoAnswer("cosmos", f"no answer within {seconds:g} s") from exc

    @property
    def response_hook(self) -> Any:
        """Pass as `response_hook=` on each SDK call to count it."""
        return self._hook

    async def close(self) -> None:
        self._closed = True
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._container = None
        if self._credential is not None:
            await self._credential.close()
            self._credential = None


@contextmanager
def cosmos_errors() -> Iterator[None]:
    """Transport failures, timeouts and throttling become `BackendUnavailable`; a request
    Cosmos refuses for good becomes `InvalidValue` (the document or query is malformed,
    or too large) or `RequestRejected` (not authorized, anything else). A credential that
    gets no Entra token is `BackendUnavailable` too.

    404, 409 and 412 stay the SDK's own exceptions: they answer a conditional request
    (absent, already exists, changed meanwhile), and every adapter call site that can
    get one turns it into its own outcome.
    """
    try:
        yield
    except (ServiceRequestError, ServiceResponseError, TimeoutError) as exc:
        raise BackendUnavailable("cosmos", str(exc)) from exc
    except CosmosHttpResponseError as exc:
        status = exc.status_code
        if status in UNAVAILABLE_STATUS:
            raise BackendUnavailable("cosmos", f"HTTP {status}") from exc
        if status in ANSWER_STATUS:
            raise
        detail = f"HTTP {status}: {_first_line(exc.message)}"
        if status in INVALID_VALUE_STATUS:
            raise InvalidValue("cosmos", detail, code=status) from exc
        raise RequestRejected("cosmos", detail, code=status) from exc
    except ClientAuthenticationError as exc:
        # No Entra token (no COSMOS_KEY, and no identity found, or the token service down):
        # nothing was sent. Unavailable, not refused: once the process has an identity the
        # next call goes through, and write-behind entries wait for it rather than stick.
        raise BackendUnavailable("cosmos", f"no access token: {_first_line(exc.message)}") from exc


def _first_line(message: str | None) -> str:
    """The service's own message without the SDK's multi-line decoration."""
    for line in (message or "").splitlines():
        text = line.removeprefix("Message:").strip()
        if text and not line.startswith(("Code:", "Content:", "Status code:")):
            return text[:MESSAGE_CHARS]
    return "no message"
