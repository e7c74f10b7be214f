"""`agent-state` starts without the state library: most commands (the stack's, the HTTP
client's) never use it, and loading it (LangGraph with it) took most of each start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join(str(REPO_ROOT / part) for part in (".", "function_app", "scripts"))

HEAVY = ("state", "langgraph", "azure.cosmos", "redis", "psycopg")


def test_the_cli_loads_without_the_state_library_or_langgraph() -> None:
    probe = (
        "import json, sys; import agent_state_cli.cli; "
        f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        env={"PYTHONPATH": PYTHONPATH, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(loaded.stdout) == [], loaded.stdout
