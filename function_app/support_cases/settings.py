"""The app's settings: the state library's (`state.Settings`) plus the workflow's, the
callers' (auth) and telemetry's, read from the same environment.

Variable names are the field names upper-cased, like the library's; every one is a
key of `local.settings.sample.json` Values and a Function App app setting in Bicep.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import urlparse, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from state import Settings, SettingsError

from .models import FollowUpStrategy

# Set on every instance by App Service / Azure Functions (Flex Consumption included),
# by Container Apps, and by every Azure host giving the app a managed identity: the app
# is deployed, not run locally.
AZURE_HOST_MARKERS = (
    "WEBSITE_SITE_NAME",
    "WEBSITE_INSTANCE_ID",
    "CONTAINER_APP_NAME",
    "IDENTITY_ENDPOINT",
)
ENTRA_LOGIN = "https://login.microsoftonline.com"
# The port a browser leaves out of an origin, by scheme (the schemes a page is served on).
DEFAULT_PORTS = {"https": 443, "http": 80}
# An Entra application (client) id.
GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Renewals of a run's lock or lease per STATE_LOCK_TTL_MS: one may be late or fail and
# the next still lands before the lock runs out.
RENEWALS_PER_TTL = 3
# A run's keeper refreshes its heartbeat at the first renewal this part of
# CASE_STALE_AFTER_SECONDS after the last (see `CaseService._keep`).
BEATS_PER_STALE_PERIOD = 4


def running_in_azure() -> bool:
    return any(os.environ.get(name) for name in AZURE_HOST_MARKERS)


def authentication_parts(raw: str) -> dict[str, str]:
    """APPLICATIONINSIGHTS_AUTHENTICATION_STRING ("Authorization=AAD;ClientId=<uuid>") by
    lower-cased name, the authorization lower-cased too: read in any case and spacing, as
    the Functions host reads it."""
    parts = {
        name.strip().lower(): value.strip()
        for name, _, value in (part.partition("=") for part in raw.split(";"))
    }
    if "authorization" in parts:
        parts["authorization"] = parts["authorization"].lower()
    return parts


class AppSettings(Settings):
    # Workflow.
    # Refunds above it go to human review: finite, since `inf` (or an overflowing 1e400)
    # would send none there, and a float reads "inf" from the environment unless told not to.
    case_review_threshold: float = Field(default=500.0, ge=0, allow_inf_nan=False)
    # At most 24 days, as the longest timeouts: a run found stalled later is lost in all
    # but name, and past about 2.7 million years it overflowed a timedelta, every runtime's
    # start failing with a bare OverflowError.
    case_stale_after_seconds: int = Field(default=300, gt=0, le=24 * 24 * 3600)
    case_max_body_bytes: int = Field(default=256 * 1024, gt=0)
    # How long an HTTP call waits for a run before answering 202 with a status URL
    # (below the Functions HTTP limit of 230 s).
    case_sync_wait_seconds: float = Field(default=20.0, ge=0, le=200)
    # How long a request may take to start its answer before it is cut with 503 and
    # Retry-After (its calls to slow stores add up), its wait for a run (above) not counted.
    api_request_deadline_seconds: float = Field(default=10.0, gt=0, le=200)
    # How long a side effect's provider call may take before it is abandoned (its claim
    # stays pending, settled by asking the provider by key after the claim's lease).
    case_effect_timeout_seconds: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    # Case runs one worker drives at once (each holds store connections as it goes); a
    # request that would start one more answers 503, the timer leaves it for a later tick.
    case_max_runs: int = Field(default=32, gt=0)
    # Event streams (GET .../events) one worker serves at once; one more answers 503.
    case_max_event_streams: int = Field(default=100, gt=0)
    # Of those, the most one caller may hold (one more answers 429), so that one caller
    # cannot take every slot.
    case_max_event_streams_per_caller: int = Field(default=10, gt=0)
    # Two charges at the same merchant for the same amount within this window are a duplicate.
    # At most a year: one past a timedelta's range failed every run at its billing step.
    case_duplicate_window_seconds: int = Field(default=24 * 3600, gt=0, le=366 * 24 * 3600)
    # What a follow-up message without a strategy does to a run in progress.
    case_default_strategy: FollowUpStrategy = FollowUpStrategy.ENQUEUE
    # Health reports "degraded" when the oldest unflushed write-behind entry is older.
    state_backlog_degraded_seconds: int = Field(default=60, gt=0)

    # Callers: Entra ID access tokens for the API's app registration (see README,
    # "Who may do what"). AUTH_DISABLED=true turns checking off for local use only: the
    # API announces it on every start, and it is refused in Azure.
    auth_disabled: bool = False
    auth_tenant_id: str | None = None
    # The `aud` the API accepts: its app registration's client id (v2 tokens).
    auth_audience: str | None = None
    # Unset: Entra's v2 issuer and signing keys (JWKS) of AUTH_TENANT_ID. Set: another
    # issuer (the local one of the dev stack and the tests).
    auth_issuer: str | None = None
    auth_jwks_url: str | None = None
    # Client applications (ids, comma-separated; lower-cased here as Entra writes them)
    # whose access tokens the API accepts: a v2 token's `azp`, a v1 token's `appid`. A
    # user's app roles reach any client the user consents to, so a consent-phishing app
    # would otherwise act with them. Empty: any client (the local stack's issuer).
    auth_allowed_client_ids: Annotated[tuple[str, ...], NoDecode] = ()

    # Origins (`https://portal.example.com`, comma-separated; `*` for any) whose browser
    # pages may call the API. Empty: none (no CORS headers).
    cors_allowed_origins: Annotated[tuple[str, ...], NoDecode] = ()

    # Telemetry: exported to Application Insights only when set.
    applicationinsights_connection_string: SecretStr | None = None
    applicationinsights_authentication_string: str | None = None
    otel_service_name: str = "support-cases"

    @field_validator("cors_allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(origin.strip() for origin in value.split(",") if origin.strip())
        origins = []
        for position, written in enumerate(value, start=1):
            origin = "*" if written == "*" else browser_origin(written)
            if origin is None:
                # A browser sends its origin exactly so (no path, no trailing slash): one
                # written otherwise would never match, and every call be refused. Named by
                # position, not quoted: every caller reads this 503, and a URL pasted with
                # its sign-in (user:password@) would hand that out.
                raise SettingsError(
                    f"CORS_ALLOWED_ORIGINS: entry {position} is not an origin "
                    "(scheme://host[:port], e.g. https://portal.example.com)"
                )
            origins.append(origin)
        return tuple(origins)

    @field_validator("auth_allowed_client_ids", mode="before")
    @classmethod
    def _split_client_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        return tuple(written.strip().lower() for written in value if written.strip())

    @field_validator("applicationinsights_connection_string")
    @classmethod
    def _check_connection_string(cls, value: SecretStr | None) -> SecretStr | None:
        """Parse it as the exporter will when the runtime opens: its ValueError there was a
        bare 500 on the first request, and every later one went on without an exporter."""
        if value is not None:
            from azure.monitor.opentelemetry.exporter._connection_string_parser import (
                ConnectionStringParser,
            )

            try:
                ConnectionStringParser(value.get_secret_value())
            except ValueError:
                raise SettingsError(
                    "APPLICATIONINSIGHTS_CONNECTION_STRING is not an Application Insights "
                    "connection string (InstrumentationKey=<lower-case GUID>;IngestionEndpoint="
                    "https://...;..., as the resource's Overview shows it). Its text is not "
                    "repeated here"
                ) from None
        return value

    @field_validator("applicationinsights_authentication_string")
    @classmethod
    def _check_authentication_string(cls, value: str | None) -> str | None:
        """Read as the exporter's credential is (`authentication_parts`): one that does not
        ask for AAD gave no credential, and every batch was refused (local auth is
        disabled) while the host's own telemetry arrived, nothing said."""
        if value is not None and authentication_parts(value).get("authorization", "") != "aad":
            raise SettingsError(
                "APPLICATIONINSIGHTS_AUTHENTICATION_STRING must say Authorization=AAD "
                "(Authorization=AAD;ClientId=<identity client id>); unset it for no Entra "
                "authentication"
            )
        return value

    @model_validator(mode="after")
    def _check_event_streams_fit_their_pool(self) -> AppSettings:
        # Each open stream waits at Redis on a connection of the waiting reads' pool: a
        # stream finding none within a second ends, and its client reconnects, over and
        # over. Without a hot tier no stream is served, and the pool is never opened.
        if self.hot_tier_configured and self.case_max_event_streams > self.redis_max_waiting_reads:
            raise SettingsError(
                f"CASE_MAX_EVENT_STREAMS ({self.case_max_event_streams}) must not exceed "
                f"REDIS_MAX_WAITING_READS ({self.redis_max_waiting_reads}): each open event "
                "stream waits on one of those Redis connections"
            )
        return self

    @model_validator(mode="after")
    def _check_stale_period_outlasts_heartbeats(self) -> AppSettings:
        # A live run's keeper beats at its first renewal a quarter of the stale period
        # after the last beat, and renews every third of the lock TTL: its heartbeat is
        # up to stale/4 + TTL/3 old (the round trips aside). A stale period no longer
        # than that read a live run as stalled between its beats. In whole ms, exactly.
        stale_ms = self.case_stale_after_seconds * 1000
        silent_ms = stale_ms / BEATS_PER_STALE_PERIOD + self.state_lock_ttl_ms / RENEWALS_PER_TTL
        if stale_ms * BEATS_PER_STALE_PERIOD * RENEWALS_PER_TTL <= (
            stale_ms * RENEWALS_PER_TTL + self.state_lock_ttl_ms * BEATS_PER_STALE_PERIOD
        ):
            raise SettingsError(
                f"CASE_STALE_AFTER_SECONDS ({self.case_stale_after_seconds}) is too short for "
                f"STATE_LOCK_TTL_MS ({self.state_lock_ttl_ms}): a live run renews its lock "
                f"every third of the TTL and beats with its renewals, so its heartbeat may be "
                f"{silent_ms / 1000:g} s old; the stale period must exceed a quarter of itself "
                "plus a third of the TTL (more than 4/9 of the TTL), or live runs read as stalled"
            )
        return self

    @model_validator(mode="after")
    def _check_auth_in_azure(self) -> AppSettings:
        if running_in_azure():
            if self.auth_disabled:
                raise SettingsError(
                    "AUTH_DISABLED=true is refused in Azure: callers must present Entra ID tokens"
                )
            for name, url in (
                ("AUTH_ISSUER", self.auth_issuer),
                ("AUTH_JWKS_URL", self.auth_jwks_url),
            ):
                if url and (scheme := urlparse(url).scheme) != "https":
                    # The scheme only: a URL may carry credentials (user:password@).
                    raise SettingsError(
                        f"{name} must be an https URL in Azure (its scheme: {scheme or 'none'})"
                    )
            for position, client_id in enumerate(self.auth_allowed_client_ids, start=1):
                if not GUID.fullmatch(client_id):
                    # By position: a value pasted by mistake (a secret) is not repeated.
                    raise SettingsError(
                        f"AUTH_ALLOWED_CLIENT_IDS: entry {position} is not an application "
                        "(client) id, a GUID such as 04b07795-8ddb-461a-bbee-02f9e1bf7b46"
                    )
        return self

    @property
    def auth_issuer_url(self) -> str | None:
        """The issuer tokens must name: AUTH_ISSUER, else Entra's v2 issuer of the tenant."""
        if self.auth_issuer:
            return self.auth_issuer
        return f"{ENTRA_LOGIN}/{self.auth_tenant_id}/v2.0" if self.auth_tenant_id else None

    @property
    def auth_keys_url(self) -> str | None:
        """Where the signing keys are: AUTH_JWKS_URL, else the tenant's Entra JWKS."""
        if self.auth_jwks_url:
            return self.auth_jwks_url
        if self.auth_tenant_id:
            return f"{ENTRA_LOGIN}/{self.auth_tenant_id}/discovery/v2.0/keys"
        return None


@lru_cache(maxsize=1)
def get_app_settings() -> AppSettings:
    return AppSettings()


def browser_origin(text: str) -> str | None:
    """`text` as a browser spells it in its `Origin` header, which CORS compares exactly
    (the host in lower case, no default port); None if no browser sends it so."""
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname  # lower case
    if (
        parts.scheme not in DEFAULT_PORTS
        or not host
        or "@" in parts.netloc
        or text.lower() != f"{parts.scheme}://{parts.netloc.lower()}"  # nothing more
    ):
        return None
    if ":" in host:
        host = f"[{host}]"  # IPv6
    return f"{parts.scheme}://{host}" + (
        "" if port in (None, DEFAULT_PORTS[parts.scheme]) else f":{port}"
    )
