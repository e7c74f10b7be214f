"""The deploy package as azd builds it indexes in a fresh interpreter, the way the worker does.

The package is `function_app/` (minus what .funcignore leaves out) after the
prepackage hook vendored `state/` into it. A fresh venv gets only the
package's requirements.txt (as the Flex Consumption remote build does); the
repository is not on its path and the project is not installed in it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

INDEX_SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib, json, sys
    sys.path.insert(0, ".")  # the worker puts the script root first on sys.path
    entry = importlib.import_module("function_app")  # by file stem, like the worker
    import azure.functions as func
    import state, support_cases

    functions = entry.app.get_functions()  # once: the SDK refuses to build the list twice

    async def openapi_status():
        http = next(f for f in functions if f.get_function_name() == "http_app_func")
        request = func.HttpRequest("GET", "http://localhost/api/openapi.json", body=b"")
        response = await http.get_user_function()(request, None)
        return response.status_code, sorted(json.loads(response.get_body())["paths"])

    status, paths = asyncio.run(openapi_status())
    print(json.dumps({
        "functions": [json.loads(f.get_function_json()) | {"name": f.get_function_name()}
                      for f in functions],
        "state_file": state.__file__,
        "support_cases_file": support_cases.__file__,
        "openapi_status": status,
        "openapi_paths": paths,
        "modules": sorted(sys.modules),
    }))
    """
)


def build_package(repo_root: Path, target: Path) -> None:
    ignored = [
        line.strip().rstrip("/")
        for line in (repo_root / "function_app" / ".funcignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    shutil.copytree(
        repo_root / "function_app",
        target,
        # A vendored state/ left in the working tree is replaced by the hook anyway.
        ignore=shutil.ignore_patterns(*ignored, "state"),
    )
    subprocess.run(
        ["sh", str(repo_root / "scripts" / "azd" / "prepackage.sh"), "--project-dir", str(target)],
        check=True,
        capture_output=True,
    )


def test_package_indexes_http_and_timer_functions(repo_root: Path, tmp_path: Path) -> None:
    # The venv's own uv (a dev dependency) first: the machine's may not be on PATH.
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        pytest.fail("uv is not on PATH: run scripts/bootstrap.sh")
    package = tmp_path / "package"
    build_package(repo_root, package)
    assert (package / "state" / "tiered.py").is_file()
    assert (package / "host.json").is_file() and not (package / "tests").exists()
    # No developer or test tool ships: the CLI, its token helper, the local stack, test hooks.
    shipped = {path.relative_to(package).as_posix() for path in package.rglob("*.py")}
    assert "support_cases/api.py" in shipped and "support_cases/runtime.py" in shipped
    tools = {
        path
        for path in shipped
        if path.split("/")[0] in ("devstack", "agent_state_cli", "tests")
        or path.rsplit("/", 1)[-1] in ("cli.py", "tokens.py", "faults.py", "step_pause.py")
    }
    assert tools == set()

    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [uv, "pip", "install", "--quiet", "--python", str(python), "-r", "requirements.txt"],
        cwd=package,
        check=True,
        capture_output=True,
    )
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    result = subprocess.run(
        [str(python), "-c", INDEX_SCRIPT],
        cwd=package,
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])

    # Everything came from the package itself, not from the repository.
    assert Path(report["state_file"]).resolve().is_relative_to(package.resolve())
    assert Path(report["support_cases_file"]).resolve().is_relative_to(package.resolve())
    # Indexing and serving a request imported no developer tool (nor the CLI's libraries).
    loaded = {name.split(".")[0] for name in report["modules"]}
    assert loaded.isdisjoint({"devstack", "agent_state_cli", "typer", "tests"})
    assert "support_cases.api" in report["modules"]

    functions = {f["name"]: f for f in report["functions"]}
    assert set(functions) == {"http_app_func", "resume_stale_runs"}
    http_trigger = functions["http_app_func"]["bindings"][0]
    assert http_trigger["type"] == "httpTrigger" and http_trigger["route"] == "/{*route}"
    assert {"GET", "POST"} <= set(http_trigger["methods"])
    timer = functions["resume_stale_runs"]["bindings"][0]
    assert timer["type"] == "timerTrigger" and timer["schedule"] == "0 */1 * * * *"
    for function in functions.values():
        assert function["scriptFile"] == "function_app.py"

    # The HTTP function really dispatches into FastAPI under /api (no backend needed).
    assert report["openapi_status"] == 200
    assert "/api/cases" in report["openapi_paths"]
    host = json.loads((package / "host.json").read_text())
    assert host["telemetryMode"] == "OpenTelemetry"
    assert host["extensions"]["http"]["routePrefix"] == "api"
