"""The state library's settings, read from the environment: backends, endpoints, TTLs,
size policy, write mode.

The environment variable names are exactly the field names upper-cased; they
are keys of `local.settings.sample.json` Values and of the Function App's app
settings in Bicep (a test checks all three agree). An application extends this
class with its own fields (the support-cases app: `support_cases.settings`);
unknown variables are ignored, so both read one environment. Secrets are
`SecretStr` so they never appear in a repr or a log line.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import unquote, urlparse, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .errors import SettingsError


class ColdBackend(StrEnum):
    COSMOS = "cosmos"
    POSTGRES = "postgres"


class WriteMode(StrEnum):
    """When a checkpoint reaches the cold tier (see README, "Write modes")."""

    # Every put is in the cold tier before it returns.
    WRITE_THROUGH = "write-through"
    # A put is one Redis round trip; a flusher drains it to the cold tier, and natural
    # boundaries (interrupt, end of run, durability="sync", flush()) wait for it.
    WRITE_BEHIND = "write-behind"


@dataclass(frozen=True)
class CosmosConfig:
    """What a Cosmos connection uses (`Settings.cosmos`)."""

    endpoint: str
    # None: Entra ID through DefaultAzureCredential.
    key: SecretStr | None
    database: str
    container: str
    create_if_missing: bool
    # The user-assigned managed identity to sign in as (None: the credential chain's choice).
    client_id: str | None
    # The local emulator serves a self-signed certificate on loopback only.
    verify_tls: bool
    operation_timeout_seconds: float


@dataclass(frozen=True)
class PostgresConfig:
    """What a Postgres connection uses (`Settings.postgres`)."""

    # A connection string (any password in it); None: host/database/user with Entra ID.
    url: SecretStr | None
    host: str | None
    database: str
    user: str | None
    client_id: str | None
    pool_min_size: int
    pool_max_size: int
    pool_timeout_seconds: float
    operation_timeout_seconds: float


class Settings(BaseSettings):
    # An empty value means "unset": Bicep and local.settings files write "" for absent options.
    # Whitespace around a value is a paste's, never meant: stripped, so that a host or URL
    # of spaces alone reads as unset, as an empty one does, not as a host to connect to.
    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="ignore",
        frozen=True,
        env_ignore_empty=True,
        str_strip_whitespace=True,
    )

    # Which cold tier is the source of truth for the whole app.
    state_cold_backend: ColdBackend = ColdBackend.COSMOS

    # Hot tier. REDIS_URL (may carry a password) for local use; in Azure,
    # REDIS_HOST + Entra ID through the managed identity (no password at all).
    # Neither set: the app runs on the cold tier alone.
    redis_url: SecretStr | None = None
    redis_host: str | None = None
    # Checked here as REDIS_URL's port is: out of range, every command would fail as the
    # tier's BackendUnavailable, a misconfiguration reported as an outage.
    redis_port: int = Field(default=6380, gt=0, lt=65536)
    redis_ssl: bool = True
    # Connections one process opens to Redis for its commands (the async client's; the
    # sync client's, for the saver's callers' threads, as many again). A command finding
    # them all in use waits a moment (`POOL_WAIT_SECONDS`), then fails as the tier's
    # `BackendUnavailable`: a bounded number of sockets, and overload seen at once.
    redis_max_connections: int = Field(default=50, gt=0)
    # Reads that wait at the server for new events (an event stream's XREAD BLOCK, for up
    # to a second each, nearly all the time): on a pool of their own, this size, so that
    # however many streams are open they never take the commands' connections. At least
    # the app's CASE_MAX_EVENT_STREAMS (the app refuses fewer: streams past it would end).
    redis_max_waiting_reads: int = Field(default=100, gt=0)

    # Cosmos DB. No key: DefaultAzureCredential (managed identity in Azure).
    cosmos_endpoint: str | None = None
    cosmos_key: SecretStr | None = None
    cosmos_database: str = "agentstate"
    cosmos_container: str = "state"
    # Data-plane RBAC cannot create databases/containers; in Azure Bicep does.
    cosmos_create_if_missing: bool = False
    # How long one Cosmos call may take, the SDK's own retries included, before the
    # backend counts as unavailable (a cut network must not hang a worker).
    # Durations are finite: inf is no bound at all (a hung call never ends), and a float
    # reads "inf" and "nan" from the environment unless told not to.
    cosmos_operation_timeout_seconds: float = Field(default=30.0, gt=0, allow_inf_nan=False)

    # Postgres. POSTGRES_URL locally; in Azure host/database/user with an Entra token.
    postgres_url: SecretStr | None = None
    postgres_host: str | None = None
    postgres_database: str = "agentstate"
    postgres_user: str | None = None
    # Connection pool per process: connections kept open, the most it opens, how long a
    # call waits for a free one, and how long one call (wait included) may take before
    # the backend counts as unavailable (a paused server or a cut network must not hang).
    postgres_pool_min_size: int = Field(default=1, ge=0)
    postgres_pool_max_size: int = Field(default=10, gt=0)
    # At most 24 days, as the operation timeout: past about 292 years (threading.TIMEOUT_MAX)
    # the blocking pool's wait for a connection, the saver's sync callers', raised a bare
    # OverflowError on every call, and a wait of days is a hung caller in all but name.
    postgres_pool_timeout_seconds: float = Field(
        default=10.0, gt=0, le=24 * 24 * 3600, allow_inf_nan=False
    )
    # At most 24 days: it becomes the sessions' statement_timeout (plus a second) and
    # libpq's tcp_user_timeout, in ms, which the server and libpq read as 32-bit integers:
    # past about 24.8 days every connection is refused, retried by the pool as an outage.
    postgres_operation_timeout_seconds: float = Field(
        default=30.0, gt=0, le=24 * 24 * 3600, allow_inf_nan=False
    )

    # Client id of the user-assigned managed identity (read by azure-identity too).
    azure_client_id: str | None = None

    # Retention and size.
    state_hot_ttl_seconds: int = Field(default=24 * 3600, gt=0)
    state_cold_ttl_seconds: int = Field(default=-1, ge=-1)  # -1: keep forever
    state_compress_threshold_bytes: int = Field(default=16 * 1024, gt=0)
    state_max_item_bytes: int = Field(default=1_800_000, gt=1024, le=2 * 1024 * 1024)
    # The case app renews its run lock or lease every third of this (the lease with a cold
    # read and write): at least a renewal every 100 ms with 200 ms to land, else the lock
    # runs out before a renewal can, and every run stops as having lost it.
    state_lock_ttl_ms: int = Field(default=30_000, ge=300)
    # The write-behind flush lock: renewed while held, so short; a paused or dead flusher
    # holds its threads up for this long at most.
    state_flush_lock_ttl_ms: int = Field(default=5_000, ge=100)
    # Unset: write-behind with a hot tier, write-through without one.
    state_write_mode: WriteMode | None = None
    state_message_window: int = Field(default=50, gt=0)
    # Which sections hold a message window, reasoning traces, or may be archived once the
    # workflow is done with them: configuration (comma-separated names), never guessed.
    state_message_sections: Annotated[tuple[str, ...], NoDecode] = ()
    state_reasoning_sections: Annotated[tuple[str, ...], NoDecode] = ()
    state_archivable_sections: Annotated[tuple[str, ...], NoDecode] = ()
    state_reasoning_max_chars: int = Field(default=4000, ge=64)

    def __init__(self, **values: Any) -> None:
        # pydantic's error is a multi-line dump naming fields: a wrong value in the
        # environment is one SettingsError naming its variable, like the checks below,
        # so every entry point (API, CLI, a library user) reports it in one line.
        try:
            super().__init__(**values)
        except ValidationError as invalid:
            # Not chained: pydantic's error quotes the value, which may be a secret.
            raise SettingsError(described(invalid)) from None

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, values: Any) -> Any:
        # Stripping alone would leave "" in place of spaces: a value, where an empty one
        # is ignored (the default applies). REDIS_URL of spaces beside REDIS_HOST was then
        # connected to as "", POSTGRES_URL of spaces as libpq's local default server.
        if isinstance(values, dict):
            return {
                name: value
                for name, value in values.items()
                if not (isinstance(value, str) and not value.strip())
            }
        return values

    @field_validator(
        "state_message_sections",
        "state_reasoning_sections",
        "state_archivable_sections",
        mode="before",
    )
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @field_validator("state_cold_ttl_seconds")
    @classmethod
    def _cosmos_ttl_rule(cls, value: int) -> int:
        # Cosmos accepts a default TTL of -1 (no expiry) or a positive number of seconds only.
        if value == 0:
            raise ValueError("STATE_COLD_TTL_SECONDS must be -1 (keep forever) or > 0")
        return value

    @model_validator(mode="after")
    def _check_cold_backend(self) -> Settings:
        if self.state_cold_backend is ColdBackend.COSMOS and not self.cosmos_endpoint:
            raise SettingsError("STATE_COLD_BACKEND=cosmos needs COSMOS_ENDPOINT")
        if (
            self.state_cold_backend is ColdBackend.POSTGRES
            and not self.postgres_url
            and not (self.postgres_host and self.postgres_user)
        ):
            raise SettingsError(
                "STATE_COLD_BACKEND=postgres needs POSTGRES_URL or POSTGRES_HOST + POSTGRES_USER"
            )
        if self.state_cold_backend is ColdBackend.POSTGRES and self.postgres_url:
            _check_postgres_url(self.postgres_url)
        if self.state_cold_backend is ColdBackend.POSTGRES:
            _check_pgconnect_timeout(self.postgres_url)
        if self.state_cold_backend is ColdBackend.COSMOS and self.cosmos_endpoint:
            _check_cosmos_endpoint(self.cosmos_endpoint)
        if self.state_cold_backend is ColdBackend.COSMOS and self.cosmos_key:
            _check_cosmos_key(self.cosmos_key)
        if self.redis_url:
            _check_redis_url(self.redis_url)
        elif self.redis_host and not self.redis_ssl and not _is_loopback(self.redis_host):
            # REDIS_HOST signs in with an Entra ID access token, sent in Redis's AUTH
            # command: without TLS anyone on the path reads it, and may use it until it
            # expires (about an hour).
            raise SettingsError(
                "REDIS_SSL=false with REDIS_HOST would send the Entra ID access token in "
                "clear text: keep REDIS_SSL=true (Azure's Redis listens with TLS only); "
                "plain text is for a loopback host"
            )
        if self.postgres_pool_min_size > self.postgres_pool_max_size:
            raise SettingsError("POSTGRES_POOL_MIN_SIZE must not exceed POSTGRES_POOL_MAX_SIZE")
        if self.state_write_mode is WriteMode.WRITE_BEHIND and not self.hot_tier_configured:
            raise SettingsError("STATE_WRITE_MODE=write-behind needs REDIS_URL or REDIS_HOST")
        return self

    @property
    def hot_tier_configured(self) -> bool:
        return bool(self.redis_url or self.redis_host)

    @property
    def write_mode(self) -> WriteMode:
        """The effective write mode (STATE_WRITE_MODE, or the default for the tiers set)."""
        if self.state_write_mode is not None:
            return self.state_write_mode
        return WriteMode.WRITE_BEHIND if self.hot_tier_configured else WriteMode.WRITE_THROUGH

    @property
    def cosmos(self) -> CosmosConfig:
        return CosmosConfig(
            endpoint=self.cosmos_endpoint or "",
            key=self.cosmos_key,
            database=self.cosmos_database,
            container=self.cosmos_container,
            create_if_missing=self.cosmos_create_if_missing,
            client_id=self.azure_client_id,
            verify_tls=not self.cosmos_is_local_emulator,
            operation_timeout_seconds=self.cosmos_operation_timeout_seconds,
        )

    @property
    def postgres(self) -> PostgresConfig:
        return PostgresConfig(
            url=self.postgres_url,
            host=self.postgres_host,
            database=self.postgres_database,
            user=self.postgres_user,
            client_id=self.azure_client_id,
            pool_min_size=self.postgres_pool_min_size,
            pool_max_size=self.postgres_pool_max_size,
            pool_timeout_seconds=self.postgres_pool_timeout_seconds,
            operation_timeout_seconds=self.postgres_operation_timeout_seconds,
        )

    @property
    def cosmos_is_local_emulator(self) -> bool:
        """The local emulator serves a self-signed certificate on loopback only."""
        host = urlparse(self.cosmos_endpoint or "").hostname or ""
        return _is_loopback(host)


def _check_postgres_url(url: SecretStr) -> None:
    """Parse POSTGRES_URL as the adapter will. libpq's complaint quotes the part it could not
    read, often the password (e.g. a raw `%`), and psycopg's pool logs it on every
    connection attempt: refused here, without repeating any of it."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        options = conninfo_to_dict(url.get_secret_value())
    except ProgrammingError:
        raise SettingsError(
            "POSTGRES_URL is not a valid connection string (a URL, or key=value pairs; "
            "in a URL, a `%` or `@` in the password is written %25 or %40). Its text is "
            "not repeated here: it may hold the password"
        ) from None
    # libpq refuses these values only when connecting: the pool would log that on every
    # try and the start fail as "postgres unavailable" once its timeout ran out.
    refused = _postgres_options_libpq_refuses(options)
    if refused:
        name = refused[0]
        raise SettingsError(
            f"POSTGRES_URL's {name} is not a value libpq accepts ({_POSTGRES_OPTION_HINTS[name]}; "
            "in a URL, a `/` in the password is written %2F). The value is not repeated "
            "here: a password cut short may have become it"
        )
    if options.get("target_session_attrs") in _POSTGRES_STANDBY_ATTRS:
        raise SettingsError(
            "POSTGRES_URL's target_session_attrs picks a standby: the app writes (its "
            "migrations first), and a standby refuses every write read-only, which it "
            "takes for a failover in progress and retries. Use read-write (or primary)"
        )


_POSTGRES_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": (
        "any", "read-write", "read-only", "primary", "standby", "prefer-standby",
    ),
    "gssencmode": ("disable", "prefer", "require"),
}  # fmt: skip
# target_session_attrs values that may pick a standby (or a read-only session) over the primary.
_POSTGRES_STANDBY_ATTRS = ("read-only", "standby", "prefer-standby")
# Read by libpq as whole numbers. Not `connect_timeout`: psycopg reads that one itself (as
# `int(float(value))`, so `2.5` is fine) and connects by polling, where libpq never does.
_POSTGRES_INTEGERS = (
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)
_LINUX_KEEPALIVE_RANGES = {
    "keepalives_idle": range(1, 32768),
    "keepalives_interval": range(1, 32768),
    "keepalives_count": range(1, 128),
}
_POSTGRES_OPTION_HINTS = {
    "port": "a number 1-65535, one for all hosts or one per host",
    "hostaddr": "as many addresses as host names",
    **{name: "one of " + ", ".join(choices) for name, choices in _POSTGRES_CHOICES.items()},
    **{name: "a whole number" for name in _POSTGRES_INTEGERS},
    "keepalives_idle": "a whole number of seconds, 1-32767",
    "keepalives_interval": "a whole number of seconds, 1-32767",
    "keepalives_count": "a whole number, 1-127",
    "connect_timeout": "a number of seconds",
}
# A whole number as libpq reads one (strtol, then only spaces): spaces around it, a sign,
# ASCII digits, within a C int.
_LIBPQ_INTEGER = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+[ \t\n\v\f\r]*")
_C_INT = range(-(2**31), 2**31)


def _libpq_integer(text: str) -> int | None:
    number = int(text) if _LIBPQ_INTEGER.fullmatch(text) else None
    return number if number is not None and number in _C_INT else None


def _postgres_options_libpq_refuses(options: dict[str, Any]) -> list[str]:
    from psycopg import ProgrammingError
    from psycopg.conninfo import timeout_from_conninfo

    refused = []
    ports = str(options.get("port") or "")
    hosts = [
        len(str(options[name]).split(",")) for name in ("host", "hostaddr") if options.get(name)
    ]
    if len(set(hosts)) > 1:
        refused.append("hostaddr")
    if ports and (
        len(ports.split(",")) not in (1, max(hosts, default=1))
        or not all(
            not port or ((number := _libpq_integer(port)) is not None and 0 < number < 65536)
            for port in ports.split(",")
        )
    ):
        refused.append("port")
    refused += [
        name
        for name, choices in _POSTGRES_CHOICES.items()
        if name in options and options[name] not in choices
    ]
    refused += [
        name
        for name in _POSTGRES_INTEGERS
        if name in options and _libpq_integer(str(options[name])) is None
    ]
    # With keepalives on (the default), libpq hands these to setsockopt before connecting
    # (a value below 1 as 0), and Linux refuses what is outside its range; not on a Unix
    # socket (a host that is a directory), which has no TCP keepalives.
    over_tcp = bool(options.get("hostaddr")) or not all(
        host.startswith("/") for host in str(options.get("host") or "").split(",") if host
    )
    if over_tcp and _libpq_integer(str(options.get("keepalives", "1"))) != 0:
        refused += [
            name
            for name, allowed in _LINUX_KEEPALIVE_RANGES.items()
            if name not in refused
            and name in options
            and _libpq_integer(str(options[name])) not in allowed
        ]
    if "connect_timeout" in options:
        try:
            timeout_from_conninfo({"connect_timeout": options["connect_timeout"]})
        except ProgrammingError:
            refused.append("connect_timeout")
    return refused


def _check_pgconnect_timeout(url: SecretStr | None) -> None:
    """libpq's PGCONNECT_TIMEOUT, the connection's `connect_timeout` when the URL sets
    none: libpq refuses to connect with one that is not a number, so it is refused here,
    read as the URL's own is (psycopg reads it, `2.5` included; 0 or less is no bound).
    The pool would otherwise replace it with its own bound, the operator's choice unsaid."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict, timeout_from_conninfo

    value = os.environ.get("PGCONNECT_TIMEOUT")
    if value is None or (url and "connect_timeout" in conninfo_to_dict(url.get_secret_value())):
        return
    try:
        timeout_from_conninfo({"connect_timeout": value})
    except ProgrammingError:
        raise SettingsError(
            "PGCONNECT_TIMEOUT is not a number of seconds (libpq's connection timeout, as "
            "POSTGRES_URL's connect_timeout; 0 or less for none): libpq refuses to connect "
            "with it. Unset it, or set a number"
        ) from None


def _check_cosmos_endpoint(endpoint: str) -> None:
    """Read COSMOS_ENDPOINT as the SDK will. Without a scheme it retries the value as an
    unreachable host (every request 503, as if Cosmos were down), and a port that is not
    a number fails the first request with a bare ValueError. Not repeated: a connection
    string pasted whole holds the account key."""
    parts = urlsplit(endpoint)
    try:
        parts.port  # noqa: B018 (parsed on access)
    except ValueError:
        valid = False
    else:
        valid = parts.scheme in ("https", "http") and bool(parts.hostname)
    if not valid:
        raise SettingsError(
            "COSMOS_ENDPOINT is not a Cosmos account URL (https://<account>.documents."
            "azure.com:443/; a connection string's AccountEndpoint, its key in COSMOS_KEY). "
            "Its text is not repeated here: it may hold the account key"
        )


def _check_cosmos_key(key: SecretStr) -> None:
    """Decode COSMOS_KEY as the SDK will when it signs the first request: a key cut short
    in a copy would otherwise surface there as a bare `binascii.Error` traceback. Strictly:
    the SDK drops a character outside base64 (URL-safe `-` and `_`, a `%` escape's `%`)
    and signs with what is left, another key: every request refused as unauthorised.
    Whitespace around or inside the key it drops harmlessly."""
    try:
        base64.b64decode("".join(key.get_secret_value().split()), validate=True)
    except ValueError:  # binascii.Error
        raise SettingsError(
            "COSMOS_KEY is not a Cosmos account key (base64, as the portal's Keys blade or "
            "`az cosmosdb keys list` gives it). Its text is not repeated here: it is a secret"
        ) from None


def _is_loopback(host: str) -> bool:
    """Whether `host` (as written in a setting) names this machine: host names are read
    without regard to case, and all of 127.0.0.0/8 is loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_redis_url(url: SecretStr) -> None:
    """Parse REDIS_URL as the adapter will: an unescaped `/`, `?` or `#` in the password
    ends the host part early, and redis-py's complaint quotes the password's start."""
    from redis.connection import parse_url

    try:
        parsed = parse_url(url.get_secret_value())
    except ValueError:
        raise SettingsError(
            "REDIS_URL is not a valid Redis URL (redis://[user:password@]host:port/db; a "
            "`/`, `?`, `#` or `@` in the password is written %2F, %3F, %23 or %40). Its "
            "text is not repeated here: it may hold the password"
        ) from None
    # A database path that is not a number redis-py drops, database 0 used in its place
    # (another application's keys, perhaps).
    parts = urlsplit(url.get_secret_value())
    if parts.scheme != "unix" and unquote(parts.path).replace("/", "") and "db" not in parsed:
        raise SettingsError(
            "REDIS_URL's database (the path after host:port) is not a number (/0, /1, ..., "
            "or no path for 0; a `/` in the password is written %2F). Its text is not "
            "repeated here: it may hold the password"
        )


def described(invalid: ValidationError) -> str:
    """Each wrong value as `VARIABLE: what is wrong`; never the value (it may be a secret)."""
    problems = []
    for error in invalid.errors(include_url=False):
        variable = str(error["loc"][0]).upper() if error["loc"] else "settings"
        # A validator's own ValueError already says what it wants, without pydantic's prefix.
        cause = (error.get("ctx") or {}).get("error")
        problem = str(cause) if error["type"] == "value_error" and cause else error["msg"]
        problems.append(problem if problem.startswith(variable) else f"{variable}: {problem}")
    return "; ".join(problems)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
