"""The demo body the docs tell users to curl is the one the CLI and the tests submit."""

from __future__ import annotations

import json
from pathlib import Path

from support_cases.demo import DEMO_CASE_ID, demo_case
from support_cases.models import CaseSubmission


def test_docs_demo_body_matches_the_cli_demo(repo_root: Path) -> None:
    documented = json.loads((repo_root / "docs" / "case_8842.json").read_text())
    assert documented == demo_case()
    assert CaseSubmission.model_validate(documented).case_id == DEMO_CASE_ID
