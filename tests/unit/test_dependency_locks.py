"""The deploy package installs exactly the pinned runtime set, and the pins cover pyproject."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;\\]+)", line)
        if match:
            name = re.sub(r"\[.*\]", "", match.group(1)).lower().replace("_", "-")
            pins[name] = match.group(2)
    return pins


def _normalise(requirement: str) -> str:
    name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
    return name.lower().replace("_", "-")


def test_deploy_requirements_are_generated_from_the_runtime_lock() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    deploy = (ROOT / "function_app" / "requirements.txt").read_text()
    expected = "\n".join(line for line in lock.splitlines() if not line.startswith("#"))
    body = "\n".join(line for line in deploy.splitlines() if not line.startswith("#"))
    assert body.strip() == expected.strip(), "run scripts/lock.sh"


def test_every_declared_dependency_is_pinned_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = _pins((ROOT / "requirements.lock").read_text())
    dev = _pins((ROOT / "requirements-dev.lock").read_text())
    for requirement in project["project"]["dependencies"]:
        assert _normalise(requirement) in runtime, requirement
    for requirement in [
        *project["project"]["optional-dependencies"]["cli"],
        *project["dependency-groups"]["dev"],
    ]:
        assert _normalise(requirement) in dev, requirement
    assert "--hash=sha256:" in (ROOT / "requirements.lock").read_text()


def test_runtime_and_dev_locks_agree_on_shared_pins() -> None:
    runtime = _pins((ROOT / "requirements.lock").read_text())
    dev = _pins((ROOT / "requirements-dev.lock").read_text())
    disagreements = {
        name: (version, dev[name])
        for name, version in runtime.items()
        if name in dev and dev[name] != version
    }
    assert not disagreements


def test_the_deploy_package_leaves_the_cli_out() -> None:
    """The Functions app imports neither the CLI nor the local server behind `serve`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deploy = _pins((ROOT / "function_app" / "requirements.txt").read_text())
    for requirement in project["project"]["optional-dependencies"]["cli"]:
        assert _normalise(requirement) not in deploy, requirement
