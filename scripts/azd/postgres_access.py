"""Gives the app's managed identity least-privilege access to the Postgres cold tier.

Run by azd after provisioning (postprovision hook) when STATE_COLD_BACKEND=postgres,
signed in as the deploying user, whom Bicep made the server's Entra administrator
(the app identity is not an administrator). It:

1. creates the app identity's Postgres role once, in the `postgres` database
   (`pgaadauth_create_principal_with_oid`: a login role and nothing else);
2. applies the app's schema migrations itself (`state.cold.migrations`), so the
   administrator owns the schema and the app finds nothing left to apply;
3. grants the app role CONNECT on the database, USAGE on schema `public`,
   SELECT/INSERT/UPDATE/DELETE on its tables and USAGE/SELECT on its sequences,
   now and (default privileges) for tables later migrations create the same way.
   No CREATE anywhere: the app cannot change the schema.

Locally you sign in as yourself (the administrator, POSTGRES_USER = your
principal name). A release with a new migration needs this hook again before the
app starts (`azd up` runs it before deploying; or run it by hand).

Needs the project venv (psycopg and the `state` package: `bash scripts/bootstrap.sh`)
and a route to the server: your IP in its firewall (POSTGRES_CLIENT_IP) or, with
VNET_ENABLED, a machine inside the VNet.

    .venv/bin/python scripts/azd/postgres_access.py [--from-json VALUES.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `state` importable
    sys.path.insert(0, str(REPO_ROOT))

from psycopg import AsyncConnection, Error, sql  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

from state.cold.migrations import migrate  # noqa: E402
from state.cold.postgres_client import ENTRA_SCOPE, POSTGRES_PORT, VERIFIED_TLS  # noqa: E402

# Creates the role of an Entra principal (by name and object id) on the server.
CreatePrincipal = Callable[[AsyncConnection, "AccessPlan"], Awaitable[None]]
TABLE_RIGHTS = sql.SQL("SELECT, INSERT, UPDATE, DELETE")
SEQUENCE_RIGHTS = sql.SQL("USAGE, SELECT")


class AccessError(RuntimeError):
    """The azd environment or the server does not allow setting up the app's role."""


@dataclass(frozen=True)
class AccessPlan:
    """Who gets access to what: the app identity's role on one database."""

    app_role: str
    app_object_id: str
    database: str

    @classmethod
    def from_azd(cls, values: Mapping[str, str]) -> AccessPlan:
        needed = ("AZURE_FUNCTION_IDENTITY_NAME", "AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID")
        missing = [name for name in needed if not values.get(name)]
        if missing:
            raise AccessError(f"the azd environment has no {', '.join(missing)}")
        return cls(
            app_role=values["AZURE_FUNCTION_IDENTITY_NAME"],
            app_object_id=values["AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID"],
            database=values.get("POSTGRES_DATABASE") or "agentstate",
        )


def grant_statements(plan: AccessPlan) -> list[sql.Composed]:
    """What the app role may do in `plan.database` (run there, as the schema owner)."""
    role = sql.Identifier(plan.app_role)
    return [
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(plan.database), role),
        sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role),
        sql.SQL("GRANT {} ON ALL TABLES IN SCHEMA public TO {}").format(TABLE_RIGHTS, role),
        sql.SQL("GRANT {} ON ALL SEQUENCES IN SCHEMA public TO {}").format(SEQUENCE_RIGHTS, role),
        # Tables that later migrations (run by this hook, as the same owner) create.
        sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT {} ON TABLES TO {}").format(
            TABLE_RIGHTS, role
        ),
        sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT {} ON SEQUENCES TO {}").format(
            SEQUENCE_RIGHTS, role
        ),
    ]


async def azure_create_principal(conn: AsyncConnection, plan: AccessPlan) -> None:
    """Azure Database for PostgreSQL's way (run in `postgres`): a login role bound to the
    managed identity's object id, with no other right (not admin, not a member of any role)."""
    await conn.execute(
        "SELECT * FROM pgaadauth_create_principal_with_oid(%s, %s, 'service', false, false)",
        (plan.app_role, plan.app_object_id),
    )


async def ensure_role(
    server_conninfo: str, plan: AccessPlan, create_principal: CreatePrincipal
) -> bool:
    """Create the app role unless it exists; True when created now."""
    async with await AsyncConnection.connect(server_conninfo, autocommit=True) as conn:
        cursor = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (plan.app_role,))
        if await cursor.fetchone() is not None:
            return False
        await create_principal(conn, plan)
        return True


async def apply(
    server_conninfo: str,
    plan: AccessPlan,
    *,
    create_principal: CreatePrincipal = azure_create_principal,
) -> list[str]:
    """Role, schema, grants; returns what was done, for the hook's log."""
    done = []
    if await ensure_role(make_conninfo(server_conninfo, dbname="postgres"), plan, create_principal):
        done.append(f"created role {plan.app_role}")
    database_conninfo = make_conninfo(server_conninfo, dbname=plan.database)
    async with await AsyncConnection.connect(database_conninfo, autocommit=True) as conn:
        applied = await migrate(conn)
        done.append(f"applied {len(applied)} migration(s)")
        async with conn.transaction():
            for statement in grant_statements(plan):
                await conn.execute(statement)
        done.append(f"granted {plan.app_role} data access on {plan.database} (no DDL)")
    return done


def entra_token() -> str:
    """An Entra access token for Azure Database for PostgreSQL, as the signed-in user."""
    azd = shutil.which("azd")
    if azd is not None:
        result = subprocess.run(
            [azd, "auth", "token", "--scope", ENTRA_SCOPE, "--output", "json"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0 and result.stdout.strip():
            return str(json.loads(result.stdout)["token"])
    az = shutil.which("az")
    if az is not None:
        result = subprocess.run(
            [
                *(az, "account", "get-access-token", "--resource-type", "oss-rdbms"),
                *("--query", "accessToken", "--output", "tsv"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    raise AccessError("no Entra token: sign in with `azd auth login` (or `az login`)")


def azd_env_values() -> dict[str, str]:
    azd = shutil.which("azd")
    if azd is None:
        raise AccessError("azd is not on PATH; pass --from-json")
    result = subprocess.run(
        [azd, "env", "get-values", "--output", "json"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise AccessError(f"azd env get-values failed: {result.stderr.strip()}")
    return {str(k): str(v) for k, v in json.loads(result.stdout).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-json", type=Path, default=None, help="azd values as a JSON object")
    args = parser.parse_args(argv)
    try:
        values = (
            json.loads(args.from_json.read_text())
            if args.from_json is not None
            else azd_env_values()
        )
        if values.get("STATE_COLD_BACKEND") != "postgres":
            print("[azd] cold tier is not Postgres: no database role to set up")
            return 0
        host, admin = values.get("POSTGRES_HOST"), values.get("AZURE_PRINCIPAL_NAME")
        if not host or not admin:
            raise AccessError(
                "POSTGRES_HOST and AZURE_PRINCIPAL_NAME are needed: "
                "`azd env set AZURE_PRINCIPAL_NAME <your user principal name>`, then `azd provision`"
            )
        plan = AccessPlan.from_azd(values)
        server = make_conninfo(
            host=host, port=POSTGRES_PORT, user=admin, password=entra_token(), **VERIFIED_TLS
        )
        for line in asyncio.run(apply(server, plan)):
            print(f"[azd] postgres: {line}")
    except (AccessError, Error) as exc:
        print(f"[azd] postgres: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
