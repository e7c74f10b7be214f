"""Refusals of the cold stores reach callers as the library's typed errors, never as the
SDK's or the driver's own exceptions (real Cosmos emulator and real Postgres)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable

import pytest
from azure.cosmos.exceptions import CosmosResourceNotFoundError

from state.cold.cosmos_client import CosmosConnection, cosmos_errors
from state.errors import InvalidValue, RequestRejected, StateError
from state.factory import Backends, backends_for
from state.ports import StoredCheckpoint
from state.settings import Settings
from tests.support.records import unique_thread


@pytest.fixture
async def postgres(make_settings: Callable[..., Settings]) -> AsyncIterator[Backends]:
    async with backends_for(make_settings("postgres", hot=False)) as backends:
        yield backends


@pytest.mark.parametrize(
    ("value", "sqlstate"),
    [("a NUL \u0000 inside", "22P05"), (float("nan"), "22P02")],
    ids=["nul-character", "nan"],
)
async def test_postgres_data_errors_are_invalid_value(
    postgres: Backends, value: object, sqlstate: str
) -> None:
    thread = unique_thread("typed")
    with pytest.raises(InvalidValue) as refused:
        await postgres.cold.create(thread, {"s": value}, agent_id="a")
    assert refused.value.backend == "postgres" and refused.value.code == sqlstate
    assert await postgres.cold.get(thread) is None

    await postgres.cold.create(thread, {"s": 1}, agent_id="a")
    with pytest.raises(InvalidValue):
        await postgres.cold.update_section(thread, "s", value, expected_version=1, agent_id="a")
    record = await postgres.cold.get(thread)
    assert record is not None and (record.version, record.sections) == (1, {"s": 1})


@pytest.fixture
async def cosmos(make_settings: Callable[..., Settings]) -> AsyncIterator[CosmosConnection]:
    connection = CosmosConnection(make_settings("cosmos", hot=False).cosmos)
    try:
        yield connection
    finally:
        await connection.close()


async def test_a_document_cosmos_refuses_is_invalid_value(cosmos: CosmosConnection) -> None:
    container = await cosmos.container()
    thread = unique_thread("typed")
    with pytest.raises(InvalidValue) as refused, cosmos_errors():
        await container.create_item({"thread_id": thread}, enable_automatic_id_generation=False)
    assert refused.value.backend == "cosmos" and refused.value.code == 400
    assert "missing id" in str(refused.value)


async def test_a_query_cosmos_refuses_is_typed(cosmos: CosmosConnection) -> None:
    container = await cosmos.container()
    with pytest.raises(StateError) as refused, cosmos_errors():
        _ = [item async for item in container.query_items("SELEC nothing", partition_key="t")]
    assert isinstance(refused.value, RequestRejected) and refused.value.code == 400


async def test_conditional_answers_stay_for_the_adapters_to_interpret(
    cosmos: CosmosConnection,
) -> None:
    container = await cosmos.container()
    with pytest.raises(CosmosResourceNotFoundError), cosmos_errors():
        await container.read_item("absent", partition_key=unique_thread("typed"))


@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
async def test_checkpoint_metadata_json_cannot_carry_is_invalid_value(
    make_settings: Callable[..., Settings], backend: str
) -> None:
    """A NaN in a checkpoint's metadata is refused as `InvalidValue` by both stores, and
    nothing is stored (on Cosmos, before sending: the emulator answers it with a 500)."""
    async with backends_for(make_settings(backend, hot=False)) as backends:
        thread = unique_thread("typed")
        checkpoint = StoredCheckpoint(
            thread_id=thread,
            checkpoint_ns="",
            checkpoint_id="1f000000-0000-6000-8000-000000000001",
            parent_checkpoint_id=None,
            checkpoint=("msgpack", b"checkpoint"),
            metadata={"score": float("nan")},
            channel_versions={},
        )
        with pytest.raises(InvalidValue) as refused:
            await backends.checkpoints.put_checkpoint(checkpoint, [])
        assert refused.value.backend == backend
        assert await backends.checkpoints.get_checkpoint(thread, "", None) is None


async def test_a_key_over_a_postgres_index_limit_is_invalid_value_not_an_outage(
    postgres: Backends,
) -> None:
    """A key whose index entry passes btree's limit (2704 bytes; random text does not
    compress under it) fails the same way however often it is sent: `InvalidValue`,
    not `BackendUnavailable`, which callers retry as an outage."""
    thread = unique_thread("typed") + secrets.token_urlsafe(4000)
    with pytest.raises(InvalidValue) as refused:
        await postgres.cold.create(thread, {"s": 1}, agent_id="a")
    assert refused.value.backend == "postgres" and refused.value.code == "54000"
    checkpoint = StoredCheckpoint(
        thread_id=thread,
        checkpoint_ns="",
        checkpoint_id="1f000000-0000-6000-8000-000000000001",
        parent_checkpoint_id=None,
        checkpoint=("msgpack", b"checkpoint"),
        metadata={},
        channel_versions={},
    )
    with pytest.raises(InvalidValue):
        await postgres.checkpoints.put_checkpoint(checkpoint, [])


async def test_text_postgres_cannot_encode_is_invalid_value(postgres: Backends) -> None:
    """A lone surrogate (not UTF-8) in a text parameter (an agent id, a run id, a checkpoint
    namespace) is refused as `InvalidValue`, as every store refuses it, not psycopg's
    encoder failing with a plain UnicodeEncodeError; nothing is stored."""
    thread = unique_thread("typed")
    with pytest.raises(InvalidValue) as refused:
        await postgres.cold.create(thread, {"s": 1}, agent_id="agent \ud800")
    assert refused.value.backend == "postgres"
    assert await postgres.cold.get(thread) is None
    with pytest.raises(InvalidValue):
        await postgres.checkpoints.delete_for_runs(["run \ud800"])
    with pytest.raises(InvalidValue):
        await postgres.checkpoints.get_checkpoint(thread, "ns \udc00", None)
