"""Vendors the top-level `state` package into the Functions project folder.

The Functions worker imports `function_app.py` from the root of the deployed
folder, and a Flex Consumption remote build installs only
`function_app/requirements.txt` (the project itself is not installed). So the
`function_app/` folder that azd zips must carry its own copy of `state/`.

    python scripts/azd/package_state.py copy    # azd prepackage hook
    python scripts/azd/package_state.py clean   # azd postpackage hook

`function_app/state/` is in .gitignore; `copy` always replaces it with a fresh
copy (never a stale one), `clean` removes it so local runs import the real
`state` package. Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "state"
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")


class PackagingError(RuntimeError):
    """The Functions project folder cannot be packaged as it is."""


def copy_state(repo_root: Path = REPO_ROOT, project_dir: Path | None = None) -> Path:
    """Replace `<project_dir>/state` with a clean copy of `<repo_root>/state`."""
    source = repo_root / PACKAGE
    project = project_dir if project_dir is not None else repo_root / "function_app"
    if not (source / "__init__.py").is_file():
        raise PackagingError(f"{source} is not a Python package")
    requirements = project / "requirements.txt"
    if not requirements.is_file() or not requirements.read_text().strip():
        raise PackagingError(
            f"{requirements} is missing or empty: run scripts/lock.sh (the remote build installs it)"
        )
    target = project / PACKAGE
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=IGNORED)
    return target


def remove_state(repo_root: Path = REPO_ROOT, project_dir: Path | None = None) -> bool:
    """Remove the vendored copy; returns whether there was one."""
    project = project_dir if project_dir is not None else repo_root / "function_app"
    target = project / PACKAGE
    if target.is_symlink() or target.is_file():
        target.unlink()
        return True
    if target.exists():
        shutil.rmtree(target)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["copy", "clean"])
    parser.add_argument(
        "--project-dir",
        type=Path,
        default=None,
        help="Functions project folder (default: function_app/ of this repository)",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "copy":
            target = copy_state(project_dir=args.project_dir)
            print(f"[azd] vendored {PACKAGE}/ into {target}")
        elif remove_state(project_dir=args.project_dir):
            print(f"[azd] removed the vendored {PACKAGE}/ copy")
    except PackagingError as exc:
        print(f"[azd] {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
