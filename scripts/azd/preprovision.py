"""Checks the azd environment before `azd provision` creates anything (preprovision hook).

With the Postgres backend the deploying principal becomes the server's Entra
administrator, the one who creates the app's least-privilege role after provisioning
(`postgres_access.py`). Without AZURE_PRINCIPAL_NAME Bicep would create a server with
no Entra administrator, the postprovision hook could not create that role, and `azd up`
would go on to deploy an app that cannot sign in: refused here instead, before any
resource exists. Standard library only: it runs before any venv exists.

    python scripts/azd/preprovision.py
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping


def problem(env: Mapping[str, str]) -> str | None:
    """Why provisioning with this environment would deploy an app that cannot work."""
    postgres = env.get("STATE_COLD_BACKEND") == "postgres"
    if postgres and not env.get("AZURE_PRINCIPAL_NAME", "").strip():
        return (
            "the Postgres backend needs AZURE_PRINCIPAL_NAME (it becomes the server's Entra "
            "administrator, who creates the app's database role): "
            "`azd env set AZURE_PRINCIPAL_NAME <your user principal name>`, then `azd up`"
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
