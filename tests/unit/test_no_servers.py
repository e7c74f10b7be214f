"""tests/unit stays server-free: no unit test asks for a fixture that starts a server, and
no unit module imports what starts one (devstack, the suites that run servers).

Servers start only through the fixtures of tests/conftest.py that depend on `stack`, so
those are found by reading that file, not listed here. The check reads source (it works
when this test runs alone) and, for the tests collected with it, their fixture closures.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
UNIT = TESTS / "unit"
# What starts servers, or belongs to a suite that does.
FORBIDDEN_MODULES: tuple[str, ...] = (
    "devstack",
    "tests.conftest",
    "tests.contract",
    "tests.e2e",
    "tests.faults",
    "tests.integration",
)


def _fixtures(tree: ast.Module) -> dict[str, set[str]]:
    """Fixture name -> the names of its parameters, for every `@pytest.fixture` function."""
    found: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
            "fixture" in ast.unparse(decorator) for decorator in node.decorator_list
        ):
            found[node.name] = {arg.arg for arg in node.args.args}
    return found


def server_fixtures(conftest_source: str) -> set[str]:
    """The fixtures of a conftest that start servers: `stack` and whatever depends on it."""
    fixtures = _fixtures(ast.parse(conftest_source))
    starting = {"stack"}
    while grown := {name for name, args in fixtures.items() if args & starting} - starting:
        starting |= grown
    return starting


def _imports(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def violations(source: str, name: str, forbidden_fixtures: set[str]) -> list[str]:
    """What in one module's source would start a server: forbidden imports (and, through
    the test helpers it imports, theirs), and function parameters naming a server fixture."""
    tree = ast.parse(source)
    found: list[str] = []
    for module in _imports(tree):
        if module.startswith(FORBIDDEN_MODULES):
            found.append(f"{name} imports {module}")
        elif module.startswith("tests."):
            helper = TESTS.parent / (module.replace(".", "/") + ".py")
            if helper.exists():
                found += violations(helper.read_text(), module, forbidden_fixtures)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for arg in node.args.args:
                if arg.arg in forbidden_fixtures:
                    found.append(f"{name}:{node.name} asks for the {arg.arg!r} fixture")
    return found


@pytest.fixture(scope="module")
def forbidden_fixtures() -> set[str]:
    return server_fixtures((TESTS / "conftest.py").read_text())


def test_the_server_fixtures_are_found_in_the_root_conftest(forbidden_fixtures: set[str]) -> None:
    assert {"stack", "stack_env", "env_for", "fresh_postgres_url"} <= forbidden_fixtures
    assert "repo_root" not in forbidden_fixtures


def test_the_check_catches_a_server_import_and_a_server_fixture(
    forbidden_fixtures: set[str],
) -> None:
    source = (
        "import devstack\n"
        "from tests.faults.proxy import Proxy\n"
        "def test_x(stack_env, tmp_path): ...\n"
    )
    assert violations(source, "sample", forbidden_fixtures) == [
        "sample imports devstack",
        "sample imports tests.faults.proxy",
        "sample:test_x asks for the 'stack_env' fixture",
    ]


def test_no_unit_module_starts_a_server(forbidden_fixtures: set[str]) -> None:
    modules = sorted(UNIT.glob("*.py"))
    assert Path(__file__) in modules
    found = [
        problem
        for path in modules
        for problem in violations(path.read_text(), path.name, forbidden_fixtures)
    ]
    assert found == []


def test_no_collected_unit_test_depends_on_the_stack(request: pytest.FixtureRequest) -> None:
    """The fixture closure as pytest resolved it (conftest overrides, indirect use)."""
    unit_items = [item for item in request.session.items if UNIT in Path(item.path).parents]
    assert request.node in unit_items
    assert [
        item.nodeid for item in unit_items if "stack" in getattr(item, "fixturenames", ())
    ] == []
