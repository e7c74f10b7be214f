"""The README's concrete claims that the code can check without a server: its example
case answer has the API's fields, its tables name the settings, metrics and Postgres
tables the code has, and the typed errors it names exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

import state.errors
from state.cold.migrations import MIGRATIONS
from support_cases import metrics
from support_cases.api import PUBLIC_PATHS, create_app
from support_cases.models import CaseLinks, CaseView
from support_cases.runtime import RuntimeHolder
from support_cases.settings import AppSettings

README = Path(__file__).resolve().parents[2] / "README.md"
TEXT = README.read_text()


def section(heading: str) -> str:
    """The README's text from `heading` to the next heading of any level."""
    after = TEXT.split(f"\n{heading}\n", 1)[1]
    return re.split(r"\n#{2,4} ", after, maxsplit=1)[0]


def first_column(table_section: str) -> set[str]:
    """The backticked names in the first column of a section's Markdown table."""
    return set(re.findall(r"^\| `([^`]+)` \|", table_section, flags=re.MULTILINE))


def test_the_example_case_answer_has_the_fields_of_a_case_view() -> None:
    block = section("### Submit the demo case `case_8842`").split("```json\n", 1)[1]
    example = json.loads(block.split("```", 1)[0])
    assert set(example) == set(CaseView.model_fields)
    assert set(example["links"]) == set(CaseLinks.model_fields)


def test_the_settings_table_names_every_setting_the_app_reads() -> None:
    documented = first_column(section("### Settings"))
    read = {name.upper() for name in AppSettings.model_fields}
    host_only = {"AzureWebJobsStorage", "FUNCTIONS_WORKER_RUNTIME"}
    assert documented - host_only == read


def test_the_metrics_table_names_the_apps_metrics() -> None:
    table = section("### Metrics")
    documented = set(re.findall(r"^\| `(agent_state\.[a-z_.]+)`", table, flags=re.MULTILINE))
    defined = {
        value
        for name, value in vars(metrics).items()
        if name.isupper() and isinstance(value, str) and value.startswith("agent_state.")
    }
    backlog = {name for name in defined if name.startswith("agent_state.write_behind.")}
    assert documented | backlog == defined


def test_the_postgres_tables_table_lists_the_tables_the_migrations_create() -> None:
    documented = first_column(section("### Schema and migrations"))
    created = {
        table
        for migration in MIGRATIONS
        for table in re.findall(r"CREATE TABLE (\w+)", migration.sql)
    }
    assert documented == created


def test_the_state_errors_the_readme_names_exist() -> None:
    named = set(re.findall(r"`([A-Z][a-z]+(?:[A-Z][a-z]+)+)[`(]", TEXT))
    errors = {name for name in named if name.endswith(("Value", "Error", "Conflict"))}
    assert errors <= set(vars(state.errors)), errors - set(vars(state.errors))


def test_every_main_bicep_parameter_is_an_azd_variable_or_named_in_the_readme() -> None:
    infra = README.parent / "infra"
    declared = set(re.findall(r"^param (\w+) ", (infra / "main.bicep").read_text(), re.MULTILINE))
    from_azd = set(json.loads((infra / "main.parameters.json").read_text())["parameters"])
    other = TEXT.split("Other parameters of `infra/main.bicep`", 1)[1].split("\n\n", 1)[0]
    assert declared - from_azd - set(re.findall(r"`(\w+)`", other)) == set()


async def test_the_routes_the_readme_calls_public_are_the_ones_answered_without_a_token() -> None:
    settings = AppSettings(
        cosmos_endpoint="https://cosmos.invalid/", auth_audience="api://x", auth_tenant_id="t"
    )
    sentence = TEXT.split("\nEvery route except ", 1)[1].split(" needs ", 1)[0]
    documented = set(re.findall(r"`(/api/[a-z.]+)`", sentence))
    assert documented == PUBLIC_PATHS
    # What the app serves without a token besides health (which needs a store).
    app = create_app(holder=RuntimeHolder(lambda: settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for path in sorted(PUBLIC_PATHS - {"/api/health"}):
            assert (await c.get(path)).status_code == 200, path
        assert (await c.get("/api/cases/case_8842")).status_code == 401
