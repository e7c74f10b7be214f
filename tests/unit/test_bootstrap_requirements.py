"""`scripts/bootstrap.sh` on a machine without what the README asks of it (Python 3,
Node.js/npm, apt as root or with sudo): it says what is missing and stops before it
installs anything.

Each run is a copy of the script in a directory of its own, on a PATH of only the tools
named here: links to real ones that install nothing, and stubs that fail (python3, so no
pip; apt-get). No sudo or uv: nothing could be installed even if the checks were gone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# What the script runs before its first install step.
BASE_TOOLS = ("bash", "dirname", "id", "ls", "rm")
STUB = "#!/bin/sh\nexit 1\n"


def _bootstrap(tmp_path: Path, tools: dict[str, str | None]) -> subprocess.CompletedProcess[str]:
    """The script run from a copy under `tmp_path`, with `tools` on its PATH: a name mapped
    to None is a link to the real tool, else a stub script of that text."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, stub in {**dict.fromkeys(BASE_TOOLS), **tools}.items():
        if stub is not None:
            (bin_dir / name).write_text(stub)
            (bin_dir / name).chmod(0o755)
            continue
        real = shutil.which(name)
        if real is None:
            pytest.skip(f"{name} is not on this machine")
        (bin_dir / name).symlink_to(os.path.realpath(real))
    copy = tmp_path / "project"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "scripts" / "bootstrap.sh", copy / "scripts" / "bootstrap.sh")
    return subprocess.run(
        [str(bin_dir / "bash"), str(copy / "scripts" / "bootstrap.sh")],
        cwd=copy,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path), "PIP_NO_INDEX": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _lacks(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The missing requirements the script named, one a line, after saying so first."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "installing" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert "command not found" not in result.stderr, result.stderr
    first, *named = result.stderr.strip().splitlines()
    assert first == "[bootstrap] nothing installed; this machine lacks:", result.stderr
    return [line.removeprefix("[bootstrap]   ") for line in named]


def test_without_node_and_npm_it_names_them_before_installing_anything(tmp_path: Path) -> None:
    """Found by review: it failed at its very end with "npm: command not found", after
    installing the rest."""
    # Stubs: only looked up. With redis-server and initdb there, no apt step is due.
    stubs = {"python3": STUB, "redis-server": STUB, "initdb": STUB}
    lacks = _lacks(_bootstrap(tmp_path, stubs))
    assert [line.split(":")[0] for line in lacks] == ["node", "npm"], lacks
    assert all("apt-get install" in line for line in lacks), lacks


def test_without_root_or_sudo_it_says_so_before_installing_anything(tmp_path: Path) -> None:
    """Found by review: not root and no sudo, it failed with "sudo: command not found"."""
    tools = {
        "python3": STUB,
        "node": None,
        "npm": None,
        "id": "#!/bin/sh\necho 1000\n",  # not root
        "apt-get": STUB,  # never run: it stops before
    }
    [line] = _lacks(_bootstrap(tmp_path, tools))
    assert line.startswith("root or sudo, to install redis-server"), line
    assert "run this as root" in line, line


def test_without_python3_venv_and_without_sudo_it_says_what_to_install(tmp_path: Path) -> None:
    """uv is neither on PATH nor pip-installable, and python3 cannot make a venv: the
    fallback installs python3-venv with apt-get, which needs root or sudo."""
    tools = {
        "python3": STUB,  # so `python3 -m pip` and `python3 -m venv` fail
        "node": None,
        "npm": None,
        "redis-server": STUB,
        "initdb": STUB,
        "id": "#!/bin/sh\necho 1000\n",
        "apt-get": STUB,
    }
    result = _bootstrap(tmp_path, tools)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "command not found" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "[bootstrap] python3 cannot make a venv: install python3-venv (as root), then run"
        " this again"
    ), result.stderr


def test_with_the_emulator_installed_it_does_not_ask_for_npm(tmp_path: Path) -> None:
    """Found by review: npm only installs the emulator (`npm ci`), skipped once
    node_modules holds it, yet a machine without npm (a CI cache of node_modules, node
    alone in the image) was refused; it ran before the check came."""
    (tmp_path / "project" / "node_modules" / "@vercel" / "cosmosdb-server").mkdir(parents=True)
    tools = {
        "python3": STUB,  # no uv from pip nor a venv: it stops there, having installed none
        "node": None,
        "redis-server": STUB,
        "initdb": STUB,
        "id": "#!/bin/sh\necho 0\n",  # root: no sudo needed; and no apt-get
    }
    result = _bootstrap(tmp_path, tools)
    assert "lacks" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "[bootstrap] python3 cannot make a venv: install python3-venv (as root), then run"
        " this again"
    ), result.stderr
