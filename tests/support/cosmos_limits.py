"""Azure Cosmos DB's documented request limits, enforced at the SDK's HTTP transport.

The local emulator (`scripts/cosmos-emulator.js`) caps a transactional batch at 100
operations but enforces none of the service's size and naming limits, so code that
breaks them passes every local test. `LimitedTransport` wraps the SDK's own transport
(`CosmosConnection(settings.cosmos, transport=...)`) and answers a document request
that breaks one as Azure does, without sending it (learn.microsoft.com/azure/cosmos-db/
concepts-limits, transactional-batch, partial-document-update):

- a request body (an item, a batch) over 2 MB: 413;
- a transactional batch of more than 100 operations: 400;
- an item id over 1,023 bytes or containing `/`, `\\`, `?` or `#`: 400;
- a partition key value over 2,048 bytes: 400;
- a patch of more than 10 operations: 400;
- a transactional batch naming one item id in two operations: 400 (the service may
  refuse such a batch, or answer it with a conflict; the emulator applies it in order).

Each refusal is kept in `violations`, so a test can also assert that none happened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from azure.core.pipeline.transport import AsyncHttpResponse, AsyncHttpTransport, HttpRequest

from state.cold.cosmos_client import EnvironmentProxyTransport
from tests.support.cosmos_faults import SyntheticResponse, classify

REQUEST_BYTES = 2 * 1024 * 1024
BATCH_OPERATIONS = 100
ID_BYTES = 1023
ID_FORBIDDEN = "/\\?#"
PARTITION_KEY_BYTES = 2048
PATCH_OPERATIONS = 10


@dataclass(frozen=True)
class Violation:
    operation: str
    status: int
    reason: str


def _body(request: HttpRequest) -> bytes:
    data: Any = request.data if isinstance(request.data, (str, bytes)) else request.body
    if data is None:
        return b""
    return data if isinstance(data, bytes) else str(data).encode()


def _id_problem(doc_id: Any) -> str | None:
    if not isinstance(doc_id, str):
        return None
    if len(doc_id.encode()) > ID_BYTES:
        return f"id of {len(doc_id.encode())} bytes"
    bad = sorted({ch for ch in doc_id if ch in ID_FORBIDDEN})
    return f"id {doc_id[:80]!r} contains {bad}" if bad else None


def check(operation: str | None, request: HttpRequest) -> tuple[int, str] | None:
    """(status, reason) Azure would refuse the request with, or None."""
    if operation is None:
        return None
    header = request.headers.get("x-ms-documentdb-partitionkey")
    if header and len(str(header).encode()) > PARTITION_KEY_BYTES + 4:  # the JSON array around it
        return 400, f"partition key of {len(str(header).encode())} bytes"
    body = _body(request)
    if operation in ("query", "read", "delete"):
        return None
    if len(body) > REQUEST_BYTES:
        return 413, f"request body of {len(body)} bytes"
    parsed = json.loads(body) if body else None
    if operation == "batch":
        assert isinstance(parsed, list)
        if len(parsed) > BATCH_OPERATIONS:
            return 400, f"batch of {len(parsed)} operations"
        named: set[str] = set()
        for op in parsed:
            resource = op.get("resourceBody") or {}
            doc_id = op.get("id") or resource.get("id")
            problem = _id_problem(op.get("id")) or _id_problem(resource.get("id"))
            if problem:
                return 400, problem
            if doc_id is not None and doc_id in named:
                return 400, f"batch names id {str(doc_id)[:80]!r} twice"
            named.add(doc_id)
        return None
    if operation == "patch":
        operations = (parsed or {}).get("operations", [])
        if len(operations) > PATCH_OPERATIONS:
            return 400, f"patch of {len(operations)} operations"
        return None
    problem = _id_problem((parsed or {}).get("id"))
    return (400, problem) if problem else None


@dataclass
class LimitedTransport(AsyncHttpTransport):
    inner: AsyncHttpTransport = field(default_factory=EnvironmentProxyTransport)
    violations: list[Violation] = field(default_factory=list)
    # Body sizes of the batches sent, and their operation counts.
    batches: list[tuple[int, int]] = field(default_factory=list)

    async def send(self, request: HttpRequest, **kwargs: Any) -> AsyncHttpResponse:
        operation = classify(request)
        if operation == "batch":
            body = _body(request)
            self.batches.append((len(body), len(json.loads(body))))
        refused = check(operation, request)
        if refused is None:
            return await self.inner.send(request, **kwargs)
        status, reason = refused
        self.violations.append(Violation(str(operation), status, reason))
        payload = json.dumps(
            {"code": {400: "BadRequest", 413: "RequestEntityTooLarge"}[status], "message": reason}
        ).encode()
        headers = {"content-type": "application/json", "x-ms-activity-id": "limit"}
        return SyntheticResponse(request, status, headers, payload)

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def __aenter__(self) -> LimitedTransport:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *args: Any) -> None:
        await self.inner.__aexit__(*args)
