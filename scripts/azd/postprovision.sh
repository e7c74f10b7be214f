#!/bin/sh
# azd project hook (postprovision): write function_app/local.settings.json
# (untracked) for running the app locally against the provisioned resources and,
# with the Postgres backend, give the app identity its least-privilege role.
# Exits non-zero only when the Postgres step fails: azd then stops before deploying
# code the database is not ready for. The local file only serves local runs.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
if ! python3 "$here/local_settings.py" "$@"; then
  echo "[azd] function_app/local.settings.json not written (above); the deployment goes on" >&2
fi
if [ "${STATE_COLD_BACKEND:-cosmos}" = "postgres" ]; then
  # Needs psycopg and the `state` package: the project venv.
  venv_python="$here/../../.venv/bin/python"
  if [ ! -x "$venv_python" ]; then
    echo "[azd] postgres: run 'bash scripts/bootstrap.sh', then '.venv/bin/python scripts/azd/postgres_access.py'" >&2
    exit 1
  fi
  "$venv_python" "$here/postgres_access.py"
fi
