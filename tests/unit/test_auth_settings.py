"""Authentication settings: Entra defaults, the explicit off switch, and its refusal in Azure."""

from __future__ import annotations

import logging

import httpx
import pytest

from state.errors import SettingsError
from support_cases.api import create_app
from support_cases.auth import Authenticator, AuthNotConfigured, Unauthenticated
from support_cases.runtime import RuntimeHolder
from support_cases.settings import AZURE_HOST_MARKERS, AppSettings, get_app_settings
from tests.support.misconfigured import api_from_environment

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
BASE = {"cosmos_endpoint": "https://127.0.0.1:8091/"}
# The Azure CLI's public client id, and another application's.
AZURE_CLI = "04b07795-8ddb-461a-bbee-02f9e1bf7b46"
OTHER_CLIENT = "7a1d2b3c-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


@pytest.fixture(autouse=True)
def outside_azure(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in AZURE_HOST_MARKERS:
        monkeypatch.delenv(name, raising=False)


def test_tenant_gives_entra_v2_issuer_and_keys() -> None:
    settings = AppSettings.model_validate({**BASE, "auth_tenant_id": TENANT, "auth_audience": "x"})
    assert settings.auth_issuer_url == f"https://login.microsoftonline.com/{TENANT}/v2.0"
    assert settings.auth_keys_url == (
        f"https://login.microsoftonline.com/{TENANT}/discovery/v2.0/keys"
    )


def test_explicit_issuer_and_keys_win_over_the_tenant() -> None:
    settings = AppSettings.model_validate(
        {
            **BASE,
            "auth_tenant_id": TENANT,
            "auth_issuer": "http://127.0.0.1:8095",
            "auth_jwks_url": "http://127.0.0.1:8095/keys",
        }
    )
    assert settings.auth_issuer_url == "http://127.0.0.1:8095"
    assert settings.auth_keys_url == "http://127.0.0.1:8095/keys"


def test_auth_is_on_unless_explicitly_disabled() -> None:
    assert AppSettings.model_validate(BASE).auth_disabled is False


@pytest.mark.parametrize(
    "marker",
    ["WEBSITE_SITE_NAME", "WEBSITE_INSTANCE_ID", "CONTAINER_APP_NAME", "IDENTITY_ENDPOINT"],
)
def test_disabling_auth_is_refused_in_azure(monkeypatch: pytest.MonkeyPatch, marker: str) -> None:
    """On Functions, App Service, Container Apps or any host with a managed identity."""
    monkeypatch.setenv("AUTH_DISABLED", "true")
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://x.documents.azure.com:443/")
    assert AppSettings().auth_disabled  # locally: allowed
    monkeypatch.setenv(marker, "set by the host")
    with pytest.raises(SettingsError, match="AUTH_DISABLED=true is refused in Azure"):
        AppSettings()


def test_a_plain_http_issuer_is_refused_in_azure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBSITE_INSTANCE_ID", "abc123")
    with pytest.raises(SettingsError, match="AUTH_ISSUER must be an https URL"):
        AppSettings.model_validate({**BASE, "auth_issuer": "http://127.0.0.1:8095"})


def test_unconfigured_authentication_refuses_instead_of_letting_callers_in() -> None:
    with pytest.raises(AuthNotConfigured, match="AUTH_AUDIENCE"):
        Authenticator(AppSettings.model_validate({**BASE, "auth_tenant_id": TENANT}))


async def test_without_a_token_nothing_is_validated_and_the_caller_is_refused() -> None:
    settings = AppSettings.model_validate({**BASE, "auth_tenant_id": TENANT, "auth_audience": "x"})
    with pytest.raises(Unauthenticated, match="missing bearer token"):
        await Authenticator(settings).principal(None)


async def test_disabled_auth_is_announced_at_every_start(caplog: pytest.LogCaptureFixture) -> None:
    settings = AppSettings.model_validate({**BASE, "auth_disabled": True})
    for _ in range(2):
        app = create_app(holder=RuntimeHolder(lambda: settings))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            async with app.router.lifespan_context(app):
                pass
        assert "AUTHENTICATION IS OFF (AUTH_DISABLED=true)" in caplog.text


async def test_an_unconfigured_api_answers_503_naming_the_problem() -> None:
    settings = AppSettings.model_validate(BASE)
    app = create_app(holder=RuntimeHolder(lambda: settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://u.test") as client:
        answer = await client.get("/api/cases/case-1", headers={"Authorization": "Bearer x"})
        assert answer.status_code == 503
        assert "authentication is not configured" in answer.json()["error"]


async def test_a_setting_its_field_refuses_answers_503_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A value the settings' fields refuse (pydantic's own checks, not the app's) is named
    as the app's own setting errors are, not answered as a bare 500; its value is not
    repeated (it may be a secret)."""
    for name, value in BASE.items():
        monkeypatch.setenv(name.upper(), str(value))
    monkeypatch.setenv("STATE_COLD_TTL_SECONDS", "0")
    monkeypatch.setenv("POSTGRES_POOL_MAX_SIZE", "many-secret-things")
    get_app_settings.cache_clear()
    try:
        app = create_app(holder=RuntimeHolder())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://u.test") as client:
            answer = await client.get("/api/cases/case-1", headers={"Authorization": "Bearer x"})
    finally:
        get_app_settings.cache_clear()
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert "STATE_COLD_TTL_SECONDS" in error and "POSTGRES_POOL_MAX_SIZE" in error
    assert "many-secret-things" not in error


async def test_a_wrong_value_in_the_environment_is_answered_503_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a traceback that stops the worker at startup (or a 500 per request): the API
    starts, logs the problem, and names the variable to every caller."""
    monkeypatch.setenv("COSMOS_ENDPOINT", BASE["cosmos_endpoint"])
    monkeypatch.setenv("CASE_REVIEW_THRESHOLD", "-5")
    async with api_from_environment() as client:
        answer = await client.get("/api/cases/case-1", headers={"Authorization": "Bearer x"})
        assert answer.status_code == 503
        assert "CASE_REVIEW_THRESHOLD" in answer.json()["error"]
        # The health probe too: down for a reason, not an internal error.
        health = await client.get("/api/health")
        assert health.status_code == 503
        assert health.json()["status"] == "down"
        assert "CASE_REVIEW_THRESHOLD" in health.json()["error"]


def test_allowed_client_ids_are_read_as_entra_writes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Comma-separated, spaces and empty entries dropped, lower case (Entra's `azp`)."""
    monkeypatch.setenv("COSMOS_ENDPOINT", BASE["cosmos_endpoint"])
    monkeypatch.setenv("AUTH_ALLOWED_CLIENT_IDS", f" {AZURE_CLI.upper()} ,, {OTHER_CLIENT},")
    assert AppSettings().auth_allowed_client_ids == (AZURE_CLI, OTHER_CLIENT)
    monkeypatch.setenv("WEBSITE_INSTANCE_ID", "abc123")
    assert AppSettings().auth_allowed_client_ids == (AZURE_CLI, OTHER_CLIENT)


async def test_a_client_id_that_is_not_a_guid_is_refused_at_start_in_azure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Named by variable and position, never by value (a secret pasted by mistake); the
    API answers 503 with that line rather than accept a list that can match nothing."""
    monkeypatch.setenv("COSMOS_ENDPOINT", BASE["cosmos_endpoint"])
    monkeypatch.setenv("AUTH_ALLOWED_CLIENT_IDS", f"{AZURE_CLI},pasted-client-secret~1")
    # Locally any client name goes (the local issuer mints whatever it is asked for).
    assert AppSettings().auth_allowed_client_ids == (AZURE_CLI, "pasted-client-secret~1")
    monkeypatch.setenv("WEBSITE_INSTANCE_ID", "abc123")
    with pytest.raises(SettingsError, match="AUTH_ALLOWED_CLIENT_IDS: entry 2 ") as refused:
        AppSettings()
    assert "pasted-client-secret" not in str(refused.value)
    async with api_from_environment() as client:
        answer = await client.get("/api/cases/case-1", headers={"Authorization": "Bearer x"})
    assert answer.status_code == 503
    assert "AUTH_ALLOWED_CLIENT_IDS: entry 2" in answer.json()["error"]
    assert "pasted-client-secret" not in answer.text
