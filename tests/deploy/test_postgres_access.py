"""The Postgres least-privilege hook (scripts/azd/postgres_access.py) against a real server.

Azure's Entra role creation (`pgaadauth_create_principal_with_oid`) exists only on
Azure Database for PostgreSQL, so the test creates the app role with a plain
`CREATE ROLE ... LOGIN`; everything else (migrations as the administrator, the
grants) runs exactly as in Azure. The administrator is a non-superuser with
CREATEROLE, owning the database through a group role, as the Entra administrator
of a Flexible Server does (a member of azure_pg_admin, not a superuser).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import psycopg
import pytest
from psycopg import AsyncConnection, sql
from psycopg.conninfo import make_conninfo

from state.cold.migrations import MIGRATIONS
from state.cold.postgres_client import PostgresConnection
from state.cold.postgres_store import PostgresStateStore
from state.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def load_hook() -> ModuleType:
    path = REPO / "scripts" / "azd" / "postgres_access.py"
    spec = importlib.util.spec_from_file_location("azd_postgres_access", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


hook = load_hook()


async def plain_create_principal(conn: AsyncConnection, plan: object) -> None:
    await conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(plan.app_role)))  # type: ignore[attr-defined]


class Server:
    """A database on the test server with an Entra-like administrator."""

    def __init__(self, superuser_url: str) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.superuser_url = superuser_url
        self.database = f"agentstate_{suffix}"
        self.owners = f"server_admins_{suffix}"
        self.admin = f"admin_{suffix}@example.com"
        self.app = f"id-api-{suffix}"

    def url(self, user: str, database: str | None = None) -> str:
        return make_conninfo(self.superuser_url, user=user, dbname=database or self.database)

    def plan(self) -> object:
        return hook.AccessPlan(self.app, str(uuid.uuid4()), self.database)


@pytest.fixture
async def server(stack_env: dict[str, str]) -> AsyncIterator[Server]:
    here = Server(stack_env["POSTGRES_URL"])
    with psycopg.connect(here.superuser_url, autocommit=True) as su:
        su.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(here.owners)))
        su.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEROLE IN ROLE {}").format(
                sql.Identifier(here.admin), sql.Identifier(here.owners)
            )
        )
        su.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(here.database), sql.Identifier(here.owners)
            )
        )
    try:
        yield here
    finally:
        with psycopg.connect(here.superuser_url, autocommit=True) as su:
            su.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(here.database)
                )
            )
            for role in (here.app, here.admin, here.owners):
                su.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def app_settings(url: str) -> Settings:
    return Settings.model_validate(
        {"state_cold_backend": "postgres", "postgres_url": url, "state_write_mode": "write-through"}
    )


async def test_app_role_reads_and_writes_but_cannot_change_the_schema(server: Server) -> None:
    plan = server.plan()
    done = await hook.apply(
        server.url(server.admin, "postgres"), plan, create_principal=plain_create_principal
    )
    assert done[0] == f"created role {server.app}"
    assert done[1] == f"applied {len(MIGRATIONS)} migration(s)"

    # The app, signed in as its own role: startup migrations find nothing to do,
    # a record round-trips, the audit trail is written.
    pg = PostgresConnection(app_settings(server.url(server.app)).postgres)
    store = PostgresStateStore(pg)
    try:
        await store.setup()
        created = await store.create("case_1", {"request": {"text": "hi"}}, agent_id="intake")
        updated = await store.update_section(
            "case_1", "billing", {"ok": True}, expected_version=created.version, agent_id="b"
        )
        assert (await store.get("case_1")) == updated
        assert len(await store.audit_trail("case_1")) == 2
    finally:
        await store.close()

    async with await AsyncConnection.connect(server.url(server.app), autocommit=True) as app:
        for ddl in (
            "CREATE TABLE intruder (id int)",
            "DROP TABLE workflow_records",
            "ALTER TABLE workflow_records ADD COLUMN x int",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await app.execute(ddl)

    # The administrator (the developer, locally) owns the schema and sees the app's writes.
    async with await AsyncConnection.connect(server.url(server.admin), autocommit=True) as admin:
        cursor = await admin.execute(
            "SELECT version FROM workflow_records WHERE thread_id = 'case_1'"
        )
        assert await cursor.fetchone() == (updated.version,)


async def test_rerunning_the_hook_changes_nothing_and_keeps_access(server: Server) -> None:
    plan = server.plan()
    admin_url = server.url(server.admin, "postgres")
    await hook.apply(admin_url, plan, create_principal=plain_create_principal)
    again = await hook.apply(admin_url, plan, create_principal=plain_create_principal)
    assert again[0] == "applied 0 migration(s)"
    async with await AsyncConnection.connect(server.url(server.app), autocommit=True) as app:
        cursor = await app.execute("SELECT count(*) FROM schema_migrations")
        assert await cursor.fetchone() == (len(MIGRATIONS),)


async def test_tables_a_later_migration_creates_are_granted_too(server: Server) -> None:
    plan = server.plan()
    await hook.apply(
        server.url(server.admin, "postgres"), plan, create_principal=plain_create_principal
    )
    async with await AsyncConnection.connect(server.url(server.admin), autocommit=True) as admin:
        await admin.execute("CREATE TABLE later_table (id serial PRIMARY KEY, v text)")
    async with await AsyncConnection.connect(server.url(server.app), autocommit=True) as app:
        await app.execute("INSERT INTO later_table (v) VALUES ('x')")
        cursor = await app.execute("SELECT v FROM later_table")
        assert await cursor.fetchall() == [("x",)]


def test_hook_skips_other_backends_and_refuses_without_an_administrator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    values = tmp_path / "values.json"
    values.write_text(json.dumps({"STATE_COLD_BACKEND": "cosmos"}))
    assert hook.main(["--from-json", str(values)]) == 0
    values.write_text(
        json.dumps({"STATE_COLD_BACKEND": "postgres", "POSTGRES_HOST": "psql-x.postgres.database"})
    )
    assert hook.main(["--from-json", str(values)]) == 1
    assert "AZURE_PRINCIPAL_NAME" in capsys.readouterr().err
