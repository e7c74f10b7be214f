from __future__ import annotations

import base64
import logging
import traceback

import pytest

from state.errors import SettingsError
from state.factory import open_backends
from state.settings import ColdBackend, Settings

EMULATOR_KEY = (
    "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw=="
)


def test_reads_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("COSMOS_KEY", EMULATOR_KEY)
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@127.0.0.1:6390/0")
    monkeypatch.setenv("STATE_HOT_TTL_SECONDS", "60")
    settings = Settings()
    assert settings.state_cold_backend is ColdBackend.COSMOS
    assert settings.state_hot_ttl_seconds == 60
    assert settings.hot_tier_configured
    assert settings.cosmos_is_local_emulator


def test_secrets_never_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("COSMOS_KEY", EMULATOR_KEY)
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@127.0.0.1:6390/0")
    text = repr(Settings()) + str(Settings().model_dump())
    assert EMULATOR_KEY not in text
    assert "hunter2" not in text


def test_postgres_backend_needs_a_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_COLD_BACKEND", "postgres")
    monkeypatch.delenv("POSTGRES_URL", raising=False)
    with pytest.raises(SettingsError, match="POSTGRES_URL"):
        Settings()


def test_remote_cosmos_is_not_treated_as_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://acct.documents.azure.com:443/")
    assert not Settings().cosmos_is_local_emulator
    assert not Settings().hot_tier_configured


def test_empty_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("COSMOS_KEY", "")
    monkeypatch.setenv("REDIS_HOST", "")
    settings = Settings()
    assert settings.cosmos_key is None
    assert not settings.hot_tier_configured


def test_whitespace_around_values_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", " https://127.0.0.1:8091/\n")
    monkeypatch.setenv("REDIS_HOST", "   ")
    monkeypatch.setenv("COSMOS_DATABASE", "cases ")
    monkeypatch.setenv("REDIS_URL", " redis://127.0.0.1:6390/0 ")
    settings = Settings()
    assert settings.cosmos_endpoint == "https://127.0.0.1:8091/"
    assert not settings.redis_host
    assert settings.cosmos_database == "cases"
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:6390/0"


def test_a_value_of_whitespace_alone_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # As an empty one is: the default applies, not "" (a URL beside REDIS_HOST, a
    # database name, a key that would turn off Entra sign-in).
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("REDIS_URL", "  ")
    monkeypatch.setenv("REDIS_HOST", "cache.example.com")
    monkeypatch.setenv("COSMOS_KEY", "\n")
    monkeypatch.setenv("COSMOS_DATABASE", " ")
    settings = Settings()
    assert settings.redis_url is None
    assert settings.redis_host == "cache.example.com"
    assert settings.cosmos.key is None
    assert settings.cosmos_database == "agentstate"
    monkeypatch.setenv("STATE_COLD_BACKEND", "postgres")
    monkeypatch.setenv("POSTGRES_URL", " ")
    monkeypatch.setenv("POSTGRES_HOST", "pg.example.com")
    monkeypatch.setenv("POSTGRES_USER", "cases")
    assert Settings().postgres.url is None


def test_cold_ttl_zero_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("STATE_COLD_TTL_SECONDS", "0")
    with pytest.raises(SettingsError, match="STATE_COLD_TTL_SECONDS"):
        Settings()


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("REDIS_PORT", "hunter2", "valid integer"),
        # Not a TCP port: REDIS_HOST's every command would fail as if Redis were down.
        ("REDIS_PORT", "70000", "less than 65536"),
        ("REDIS_PORT", "0", "greater than 0"),
        ("REDIS_SSL", "maybe", "valid boolean"),
        ("STATE_WRITE_MODE", "fast", "'write-through' or 'write-behind'"),
        ("STATE_HOT_TTL_SECONDS", "0", "greater than 0"),
        ("STATE_COLD_TTL_SECONDS", "0", "-1 (keep forever) or > 0"),
        # No bound at all, or none comparable: a duration is a finite number.
        ("COSMOS_OPERATION_TIMEOUT_SECONDS", "inf", "finite number"),
        ("COSMOS_OPERATION_TIMEOUT_SECONDS", "nan", "finite number"),
        ("COSMOS_OPERATION_TIMEOUT_SECONDS", "1e400", "finite number"),
        ("POSTGRES_POOL_TIMEOUT_SECONDS", "inf", "finite number"),
        ("POSTGRES_OPERATION_TIMEOUT_SECONDS", "infinity", "finite number"),
        # Renewed every third of it: 1 ms runs out before any renewal lands.
        ("STATE_LOCK_TTL_MS", "1", "greater than or equal to 300"),
        ("STATE_LOCK_TTL_MS", "299", "greater than or equal to 300"),
    ],
)
def test_a_wrong_value_is_one_line_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
) -> None:
    """Not pydantic's multi-line ValidationError (which names fields, not variables): what
    every entry point can print as is, without the value (it may be a secret)."""
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as refused:
        Settings()
    message = str(refused.value)
    assert message.startswith(f"{variable}: ") or message.startswith(f"{variable} must")
    assert problem in message
    assert "\n" not in message
    assert "hunter2" not in message


def test_postgres_pool_settings_have_documented_defaults_and_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STATE_COLD_BACKEND", "postgres")
    monkeypatch.setenv("POSTGRES_URL", "postgresql://postgres@127.0.0.1:5440/postgres")
    defaults = Settings()
    assert (
        defaults.postgres_pool_min_size,
        defaults.postgres_pool_max_size,
        defaults.postgres_pool_timeout_seconds,
        defaults.postgres_operation_timeout_seconds,
    ) == (1, 10, 10.0, 30.0)
    monkeypatch.setenv("POSTGRES_POOL_MAX_SIZE", "4")
    monkeypatch.setenv("POSTGRES_POOL_TIMEOUT_SECONDS", "2.5")
    assert (Settings().postgres_pool_max_size, Settings().postgres_pool_timeout_seconds) == (4, 2.5)
    monkeypatch.setenv("POSTGRES_POOL_MIN_SIZE", "5")
    with pytest.raises(SettingsError, match="POSTGRES_POOL_MIN_SIZE"):
        Settings()


def test_each_connection_gets_its_backends_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("COSMOS_CONTAINER", "second")
    monkeypatch.setenv("AZURE_CLIENT_ID", "11111111-1111-1111-1111-111111111111")
    monkeypatch.setenv("POSTGRES_HOST", "pg.example")
    monkeypatch.setenv("POSTGRES_USER", "app")
    monkeypatch.setenv("POSTGRES_OPERATION_TIMEOUT_SECONDS", "7")
    settings = Settings()
    cosmos, postgres = settings.cosmos, settings.postgres
    assert (cosmos.endpoint, cosmos.database, cosmos.container) == (
        "https://127.0.0.1:8091/",
        "agentstate",
        "second",
    )
    assert cosmos.key is None and not cosmos.verify_tls  # the emulator's certificate
    assert cosmos.client_id == postgres.client_id == settings.azure_client_id
    assert (postgres.url, postgres.host, postgres.user) == (None, "pg.example", "app")
    assert postgres.operation_timeout_seconds == 7.0
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://acct.documents.azure.com:443/")
    assert Settings().cosmos.verify_tls


@pytest.mark.parametrize(
    ("variable", "environment"),
    [
        # libpq quotes the part of a connection string it cannot read (here the password,
        # a `%` not written %25), and psycopg's pool logs that on every connection attempt.
        (
            "POSTGRES_URL",
            {
                "STATE_COLD_BACKEND": "postgres",
                "POSTGRES_URL": "postgresql://app:50%off-hunter2@127.0.0.1:1/agentstate",
                "POSTGRES_POOL_TIMEOUT_SECONDS": "1",
            },
        ),
        # A `/` not written %2F ends a URL's host part: redis-py then names the password's
        # start as the port it could not read.
        (
            "REDIS_URL",
            {
                "COSMOS_ENDPOINT": "https://127.0.0.1:1/",
                "REDIS_URL": "redis://:hunter2/more@127.0.0.1:1/0",
            },
        ),
    ],
)
async def test_a_malformed_connection_url_is_refused_without_its_password(
    variable: str,
    environment: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Exception) as refused:  # which one: asserted below
        backends = await open_backends(Settings())
        await backends.close()
    assert "hunter2" not in caplog.text
    assert "hunter2" not in "".join(traceback.format_exception(refused.value))
    assert isinstance(refused.value, SettingsError), refused.value
    assert variable in str(refused.value)


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("postgresql://app@db.example/agentstate?sslmode=bogus", "sslmode"),
        ("postgresql://app@db.example:54o2/agentstate", "port"),
        ("postgresql://app@db.example:99999/agentstate", "port"),
        ("host=db.example port=5432,x dbname=agentstate", "port"),
        ("postgresql://app@db.example/agentstate?connect_timeout=ten", "connect_timeout"),
        # Digits only to Python: libpq reads ASCII ones.
        ("host=db.example port=\u00b2 dbname=agentstate", "port"),
        ("host=db.example keepalives_idle=--5 dbname=agentstate", "keepalives_idle"),
        # libpq reads these, then Linux refuses them in setsockopt before connecting.
        ("postgresql://app@db.example/agentstate?keepalives_idle=-1", "keepalives_idle"),
        ("postgresql://app@db.example/agentstate?keepalives_interval=0", "keepalives_interval"),
        ("postgresql://app@db.example/agentstate?keepalives_count=128", "keepalives_count"),
        ("host=db1.example,db2.example port=5432,5433,5434 dbname=agentstate", "port"),
        ("host=db1.example,db2.example hostaddr=10.0.0.1 dbname=agentstate", "hostaddr"),
        ("postgresql://app@db.example/agentstate?target_session_attrs=primary-ish", "target"),
        # A `/` in the password ends the host part: what follows reads as the port.
        ("postgresql://app:hunter2/x@db.example/agentstate", "port"),
    ],
)
def test_a_postgres_url_option_libpq_would_refuse_is_refused_at_start(
    url: str, named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq refuses such a value only when connecting: the pool then logs it on every try
    and the start fails as "postgres unavailable" once its timeout ran out."""
    monkeypatch.setenv("STATE_COLD_BACKEND", "postgres")
    monkeypatch.setenv("POSTGRES_URL", url)
    with pytest.raises(SettingsError) as refused:
        Settings()
    assert str(refused.value).startswith("POSTGRES_URL"), refused.value
    assert named in str(refused.value)
    assert "hunter2" not in str(refused.value) and "bogus" not in str(refused.value)


@pytest.mark.parametrize("value", ["soon", "inf", "", "10s"])
@pytest.mark.parametrize(
    "url", ["postgresql://app@db.example/agentstate", "host=db.example dbname=agentstate", None]
)
def test_a_pgconnect_timeout_libpq_would_refuse_is_refused_at_start(
    value: str, url: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq refuses to connect with it ("invalid integer value ... connect_timeout"); the
    pool replaced it with its own bound, the operator's timeout silently not used."""
    monkeypatch.setenv("STATE_COLD_BACKEND", "postgres")
    if url is None:
        monkeypatch.delenv("POSTGRES_URL", raising=False)
        monkeypatch.setenv("POSTGRES_HOST", "db.example")
        monkeypatch.setenv("POSTGRES_USER", "app")
    else:
        monkeypatch.setenv("POSTGRES_URL", url)
    monkeypatch.setenv("PGCONNECT_TIMEOUT", value)
    with pytest.raises(SettingsError) as refused:
        Settings()
    assert str(refused.value).startswith("PGCONNECT_TIMEOUT"), refused.value
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("10", "postgresql://app@db.example/agentstate"),
        # psycopg reads it (and connects by polling, where libpq never does).
        ("2.5", "postgresql://app@db.example/agentstate"),
        # libpq's "no bound": the pool's own applies.
        ("-1", "postgresql://app@db.example/agentstate"),
        ("0", "postgresql://app@db.example/agentstate"),
        # The URL's own connect_timeout wins: libpq never reads the variable.
        ("soon", "postgresql://app@db.example/agentstate?connect_timeout=5"),
    ],
)
def test_a_pgconnect_timeout_libpq_reads_or_never_uses_passes(
    value: str, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATE_COLD_BACKEND", "postgres")
    monkeypatch.setenv("POSTGRES_URL", url)
    monkeypatch.setenv("PGCONNECT_TIMEOUT", value)
    assert Settings().postgres.url is not None


@pytest.mark.parametrize("attrs", ["read-only", "standby", "prefer-standby"])
def test_a_postgres_url_that_picks_a_standby_is_refused_at_start(
    attrs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every write (the startup migration first) on a standby is refused read-only, which
    the app takes for a failover in progress: an outage retried for good, never healing."""
    monkeypatch.setenv("STATE_COLD_BACKEND", "postgres")
    monkeypatch.setenv(
        "POSTGRES_URL",
        f"postgresql://app@db1.example,db2.example/agentstate?target_session_attrs={attrs}",
    )
    with pytest.raises(SettingsError) as refused:
        Settings()
    assert "target_session_attrs" in str(refused.value)
    assert "read-write" in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app@db.example/agentstate?sslmode=verify-full&connect_timeout=10",
        "postgresql://app@db1.example:5432,db2.example:5433/agentstate"
        "?target_session_attrs=read-write",
        "host=db.example port=5432 dbname=agentstate sslmode=require",
        "postgresql:///agentstate?host=/var/run/postgresql",
        # One port for every host; keepalives off, their settings are not used.
        "host=db1.example,db2.example port=5432 dbname=agentstate",
        "postgresql://app@db.example/agentstate?keepalives=0&keepalives_idle=0",
        "postgresql://app@db.example/agentstate?keepalives_idle=32767&keepalives_count=127",
        # A Unix socket has no TCP keepalives: libpq sets none of them.
        "postgresql:///agentstate?host=/var/run/postgresql&keepalives_idle=0",
    ],
)
def test_a_valid_postgres_url_passes(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_COLD_BACKEND", "postgres")
    monkeypatch.setenv("POSTGRES_URL", url)
    assert Settings().postgres.url is not None


def test_a_malformed_cosmos_key_is_refused_without_repeating_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("COSMOS_KEY", EMULATOR_KEY[:-3])
    with pytest.raises(SettingsError) as refused:
        Settings()
    assert str(refused.value).startswith("COSMOS_KEY is not a Cosmos account key")
    assert EMULATOR_KEY[:20] not in str(refused.value)


@pytest.mark.parametrize(
    "key",
    [
        # The SDK drops what is not base64 and signs with what is left: another key.
        EMULATOR_KEY.replace("+", "-").replace("/", "_"),  # the URL-safe alphabet
        EMULATOR_KEY.replace("+", "%2B").replace("/", "%2F"),  # escaped for a URL
    ],
    ids=["url-safe", "url-escaped"],
)
def test_a_cosmos_key_with_a_character_outside_base64_is_refused_at_start(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not accepted, to fail every request later as a 401 `RequestRejected`."""
    assert base64.b64decode(key) != base64.b64decode(EMULATOR_KEY)  # as the SDK reads it
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("COSMOS_KEY", key)
    with pytest.raises(SettingsError) as refused:
        Settings()
    assert str(refused.value).startswith("COSMOS_KEY is not a Cosmos account key")
    assert EMULATOR_KEY[:20] not in str(refused.value)


@pytest.mark.parametrize("key", [EMULATOR_KEY, f" {EMULATOR_KEY}\n"])
def test_the_emulators_key_passes_with_surrounding_whitespace_the_sdk_ignores(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("COSMOS_KEY", key)
    assert Settings().cosmos_key is not None


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@127.0.0.1:6379/notadb",
        "rediss://:hunter2@cache.example:6380/db1",
        "redis://:hunter2@127.0.0.1:6379/1x",
    ],
)
def test_a_redis_url_whose_database_is_not_a_number_is_refused_at_start(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py drops such a path and uses database 0: another application's keys."""
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(SettingsError) as refused:
        Settings()
    assert str(refused.value).startswith("REDIS_URL")
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@127.0.0.1:6379",
        "redis://:hunter2@127.0.0.1:6379/",
        "redis://:hunter2@127.0.0.1:6379/0",
        "redis://:hunter2@127.0.0.1:6379/15",
        "rediss://:hunter2@cache.example:6380/0",
        "rediss://:hunter2@cache.example:6380",
        "redis://127.0.0.1:6379/0?db=2",
        "unix:///run/redis.sock?db=1",
    ],
)
def test_a_redis_url_with_a_numbered_database_or_none_passes(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("REDIS_URL", url)
    assert Settings().hot_tier_configured


@pytest.mark.parametrize(
    "endpoint",
    [
        "localhost:8081",  # no scheme: the SDK retried it as an unreachable host
        "https://localhost:80x81/",  # the SDK's bare ValueError on the first request
        # A connection string pasted whole: its key must not be repeated.
        "AccountEndpoint=https://acct.documents.azure.com:443/;AccountKey=hunter2==;",
    ],
)
async def test_a_malformed_cosmos_endpoint_is_refused_at_start_naming_its_variable(
    endpoint: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not `BackendUnavailable` (a 503 "retry later" on every request, health down, for
    a value no retry mends) nor a traceback: one SettingsError before anything connects."""
    monkeypatch.setenv("COSMOS_ENDPOINT", endpoint)
    monkeypatch.setenv("COSMOS_KEY", EMULATOR_KEY)
    monkeypatch.setenv("COSMOS_OPERATION_TIMEOUT_SECONDS", "1")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Exception) as refused:  # which one: asserted below
        backends = await open_backends(Settings())
        await backends.close()
    assert isinstance(refused.value, SettingsError), repr(refused.value)
    assert str(refused.value).startswith("COSMOS_ENDPOINT is not")
    assert "hunter2" not in str(refused.value) and "hunter2" not in caplog.text
