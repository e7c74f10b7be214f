"""Writes `function_app/local.settings.json` for running the app locally against Azure.

Run by azd after `azd provision` (postprovision hook). It starts from
`local.settings.sample.json` (every setting the app reads, local-stack values),
drops the local-only secrets (COSMOS_KEY, REDIS_URL, POSTGRES_URL: in Azure the
identity replaces them) and fills in the endpoints that Bicep output into the
azd environment. Locally the app signs in as *you* (`az login` / `azd auth
login` via DefaultAzureCredential), so AZURE_CLIENT_ID stays empty; Bicep gave
your user (AZURE_PRINCIPAL_ID) data access to Cosmos DB and Redis.

The file is untracked (.gitignore) and excluded from the deployment zip
(.funcignore). An existing, different file is backed up under `.azure/` first.
Standard library only: it runs before any venv exists.

    python scripts/azd/local_settings.py [--from-json VALUES.json] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "local.settings.sample.json"
DEFAULT_OUTPUT = REPO_ROOT / "function_app" / "local.settings.json"
BACKUP_DIR = REPO_ROOT / ".azure"

# Settings Bicep outputs under the same names (infra/main.bicep outputs).
FROM_AZURE = (
    "STATE_COLD_BACKEND",
    "COSMOS_ENDPOINT",
    "COSMOS_DATABASE",
    "COSMOS_CONTAINER",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_SSL",
    "POSTGRES_HOST",
    "POSTGRES_DATABASE",
    "POSTGRES_USER",
    # Callers need Entra tokens for the provisioned API registration, locally too.
    "AUTH_TENANT_ID",
    "AUTH_AUDIENCE",
    "AUTH_ALLOWED_CLIENT_IDS",
    # What the deployment chose for the app: a local run against the same Redis and cold
    # tier keeps the deployed TTLs, run limit, pool size and browser origins.
    "STATE_COLD_TTL_SECONDS",
    "STATE_HOT_TTL_SECONDS",
    "CASE_MAX_RUNS",
    "POSTGRES_POOL_MAX_SIZE",
    "CORS_ALLOWED_ORIGINS",
)
# Outputs without which the file would point at nothing in Azure, per cold backend
# (Cosmos DB is not deployed when Postgres is the cold tier).
REQUIRED = {
    "cosmos": ("COSMOS_ENDPOINT", "REDIS_HOST"),
    "postgres": ("POSTGRES_HOST", "REDIS_HOST"),
}
# Secrets the local stack uses; in Azure an Entra identity replaces each of them.
# They must be absent (not empty: an empty REDIS_URL would still be "set").
LOCAL_ONLY_SECRETS = ("COSMOS_KEY", "REDIS_URL", "POSTGRES_URL")
OVERRIDES = {
    # Bicep created the database and container; data-plane RBAC cannot create them.
    "COSMOS_CREATE_IF_MISSING": "false",
    # Empty: DefaultAzureCredential / redis-entraid use your own sign-in locally,
    # not the Function App's managed identity (which only exists in Azure).
    "AZURE_CLIENT_ID": "",
    # Empty: Entra's issuer and signing keys of AUTH_TENANT_ID, not the local issuer.
    "AUTH_ISSUER": "",
    "AUTH_JWKS_URL": "",
}


class LocalSettingsError(RuntimeError):
    """The azd environment does not have what the local settings need."""


def azd_env_values() -> dict[str, str]:
    """`azd env get-values` of the current azd environment (azd exports them to hooks too)."""
    azd = shutil.which("azd")
    if azd is not None:
        result = subprocess.run(
            [azd, "env", "get-values", "--output", "json"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0 and result.stdout.strip():
            loaded = json.loads(result.stdout)
            return {str(k): str(v) for k, v in loaded.items()}
    return dict(os.environ)


def build_local_settings(
    azd_values: Mapping[str, str], sample: Mapping[str, Any]
) -> dict[str, Any]:
    """The local.settings.json document for these azd values."""
    backend = azd_values.get("STATE_COLD_BACKEND") or "cosmos"
    if backend not in REQUIRED:
        raise LocalSettingsError(f"unknown STATE_COLD_BACKEND {backend!r}")
    missing = [name for name in REQUIRED[backend] if not azd_values.get(name)]
    if missing:
        raise LocalSettingsError(
            f"the azd environment has no {', '.join(missing)}: run `azd provision` first"
        )
    values: dict[str, str] = {str(k): str(v) for k, v in sample["Values"].items()}
    for name in LOCAL_ONLY_SECRETS:
        values.pop(name, None)
    for name in FROM_AZURE:
        if name in azd_values:
            values[name] = str(azd_values[name])
    values.update(OVERRIDES)
    if backend == "postgres":
        # Locally you sign in as yourself: the Entra administrator named at provisioning.
        values["POSTGRES_USER"] = str(azd_values.get("AZURE_PRINCIPAL_NAME") or "")
    return {"IsEncrypted": False, "Values": values}


def write_local_settings(
    document: Mapping[str, Any], output: Path, backup_dir: Path = BACKUP_DIR
) -> Path | None:
    """Write `document` to `output`; returns the backup path if a different file was replaced."""
    text = json.dumps(document, indent=2) + "\n"
    backup: Path | None = None
    if output.exists() and output.read_text() != text:
        backup_dir.mkdir(parents=True, exist_ok=True)
        backup = backup_dir / f"{output.name}.bak"
        shutil.copyfile(output, backup)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return backup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="read the azd values from this JSON object instead of `azd env get-values`",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    args = parser.parse_args(argv)

    values = (
        json.loads(args.from_json.read_text()) if args.from_json is not None else azd_env_values()
    )
    sample = json.loads(args.sample.read_text())
    try:
        document = build_local_settings(values, sample)
    except LocalSettingsError as exc:
        print(f"[azd] {exc}", file=sys.stderr)
        return 1
    backup = write_local_settings(document, args.output)
    if backup is not None:
        print(f"[azd] previous {args.output.name} saved as {backup}")
    print(f"[azd] wrote {args.output} (endpoints of the provisioned resources, no secrets)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
