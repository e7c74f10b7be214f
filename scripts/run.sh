#!/usr/bin/env bash
# Runs everything locally: installs what is missing, starts the local stack (Redis +
# Cosmos emulator, or + Postgres with STATE_COLD_BACKEND=postgres), and serves the API
# on http://127.0.0.1:${PORT:-7071}/api until Ctrl-C; the stack it started stops on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh

backend="${STATE_COLD_BACKEND:-cosmos}"
port="${PORT:-7071}"
cli=.venv/bin/agent-state

# The stack's record; exit 3 (a server of it stopped) still prints it, and `serve` then
# refuses that stack naming the server, rather than `stack up` calling it running.
stack_json() { "$cli" stack status --json || [ $? = 3 ]; }

if stack_json | grep -q '"running": true'; then
  echo "[run] reusing the local stack that is already running"
else
  if [ "$backend" = postgres ]; then "$cli" stack up --postgres; else "$cli" stack up; fi
  # Its Redis (pid and process start) tells this stack from one another terminal started
  # after a `stack down`: that one is not ours to stop on exit.
  redis_of_stack() {
    stack_json | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin).get("servers", {}).get("redis"), sort_keys=True))'
  }
  ours=$(redis_of_stack)
  trap 'if [ "$(redis_of_stack)" = "$ours" ]; then "$cli" stack down; fi' EXIT
fi

# The stack's own issuer, wherever it listens (AGENT_STATE_ISSUER_PORT, or a stack reused).
issuer=$(stack_json | python3 -c 'import json, sys; print(json.load(sys.stdin)["env"]["AUTH_ISSUER"])')

cat <<HINT
[run] API: http://127.0.0.1:${port}/api   (OpenAPI UI: http://127.0.0.1:${port}/api/docs)
[run] submit the demo case from another terminal:
        .venv/bin/agent-state submit --demo --api http://127.0.0.1:${port}
   or   token=\$(curl -s -X POST ${issuer}/token -d '{"name": "me"}' \\
          | python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')
        curl -s -X POST http://127.0.0.1:${port}/api/cases -H 'content-type: application/json' \\
          -H "Authorization: Bearer \$token" -d @docs/case_8842.json
[run] callers need a token (README, "Who may do what"); the stack's issuer at ${issuer} mints them
HINT
# In the background so this shell handles signals while it waits: SIGINT / SIGTERM stop
# the API, then the EXIT trap stops the stack.
"$cli" serve --port "$port" --backend "$backend" &
server=$!
stop_server() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
trap 'stop_server; exit 130' INT
trap 'stop_server; exit 143' TERM
wait "$server"
