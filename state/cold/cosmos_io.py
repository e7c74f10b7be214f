"""Partition I/O on the shared Cosmos container: the requests every Cosmos adapter makes.

Point reads, upserts, create-if-absent, conditional replace and delete, patch,
paged queries and a bounded gather, each counted on the connection (the
response hook sees successes; failed round trips are counted here), bounded in
time and with its failures mapped (`CosmosConnection.bounded`). Queries name the
thread in their text as well as in the partition key option: the local emulator
ignores the option and would otherwise scan (or refuse) across partitions.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

from azure.core import MatchConditions
from azure.cosmos.aio import ContainerProxy
from azure.cosmos.exceptions import (
    CosmosAccessConditionFailedError,
    CosmosBatchOperationError,
    CosmosHttpResponseError,
    CosmosResourceExistsError,
    CosmosResourceNotFoundError,
)

from ..errors import BackendUnavailable, InvalidValue, RequestRejected
from .cosmos_client import INVALID_VALUE_STATUS, UNAVAILABLE_STATUS, CosmosConnection

T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")
Doc = dict[str, Any]
# One operation of a transactional batch, as the SDK takes it: ("upsert", (doc,)), or
# with options: ("replace", (id, doc), {"if_match_etag": etag}).
BatchOperation = tuple[str, tuple[Any, ...]] | tuple[str, tuple[Any, ...], dict[str, Any]]

# Page size of internal queries that must read everything they match.
BULK_PAGE_SIZE = 1000
DELETE_BATCH = 100
CONCURRENT_REQUESTS = 16
# A transactional batch holds at most 100 operations and a request body of 2 MB (the
# service's limits); the body is estimated from the documents, so with a margin.
BATCH_OPERATIONS = 100
BATCH_BYTES = 1_600_000
SYSTEM_PROPERTIES = ("_rid", "_self", "_etag", "_ts", "_attachments")


class BatchRefused(Exception):
    """A transactional batch the service refused as a whole: operation `index` answered
    `status` (404, 409, 412...), and none of the batch was applied. Adapters turn it into
    their own outcome; it never leaves them."""

    def __init__(self, status: int, index: int) -> None:
        super().__init__(f"batch operation {index} refused with HTTP {status}")
        self.status = status
        self.index = index


def batch_refusal(refused: BatchRefused) -> RequestRejected:
    """The typed error a refused batch is outside the adapters, as `cosmos_errors` types
    the same refusal of a single request."""
    if refused.status in INVALID_VALUE_STATUS:
        return InvalidValue("cosmos", str(refused), code=refused.status)
    return RequestRejected("cosmos", str(refused), code=refused.status)


def strip_system(doc: Doc) -> Doc:
    """Without `_etag`, `_rid`, `_ts`...: Cosmos sets them, a body written back must not."""
    return {key: value for key, value in doc.items() if key not in SYSTEM_PROPERTIES}


async def gather(calls: Sequence[Awaitable[T]], *, limit: int = CONCURRENT_REQUESTS) -> list[T]:
    """All of `calls`, at most `limit` in flight; results in order.

    The first failure cancels the calls still running (their requests would be wasted)
    and is raised as itself, not wrapped in a group: callers catch the typed errors.
    """
    if len(calls) == 1:
        return [await calls[0]]
    slots = asyncio.Semaphore(limit)

    async def bounded(call: Awaitable[T]) -> T:
        async with slots:
            return await call

    tasks = [asyncio.ensure_future(bounded(call)) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        running = [task for task in tasks if not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        for call in calls:
            if asyncio.iscoroutine(call):
                call.close()  # one cancelled before it started was never awaited


def _by_partition(docs: Sequence[Doc]) -> dict[str, list[Doc]]:
    """Per partition, each id once, as its last doc: what upserting them in order leaves.
    A batch may not name an id twice, and two batches run concurrently have no order."""
    grouped: dict[str, dict[object, Doc]] = {}
    for doc in docs:
        # A doc without an id is sent as it is, for the service to refuse.
        key = doc["id"] if "id" in doc else object()
        grouped.setdefault(str(doc["thread_id"]), {})[key] = doc
    return {partition: list(by_id.values()) for partition, by_id in grouped.items()}


def _batch_runs(docs: Sequence[Doc]) -> Iterator[list[Doc]]:
    """`docs` in order, cut into runs a transactional batch holds (by count, and by
    size estimated from the documents' JSON); a doc too large for one is a run alone."""
    if len(docs) == 1:
        yield list(docs)  # a put's lone document: nothing to cut, no size to estimate
        return
    run: list[Doc] = []
    size = 0
    for doc in docs:
        doc_size = len(json.dumps(doc))
        if run and (len(run) == BATCH_OPERATIONS or size + doc_size > BATCH_BYTES):
            yield run
            run, size = [], 0
        run.append(doc)
        size += doc_size
    if run:
        yield run


async def gather_pair(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """`gather` of two calls of different result types."""
    one, other = await gather([first, second])
    return cast(A, one), cast(B, other)


class PartitionIO:
    """Counted, error-mapped requests against one logical partition (one thread) at a time."""

    def __init__(self, connection: CosmosConnection) -> None:
        self.connection = connection

    async def container(self) -> ContainerProxy:
        return await self.connection.container()

    @property
    def hook(self) -> Any:
        return self.connection.response_hook

    @asynccontextmanager
    async def errors(self) -> AsyncIterator[None]:
        """One bounded call (`CosmosConnection.bounded`); a failed round trip is counted
        here, as the response hook only sees successes."""
        async with self.connection.bounded():
            try:
                yield
            except CosmosHttpResponseError:
                self.connection.counters.count("failed")
                raise

    # ----------------------------------------------------------------------- items

    async def read(self, doc_id: str, partition: str) -> Doc | None:
        container = await self.container()
        try:
            async with self.errors():
                found: Doc = await container.read_item(
                    doc_id, partition_key=partition, response_hook=self.hook
                )
        except CosmosResourceNotFoundError:
            return None
        return found

    async def upsert(self, doc: Doc) -> None:
        container = await self.container()
        async with self.errors():
            await container.upsert_item(doc, no_response=True, response_hook=self.hook)

    async def upsert_all(self, docs: Sequence[Doc]) -> None:
        """Every doc upserted, each partition's as transactional batches within the
        service's limits, the batches concurrently: a large state's hundreds of blocks
        cost a handful of round trips, not one each. A doc alone, or too large for a
        batch, is its own request. Each batch is atomic; the whole is not."""
        requests: list[Awaitable[object]] = []
        for partition, group in _by_partition(docs).items():
            for run in _batch_runs(group):
                if len(run) == 1:
                    requests.append(self.upsert(run[0]))
                else:
                    requests.append(self._upsert_batch(partition, run))
        if requests:
            await gather(requests)

    async def _upsert_batch(self, partition: str, docs: Sequence[Doc]) -> None:
        try:
            await self.batch(partition, [("upsert", (doc,)) for doc in docs], bodies=False)
        except BatchRefused as refused:
            # An upsert has no precondition to fail: a refusal is one the docs would
            # meet sent alone too (malformed, too large).
            raise batch_refusal(refused) from refused

    async def batch(
        self, partition: str, operations: Sequence[BatchOperation], *, bodies: bool = True
    ) -> list[Doc]:
        """One transactional batch: every operation applied in order, or none of them.

        The operations' results (`resourceBody` each, where one was returned; none asked
        for without `bodies`: a large flush would get every document it sent back); raises
        `BatchRefused` when the service refused an operation (a create whose id exists,
        an If-Match that no longer matches: nothing was applied) and
        `BackendUnavailable` when it could not run the batch.
        """
        container = await self.container()
        try:
            async with self.errors():
                results = await container.execute_item_batch(
                    list(operations),
                    partition_key=partition,
                    response_hook=self.hook,
                    no_response=not bodies,
                )
        except CosmosBatchOperationError as exc:
            self.connection.counters.count("failed")
            if exc.status_code in UNAVAILABLE_STATUS:
                raise BackendUnavailable("cosmos", f"HTTP {exc.status_code} in a batch") from exc
            raise BatchRefused(int(exc.status_code or 0), exc.error_index) from exc
        return [result.get("resourceBody") or {} for result in results]

    async def create(self, doc: Doc) -> Doc:
        """The created item; raises `CosmosResourceExistsError` if the id is taken."""
        container = await self.container()
        async with self.errors():
            created: Doc = await container.create_item(doc, response_hook=self.hook)
        return created

    async def create_if_absent(self, doc: Doc) -> bool:
        container = await self.container()
        try:
            async with self.errors():
                await container.create_item(doc, no_response=True, response_hook=self.hook)
        except CosmosResourceExistsError:
            return False
        return True

    async def replace(self, doc_id: str, doc: Doc, *, etag: str) -> Doc:
        """If-Match `etag`; raises `CosmosAccessConditionFailedError` if it moved."""
        container = await self.container()
        async with self.errors():
            replaced: Doc = await container.replace_item(
                doc_id,
                doc,
                etag=etag,
                match_condition=MatchConditions.IfNotModified,
                response_hook=self.hook,
            )
        return replaced

    async def replace_if_unchanged(self, doc_id: str, doc: Doc, *, etag: str) -> bool:
        try:
            await self.replace(doc_id, doc, etag=etag)
        except (CosmosAccessConditionFailedError, CosmosResourceNotFoundError):
            return False
        return True

    async def delete(self, doc_id: str, partition: str) -> bool:
        """False when it was already gone."""
        container = await self.container()
        try:
            async with self.errors():
                await container.delete_item(
                    doc_id, partition_key=partition, response_hook=self.hook
                )
        except CosmosResourceNotFoundError:
            return False
        return True

    async def delete_ids(self, partition: str, ids: Sequence[str]) -> None:
        """Every id deleted, as transactional batches run concurrently. A missing id is
        no failure, but it fails its batch: those batches' ids are then deleted one
        request each (all of them in one bounded gather)."""
        runs = [ids[at : at + BATCH_OPERATIONS] for at in range(0, len(ids), BATCH_OPERATIONS)]
        deleted = await gather([self._deleted_as_batch(partition, run) for run in runs])
        left = [
            doc_id for run, done in zip(runs, deleted, strict=True) if not done for doc_id in run
        ]
        if left:
            await gather([self.delete(doc_id, partition) for doc_id in left])

    async def _deleted_as_batch(self, partition: str, ids: Sequence[str]) -> bool:
        """False when the ids are left to single deletes: a lone id, or a batch refused
        for an id already gone (none of it applied)."""
        if len(ids) == 1:
            return False
        try:
            await self.batch(partition, [("delete", (doc_id,)) for doc_id in ids], bodies=False)
        except BatchRefused as refused:
            if refused.status != 404:
                raise batch_refusal(refused) from refused
            return False
        return True

    async def patch(
        self,
        doc_id: str,
        partition: str,
        operations: list[dict[str, Any]],
        *,
        only_if: str | None = None,
    ) -> bool:
        """False when the item is gone or `only_if` did not hold."""
        container = await self.container()
        try:
            async with self.errors():
                await container.patch_item(
                    doc_id,
                    partition_key=partition,
                    patch_operations=operations,
                    filter_predicate=only_if,
                    no_response=True,
                    response_hook=self.hook,
                )
        except (CosmosResourceNotFoundError, CosmosAccessConditionFailedError):
            return False
        return True

    # ----------------------------------------------------------------------- queries

    async def pages(
        self,
        query: str,
        params: dict[str, Any],
        *,
        partition: str | None,
        page_size: int,
    ) -> AsyncGenerator[list[Any], None]:
        """One list per page the service returns, following its continuation tokens.

        `partition` None: across partitions (the caller's query must allow it). Each page
        is one bounded call: the caller's time between pages is not the service's.
        """
        container = await self.container()
        scope: dict[str, Any] = {} if partition is None else {"partition_key": partition}
        pager = container.query_items(
            query,
            parameters=[{"name": name, "value": value} for name, value in params.items()],
            max_item_count=page_size,
            response_hook=self.hook,
            **scope,
        ).by_page()
        while True:
            async with self.errors():
                page = await anext(pager, None)
                items = None if page is None else [item async for item in page]
            if items is None:
                return
            yield items

    async def query_all(self, query: str, params: dict[str, Any], *, partition: str) -> list[Any]:
        found: list[Any] = []
        async for page in self.pages(query, params, partition=partition, page_size=BULK_PAGE_SIZE):
            found.extend(page)
        return found

    async def delete_matching(
        self, partition: str, condition: str, params: dict[str, Any], *, order_by: str = ""
    ) -> int:
        """Delete every item of the partition matching `condition`; returns how many.
        `order_by` (an ORDER BY expression): the order they go in, for a delete that
        may stop part-way.

        Re-queries the first batch until nothing matches, so no continuation token
        is held across deletes.
        """
        deleted = 0
        order = f" ORDER BY {order_by}" if order_by else ""
        while True:
            ids = await self.query_all(
                f"SELECT TOP {DELETE_BATCH} VALUE c.id FROM c"
                f" WHERE c.thread_id = @thread AND ({condition}){order}",
                {"@thread": partition, **params},
                partition=partition,
            )
            if not ids:
                return deleted
            await self.delete_ids(partition, [str(doc_id) for doc_id in ids])
            deleted += len(ids)

    async def ids_after(
        self, partition: str, condition: str, after: str, *, limit: int
    ) -> list[str]:
        """Up to `limit` ids greater than `after` matching `condition`, in id order.

        For walks that write as they go: keyed on the id, no continuation token is held.
        """
        return [
            str(doc_id)  # a VALUE query yields the ids themselves
            for doc_id in await self.query_all(
                "SELECT TOP @n VALUE c.id FROM c WHERE c.thread_id = @thread AND c.id > @after"
                f" AND ({condition}) ORDER BY c.id",
                {"@n": limit, "@thread": partition, "@after": after},
                partition=partition,
            )
        ]
