#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine (run as root or with sudo):
# redis-server and postgresql from Debian, uv from PyPI, the locked Python environment,
# and the pinned Cosmos emulator from npm. Safe to run again: it skips what is present.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[bootstrap] %s\n' "$*"; }

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need_apt+=(postgresql)
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ${#need_apt[@]} -gt 0 ]; then
  say "installing ${need_apt[*]} from Debian"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

# uv comes from PyPI. Debian's own python3 refuses `pip install` outside a venv
# (PEP 668), so fall back to a private venv under .local/ (needs python3-venv).
if ! command -v uv >/dev/null 2>&1 && [ ! -x .local/uv/bin/uv ]; then
  say "installing uv"
  if ! python3 -m pip install -q --disable-pip-version-check uv 2>/dev/null; then
    if ! python3 -m venv .local/uv >/dev/null 2>&1; then
      rm -rf .local/uv
      $SUDO apt-get update -q
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends python3-venv
      python3 -m venv .local/uv
    fi
    .local/uv/bin/pip install -q --disable-pip-version-check uv
  fi
fi
if command -v uv >/dev/null 2>&1; then
  UV=(uv)
elif [ -x .local/uv/bin/uv ]; then
  UV=(.local/uv/bin/uv)
else
  UV=(python3 -m uv)  # installed, but its script is not on PATH (e.g. pyenv before a rehash)
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "${UV[@]}" venv --quiet --python 3.11 .venv 2>/dev/null || "${UV[@]}" venv --quiet .venv
fi
say "syncing .venv with requirements-dev.lock"
# Bytecode compiled at install: where PYTHONDONTWRITEBYTECODE is set (as on CI machines)
# nothing else caches it, and every process (a CLI call, a test's API worker) would
# compile its imports again: about a second of CPU each (measured: 1.84 s -> 0.86 s).
"${UV[@]}" pip sync --quiet --compile-bytecode --python .venv/bin/python requirements-dev.lock
"${UV[@]}" pip install --quiet --python .venv/bin/python --no-deps -e .

if [ ! -d node_modules/@vercel/cosmosdb-server ]; then
  say "installing the Cosmos emulator (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error
fi
say "ready"
