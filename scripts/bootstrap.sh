#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine (run as root or with sudo):
# redis-server and postgresql from Debian, uv from PyPI, the locked Python environment,
# and the pinned Cosmos emulator from npm. Safe to run again: it skips what is present.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[bootstrap] %s\n' "$*"; }
has() { command -v "$1" >/dev/null 2>&1; }

need_apt=()
has redis-server || need_apt+=(redis-server)
if ! has initdb && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need_apt+=(postgresql)
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# What the machine must bring, checked before anything is installed: otherwise a missing
# npm, or sudo, is found only once the steps before it have run.
missing=()
has python3 || missing+=("python3: Python 3 (apt-get install python3)")
has node || missing+=("node: Node.js, for the Cosmos emulator (apt-get install nodejs npm)")
# npm only installs the emulator: none needed once node_modules holds it.
if [ ! -d node_modules/@vercel/cosmosdb-server ] && ! has npm; then
  missing+=("npm: installs the Cosmos emulator (apt-get install npm)")
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if ! has apt-get; then
    missing+=("apt-get, to install ${need_apt[*]}: on a non-Debian machine install them yourself")
  elif [ -n "$SUDO" ] && ! has sudo; then
    missing+=("root or sudo, to install ${need_apt[*]} with apt-get: run this as root")
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "nothing installed; this machine lacks:" >&2
  printf '[bootstrap]   %s\n' "${missing[@]}" >&2
  exit 1
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  say "installing ${need_apt[*]} from Debian"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

# uv comes from PyPI. Debian's own python3 refuses `pip install` outside a venv
# (PEP 668), so fall back to a private venv under .local/ (needs python3-venv).
if ! has uv && [ ! -x .local/uv/bin/uv ]; then
  say "installing uv"
  if ! python3 -m pip install -q --disable-pip-version-check uv 2>/dev/null; then
    if ! python3 -m venv .local/uv >/dev/null 2>&1; then
      rm -rf .local/uv
      if [ -n "$SUDO" ] && ! has sudo || ! has apt-get; then
        say "python3 cannot make a venv: install python3-venv (as root), then run this again" >&2
        exit 1
      fi
      $SUDO apt-get update -q
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends python3-venv
      python3 -m venv .local/uv
    fi
    .local/uv/bin/pip install -q --disable-pip-version-check uv
  fi
fi
if has uv; then
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
