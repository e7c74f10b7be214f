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
from dataclasses import dataclass
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


# Every import the shipped code can execute, function-level (lazy) ones included: the
# index test above only reaches what indexing and one request load, while the cold tiers,
# Entra sign-in and the Azure Monitor exporter are imported on first use, in Azure alone.
# Imports under `if TYPE_CHECKING:` never run and are left out.
IMPORTS_SCRIPT = textwrap.dedent(
    """
    import ast, importlib, json, pathlib, pkgutil, sys
    sys.path.insert(0, ".")

    def typing_only(tree):
        nodes = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                nodes.update(id(sub) for inner in node.body for sub in ast.walk(inner))
        return nodes

    wanted = {}  # module -> names taken from it
    for path in sorted(pathlib.Path(".").rglob("*.py")):
        tree = ast.parse(path.read_text())
        skip = typing_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    wanted.setdefault(alias.name, set())
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                wanted.setdefault(node.module, set()).update(a.name for a in node.names)
    # The package's own modules, each on its own (relative imports included).
    for package in ("state", "support_cases"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, package + "."):
            wanted.setdefault(info.name, set())

    failed = {}
    for module, names in sorted(wanted.items()):
        try:
            loaded = importlib.import_module(module)
            for name in sorted(names - {"*"}):
                if not hasattr(loaded, name):
                    importlib.import_module(f"{module}.{name}")
        except Exception as error:
            failed[module] = f"{type(error).__name__}: {error}"
    print(json.dumps({"checked": sorted(wanted), "failed": failed}))
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


@dataclass(frozen=True)
class Deployed:
    """The package as azd zips it, and a fresh venv holding only its requirements.txt."""

    package: Path
    python: Path
    env: dict[str, str]

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), "-c", script],
            cwd=self.package,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def deployed(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Deployed:
    # The venv's own uv (a dev dependency) first: the machine's may not be on PATH.
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        pytest.fail("uv is not on PATH: run scripts/bootstrap.sh")
    root = tmp_path_factory.mktemp("deployed")
    package = root / "package"
    build_package(repo_root, package)
    venv = root / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [uv, "pip", "install", "--quiet", "--python", str(python), "-r", "requirements.txt"],
        cwd=package,
        check=True,
        capture_output=True,
    )
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return Deployed(package=package, python=python, env=clean_env)


def test_package_indexes_http_and_timer_functions(deployed: Deployed) -> None:
    package = deployed.package
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

    result = deployed.run(INDEX_SCRIPT)
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


def test_every_import_of_the_package_resolves_from_its_requirements(deployed: Deployed) -> None:
    result = deployed.run(IMPORTS_SCRIPT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}, "not installable from requirements.txt alone"
    # The lazy imports were seen: the cold tiers, Entra sign-in, the Azure Monitor exporter.
    assert {
        "psycopg",
        "psycopg_pool",
        "azure.cosmos.aio",
        "azure.identity.aio",
        "redis_entraid.cred_provider",
        "azure.monitor.opentelemetry",
    } <= set(report["checked"])
