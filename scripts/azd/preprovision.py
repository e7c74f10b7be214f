"""Checks the azd environment before `azd provision` creates anything (preprovision hook).

With the Postgres backend the deploying principal becomes the server's Entra
administrator, the one who creates the app's least-privilege role after provisioning
(`postgres_access.py`). Without AZURE_PRINCIPAL_NAME Bicep would create a server with
no Entra administrator, the postprovision hook could not create that role, and `azd up`
would go on to deploy an app that cannot sign in: refused here instead, before any
resource exists. Without VNET_ENABLED the Function App reaches the server only through
the firewall rule that admits every Azure-hosted client (any Azure customer), which is
not opened unless POSTGRES_ALLOW_AZURE_SERVICES says so: refused until one is chosen,
rather than deploying an app that cannot connect. Likewise an AUTH_ALLOWED_CLIENT_IDS
entry that is no application id: the app refuses it at start, and would answer every
request 503; and a STATE_COLD_TTL_SECONDS of 0, which the app refuses too. Standard library only: it runs before any venv exists.

    python scripts/azd/preprovision.py
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

# An Entra application (client) id, as the app checks AUTH_ALLOWED_CLIENT_IDS in Azure
# (support_cases/settings.py), after the same trimming and lower-casing.
GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# Bool parameters of main.bicep read from the azd environment (main.parameters.json).
SWITCHES = ("VNET_ENABLED", "POSTGRES_ALLOW_AZURE_SERVICES")
# The words of Go's strconv.ParseBool, which azd reads a bool parameter with, whole: any
# other spelling (" true", "tRuE") reaches ARM as a string, which it refuses for a bool.
TRUE_WORDS = ("true", "True", "TRUE")
FALSE_WORDS = ("false", "False", "FALSE")
COLD_BACKENDS = ("cosmos", "postgres")
# main.bicep's @maxValue of stateColdTtlSeconds (Cosmos DB's largest TTL, 2^31 - 1).
COLD_TTL_MAX = 2147483647


def enabled(env: Mapping[str, str], name: str) -> bool:
    # As azd reads a bool parameter for Bicep (see TRUE_WORDS).
    return env.get(name, "") in TRUE_WORDS


def misspelled(env: Mapping[str, str]) -> str | None:
    """A switch or backend this hook would read otherwise than intended: a `yes` read
    here as false would skip the checks below for a deployment Bicep may then refuse, or
    a `Postgres` deploy that backend past the checks meant for it."""
    for name in SWITCHES:
        value = env.get(name, "")
        if value not in ("", *TRUE_WORDS, *FALSE_WORDS):
            return f"{name} is {value!r}, not true or false: `azd env set {name} true`"
    backend = env.get("STATE_COLD_BACKEND", "")
    if backend not in ("", *COLD_BACKENDS):
        return (
            f"STATE_COLD_BACKEND is {backend!r}, not one of {', '.join(COLD_BACKENDS)} "
            "(lower case): `azd env set STATE_COLD_BACKEND cosmos`"
        )
    return None


def cold_ttl_problem(value: str) -> str | None:
    """STATE_COLD_TTL_SECONDS as main.bicep's stateColdTtlSeconds takes it: -1 or
    1..2147483647 seconds. 0 is no retention the app accepts (it refuses it at start), and
    Bicep, which never deploys it, would read it as -1: kept forever, not what was asked."""
    if not value:
        return None
    seconds = int(value) if re.fullmatch(r"-?[0-9]+", value) else None
    if seconds is None or not (seconds == -1 or 1 <= seconds <= COLD_TTL_MAX):
        return (
            f"STATE_COLD_TTL_SECONDS is {value!r}: the cold-state retention is -1 (keep "
            f"forever) or a whole number of seconds, 1 to {COLD_TTL_MAX}, never 0: "
            "`azd env set STATE_COLD_TTL_SECONDS 2592000` (30 days), then `azd up`"
        )
    return None


def problem(env: Mapping[str, str]) -> str | None:
    """Why provisioning with this environment would deploy an app that cannot work."""
    if (found := misspelled(env)) is not None:
        return found
    postgres = env.get("STATE_COLD_BACKEND") == "postgres"
    if postgres and not env.get("AZURE_PRINCIPAL_NAME", "").strip():
        return (
            "the Postgres backend needs AZURE_PRINCIPAL_NAME (it becomes the server's Entra "
            "administrator, who creates the app's database role): "
            "`azd env set AZURE_PRINCIPAL_NAME <your user principal name>`, then `azd up`"
        )
    if postgres and not (
        enabled(env, "VNET_ENABLED") or enabled(env, "POSTGRES_ALLOW_AZURE_SERVICES")
    ):
        return (
            "the Postgres backend without VNET_ENABLED needs POSTGRES_ALLOW_AZURE_SERVICES: "
            "the Function App has no fixed outbound IPs, so the server's firewall must admit "
            "every Azure-hosted client (any Azure customer; Entra sign-in alone keeps them "
            "out). Either `azd env set VNET_ENABLED true` (private endpoint) or "
            "`azd env set POSTGRES_ALLOW_AZURE_SERVICES true`, then `azd up`"
        )
    # Unstripped: azd passes the value as written, and one ParseInt cannot read whole
    # (" 2592000 ") reaches ARM as a string, which refuses it for an int parameter.
    if (found := cold_ttl_problem(env.get("STATE_COLD_TTL_SECONDS", ""))) is not None:
        return found
    written = [entry.strip() for entry in env.get("AUTH_ALLOWED_CLIENT_IDS", "").split(",")]
    for position, client_id in enumerate((entry for entry in written if entry), start=1):
        if not GUID.fullmatch(client_id.lower()):
            # By position, as the app names it: a value pasted by mistake is not repeated.
            return (
                f"AUTH_ALLOWED_CLIENT_IDS: entry {position} is not an application (client) "
                "id, a GUID such as 04b07795-8ddb-461a-bbee-02f9e1bf7b46 (a name is not "
                "accepted: `az ad app list --display-name <name> --query [].appId`); "
                "`azd env set AUTH_ALLOWED_CLIENT_IDS <id>[,<id>...]`, then `azd up`"
            )
    return None


def main(env: Mapping[str, str] | None = None) -> int:
    found = problem(os.environ if env is None else env)
    if found is not None:
        print(f"[azd] preprovision: {found}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
