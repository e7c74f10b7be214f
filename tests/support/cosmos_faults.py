"""Cosmos faults injected at the azure-core transport: what the SDK would see from Azure.

`FaultyTransport` wraps the SDK's own aiohttp transport (passed to the client
through `CosmosConnection(settings.cosmos, transport=...)`). Each armed `Fault`
matches document operations by kind and hits the next `times` of them:

- `throttle`: a synthetic 429 with `x-ms-retry-after-ms` (never reaches the server);
- `unavailable`: a synthetic 503 (never reaches the server);
- `timeout_before`: the request times out before it is sent (safe to retry);
- `timeout_after`: the server applies the request, then the response times
  out (unknown outcome; the SDK does not retry writes on this);
- `reset_after`: the server applies the request, then the connection drops
  (unknown outcome; the SDK *does* retry it, even a write);
- `stall`: the request gets no answer (a cut network): it waits out the read
  timeout the SDK gives the transport, then times out, as aiohttp would.

Every attempt is logged with its operation and what was injected, so a test
can count how often an operation went to the wire.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from azure.core.exceptions import (
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.core.pipeline.transport import (
    AsyncHttpResponse,
    AsyncHttpTransport,
    HttpRequest,
)
from azure.core.utils import CaseInsensitiveDict

from state.cold.cosmos_client import EnvironmentProxyTransport

FaultKind = Literal[
    "throttle", "unavailable", "timeout_before", "timeout_after", "reset_after", "stall"
]
Operation = Literal["create", "upsert", "replace", "patch", "read", "query", "delete", "batch"]
WRITES: frozenset[Operation] = frozenset(
    {"create", "upsert", "replace", "patch", "delete", "batch"}
)


@dataclass
class Fault:
    kind: FaultKind
    operations: frozenset[Operation]
    times: int = 1
    retry_after_ms: int = 20
    # Only requests whose body contains this text (e.g. a thread id) match.
    body_contains: str | None = None
    # Awaited after the server applied a request that then fails (`timeout_after`,
    # `reset_after`), before the failure: what another process did meanwhile.
    meanwhile: Callable[[], Awaitable[object]] | None = None
    hits: int = 0


@dataclass(frozen=True)
class Attempt:
    operation: Operation | None  # None: not a document operation (metadata, account)
    method: str
    path: str
    injected: FaultKind | None


def classify(request: HttpRequest) -> Operation | None:
    path = request.url.split("?", 1)[0]
    if "/docs" not in path:
        return None
    headers = {k.lower(): str(v).lower() for k, v in request.headers.items()}
    method = request.method.upper()
    if method == "POST":
        if headers.get("x-ms-cosmos-is-batch-request") == "true":
            return "batch"
        if headers.get("x-ms-documentdb-isquery") == "true" or "query" in headers.get(
            "content-type", ""
        ):
            return "query"
        return "upsert" if headers.get("x-ms-documentdb-is-upsert") == "true" else "create"
    return {"PUT": "replace", "PATCH": "patch", "GET": "read", "DELETE": "delete"}.get(method)  # type: ignore[return-value]


class SyntheticResponse(AsyncHttpResponse):
    """A complete in-memory response, as the service would have sent it."""

    def __init__(self, request: HttpRequest, status: int, headers: dict[str, str], body: bytes):
        super().__init__(request, internal_response=None)
        self.status_code = status
        self.headers = CaseInsensitiveDict(headers)
        self.reason = {429: "Too Many Requests", 503: "Service Unavailable"}.get(status, "")
        self.content_type = "application/json"
        self._body = body

    def body(self) -> bytes:
        return self._body

    async def load_body(self) -> None:
        return None


def _error_response(request: HttpRequest, status: int, extra: dict[str, str]) -> SyntheticResponse:
    code = {429: "TooManyRequests", 503: "ServiceUnavailable"}[status]
    body = json.dumps({"code": code, "message": f"injected {status}"}).encode()
    headers = {"content-type": "application/json", "x-ms-activity-id": "fault", **extra}
    return SyntheticResponse(request, status, headers, body)


@dataclass
class FaultyTransport(AsyncHttpTransport):
    # The transport the connection builds for itself: faults wrap what production sends through.
    inner: AsyncHttpTransport = field(default_factory=EnvironmentProxyTransport)
    faults: list[Fault] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)

    def inject(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.faults.clear()
        self.attempts.clear()

    def count(
        self, operation: Operation, injected: FaultKind | Literal["any"] | None = "any"
    ) -> int:
        return sum(
            1
            for attempt in self.attempts
            if attempt.operation == operation and injected in ("any", attempt.injected)
        )

    def _match(self, operation: Operation | None, request: HttpRequest) -> Fault | None:
        if operation is None:
            return None
        for fault in self.faults:
            if fault.hits >= fault.times or operation not in fault.operations:
                continue
            if fault.body_contains is not None:
                body = request.data if isinstance(request.data, (str, bytes)) else request.body
                text = body.decode() if isinstance(body, bytes) else str(body or "")
                if fault.body_contains not in text and fault.body_contains not in request.url:
                    continue
            fault.hits += 1
            return fault
        return None

    async def send(self, request: HttpRequest, **kwargs: Any) -> AsyncHttpResponse:
        operation = classify(request)
        fault = self._match(operation, request)
        path = request.url.split("?", 1)[0]
        self.attempts.append(
            Attempt(operation, request.method, path, fault.kind if fault else None)
        )
        if fault is None:
            return await self.inner.send(request, **kwargs)
        if fault.kind == "throttle":
            return _error_response(
                request,
                429,
                {"x-ms-retry-after-ms": str(fault.retry_after_ms), "x-ms-substatus": "3200"},
            )
        if fault.kind == "unavailable":
            return _error_response(request, 503, {})
        if fault.kind == "timeout_before":
            raise ServiceRequestTimeoutError("injected: connect timed out")
        if fault.kind == "stall":
            await asyncio.sleep(kwargs["read_timeout"])
            raise ServiceResponseTimeoutError("injected: no answer within the read timeout")
        response = await self.inner.send(request, **kwargs)
        await response.load_body()
        if fault.meanwhile is not None:
            await fault.meanwhile()
        if fault.kind == "timeout_after":
            raise ServiceResponseTimeoutError(
                "injected: read timed out after the server applied it"
            )
        raise ServiceResponseError(
            "injected: connection dropped after the server applied it",
            error=aiohttp.ServerDisconnectedError(),
        )

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def __aenter__(self) -> FaultyTransport:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *args: Any) -> None:
        await self.inner.__aexit__(*args)
