"""Limits only Azure enforces, checked offline against the files that set them.

The Flex Consumption front end ends any HTTP request at 230 s whatever host.json says;
host.json `functionTimeout` ends an invocation (the timer's included); the worker's
Python is the Bicep `pythonVersion`, which the locks must have been resolved for; an
instance takes as many concurrent requests as the plan's HTTP concurrency lets through.
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet
from test_infra import Expr, app_settings_resource, infra_file

from support_cases.api import create_app
from support_cases.maintenance import (
    DRAIN_BUDGET_SECONDS,
    RESUME_BUDGET_SECONDS,
    SWEEP_BUDGET_SECONDS,
)
from support_cases.settings import AppSettings

REPO = Path(__file__).resolve().parents[2]
HOST_JSON = REPO / "function_app" / "host.json"
ENTRY = REPO / "function_app" / "function_app.py"
# Azure's load balancer idle timeout for an HTTP-triggered function, on every plan.
HTTP_FRONT_END_SECONDS = 230
# Flex Consumption's HTTP concurrency per instance for a Python app when none is set.
PYTHON_DEFAULT_HTTP_CONCURRENCY = 1


def _seconds(timespan: str) -> int:
    hours, minutes, seconds = (int(part) for part in timespan.split(":"))
    return hours * 3600 + minutes * 60 + seconds


def _timer_keywords() -> dict[str, object]:
    for node in ast.walk(ast.parse(ENTRY.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "timer_trigger"
        ):
            return {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
    raise AssertionError("function_app.py registers no timer trigger")


def test_a_timer_tick_fits_its_period_and_the_function_timeout() -> None:
    timer = _timer_keywords()
    seconds, minutes, *rest = str(timer["schedule"]).split()
    # Every minute at second 0: six NCRONTAB fields, as the Functions host expects.
    assert (seconds, minutes, rest) == ("0", "*/1", ["*", "*", "*", "*"])
    period = 60
    # A start-up tick on each scaled-out instance would resume the same runs N times.
    assert timer["run_on_startup"] is False and timer["use_monitor"] is True
    timeout = _seconds(json.loads(HOST_JSON.read_text())["functionTimeout"])
    # The three jobs' budgets run one after the other: a tick ends before the next is due.
    assert RESUME_BUDGET_SECONDS + DRAIN_BUDGET_SECONDS + SWEEP_BUDGET_SECONDS < period < timeout


def test_no_request_outlives_the_http_front_end() -> None:
    document = create_app().openapi()
    parameters = document["paths"]["/api/cases/{case_id}/events"]["get"]["parameters"]
    stream = next(p for p in parameters if p["name"] == "seconds")["schema"]
    assert stream["maximum"] < HTTP_FRONT_END_SECONDS
    sync_wait = AppSettings.model_fields["case_sync_wait_seconds"].metadata
    assert max(getattr(bound, "le", 0) for bound in sync_wait) < HTTP_FRONT_END_SECONDS


def test_host_json_uses_values_flex_consumption_accepts() -> None:
    host = json.loads(HOST_JSON.read_text())
    assert host["version"] == "2.0"
    bundle = host["extensionBundle"]
    assert bundle["id"] == "Microsoft.Azure.Functions.ExtensionBundle"
    assert bundle["version"] == "[4.*, 5.0.0)"
    # Flex Consumption has no 10-minute cap, but a bounded timeout keeps a hung tick finite.
    assert 0 < _seconds(host["functionTimeout"]) <= 4 * 3600


def test_the_worker_python_versions_are_the_ones_the_locks_cover() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    supported = SpecifierSet(project["project"]["requires-python"])
    lock_command = (REPO / "scripts" / "lock.sh").read_text()
    locked_for = re.search(r"--python-version (\d+\.\d+)", lock_command)
    assert locked_for is not None
    for bicep in (REPO / "infra" / "main.bicep", REPO / "infra" / "modules" / "function-app.bicep"):
        text = bicep.read_text()
        declared = re.search(
            r"@allowed\(\[\s*([^\]]*)\]\)\s*param pythonVersion string = '([\d.]+)'", text
        )
        assert declared is not None, bicep
        allowed = re.findall(r"'([\d.]+)'", declared.group(1))
        # Every version Bicep lets the worker run is one pyproject (hence the lock) supports,
        # and the default is the one the locks were resolved for.
        assert allowed and all(f"{version}.0" in supported for version in allowed), bicep
        assert declared.group(2) == locked_for.group(1), bicep
    # Universal: markers for every supported version stay in, and each wheel has its hash.
    assert "--universal" in lock_command and "--generate-hashes" in lock_command


def test_an_instance_takes_concurrent_requests_up_to_the_runs_its_worker_drives() -> None:
    """Left at the platform's Python default (1), one open event stream holds a whole
    instance: maximumInstanceCount streams would leave no instance for any other request."""
    site = infra_file("function-app.bicep").of_type("Microsoft.Web/sites")[0]
    concurrency = site.get(
        "properties.functionAppConfig.scaleAndConcurrency.triggers.http.perInstanceConcurrency",
        assume_defaults=True,
    )
    assert isinstance(concurrency, int), "HTTP perInstanceConcurrency is not set"
    assert concurrency > PYTHON_DEFAULT_HTTP_CONCURRENCY
    # No more than the worker drives runs at once: a burst of submits scales out first,
    # rather than meeting the worker's 503.
    assert concurrency <= AppSettings.model_fields["case_max_runs"].default
    main = infra_file("main.bicep")
    module = next(m for m in main.modules if m.path.endswith("function-app.bicep"))
    passed = module.params().get("caseMaxRuns")
    assert passed is not None and passed.text == b"caseMaxRuns"
    assert main.evaluate(main.params["caseMaxRuns"].default) == concurrency


# Azure Database for PostgreSQL Flexible Server, "Limits", maximum connections
# (https://learn.microsoft.com/azure/postgresql/flexible-server/concepts-limits): the
# "maximum user connections" of each compute, its default max_connections less the 15 that
# Azure keeps for physical replication and monitoring.
POSTGRES_USER_CONNECTIONS = {
    "Standard_B1ms": 50 - 15,
    "Standard_B2s": 429 - 15,
    "Standard_B2ms": 859 - 15,
    "Standard_B4ms": 1718 - 15,
    "Standard_D2ds_v5": 859 - 15,
    "Standard_D4ds_v5": 1718 - 15,
    "Standard_E2ds_v5": 1718 - 15,
}
# The postprovision role hook (scripts/azd/postgres_access.py) signs in as the Entra
# administrator, one connection at a time, while the app may already be running.
POSTGRES_HOOK_CONNECTIONS = 1
# Flex Consumption's lowest maximumInstanceCount (README, "Platform bounds").
FLEX_MIN_INSTANCES = 40


def _deployed_app(**main_params: object) -> tuple[str, int, object]:
    """(Postgres SKU, instance cap, POSTGRES_POOL_MAX_SIZE) as main.bicep deploys them."""
    main = infra_file("main.bicep").bind(**main_params)

    def passed(module_file: str) -> dict[str, object]:
        module = next(m for m in main.modules if m.path.endswith(module_file))
        return {
            name: main.evaluate(node, assume_defaults=True)
            for name, node in module.params().items()
        }

    postgres_module = infra_file("postgres.bicep")
    sku = passed("postgres.bicep").get("skuName")
    if sku is None:
        sku = postgres_module.evaluate(postgres_module.params["skuName"].default)
    function_app = infra_file("function-app.bicep").bind(
        **{k: v for k, v in passed("function-app.bicep").items() if not isinstance(v, Expr)}
    )
    site = function_app.of_type("Microsoft.Web/sites")[0]
    instances = site.get(
        "properties.functionAppConfig.scaleAndConcurrency.maximumInstanceCount",
        assume_defaults=True,
    )
    pool = app_settings_resource([function_app]).get(
        "properties.POSTGRES_POOL_MAX_SIZE", assume_defaults=True
    )
    assert isinstance(sku, str) and isinstance(instances, int)
    return sku, instances, pool


def _allowed(name: str) -> list[object]:
    param = infra_file("main.bicep").params.get(name)
    return [] if param is None else param.decorator_args.get("allowed", [[]])[0]


def test_postgres_connections_of_every_instance_fit_the_server() -> None:
    """Each instance's pool may fill at once under load: instances x POSTGRES_POOL_MAX_SIZE
    past the server's user connections fails requests with "too many connections"."""
    main = infra_file("main.bicep")
    bounds = main.params["maximumInstanceCount"].decorator_args
    instance_caps = {
        main.evaluate(main.params["maximumInstanceCount"].default),
        bounds["minValue"][0],
        bounds["maxValue"][0],
    }
    skus = _allowed("postgresSkuName") or [None]
    checked = []
    for sku_choice in skus:
        for cap in sorted(instance_caps):
            chosen = {"stateColdBackend": "postgres", "maximumInstanceCount": cap}
            if sku_choice is not None:
                chosen["postgresSkuName"] = sku_choice
            sku, instances, pool = _deployed_app(**chosen)
            assert sku in POSTGRES_USER_CONNECTIONS, f"{sku}: add its documented user connections"
            budget = POSTGRES_USER_CONNECTIONS[sku] - POSTGRES_HOOK_CONNECTIONS
            assert isinstance(pool, str), f"{sku}, {cap} instances: pool size {pool} not folded"
            # Two at least: one connection per worker would serialize every run on it.
            assert int(pool) >= 2, (sku, cap, pool)
            assert FLEX_MIN_INSTANCES <= instances <= cap, (sku, cap, instances)
            assert instances * int(pool) <= budget, (
                f"{sku}, maximumInstanceCount {cap}: {instances} instances x pool {pool} "
                f"= {instances * int(pool)} connections, the server takes {budget}"
            )
            checked.append((sku, cap))
    # The default deployment is among those checked, and keeps the app's default pool.
    default_sku, default_instances, default_pool = _deployed_app(stateColdBackend="postgres")
    assert (default_sku, default_instances, int(str(default_pool))) in {
        (s, c, AppSettings.model_fields["postgres_pool_max_size"].default) for s, c in checked
    }


def test_cosmos_deployments_keep_the_instance_cap_and_the_default_pool() -> None:
    main = infra_file("main.bicep")
    bounds = main.params["maximumInstanceCount"].decorator_args
    for cap in (bounds["minValue"][0], bounds["maxValue"][0]):
        _, instances, pool = _deployed_app(stateColdBackend="cosmos", maximumInstanceCount=cap)
        assert instances == cap
        assert pool == str(AppSettings.model_fields["postgres_pool_max_size"].default)


def _concurrency_and_max_runs(**main_params: object) -> tuple[object, object]:
    """(HTTP perInstanceConcurrency, CASE_MAX_RUNS) as main.bicep deploys them."""
    main = infra_file("main.bicep").bind(**main_params)
    module = next(m for m in main.modules if m.path.endswith("function-app.bicep"))
    passed = {
        name: main.evaluate(node, assume_defaults=True) for name, node in module.params().items()
    }
    function_app = infra_file("function-app.bicep").bind(
        **{k: v for k, v in passed.items() if not isinstance(v, Expr)}
    )
    site = function_app.of_type("Microsoft.Web/sites")[0]
    concurrency = site.get(
        "properties.functionAppConfig.scaleAndConcurrency.triggers.http.perInstanceConcurrency",
        assume_defaults=True,
    )
    max_runs = app_settings_resource([function_app]).get(
        "properties.CASE_MAX_RUNS", assume_defaults=True
    )
    return concurrency, max_runs


def test_http_concurrency_follows_case_max_runs_whatever_is_overridden() -> None:
    """Concurrency above CASE_MAX_RUNS sends an instance submits its worker answers 503;
    below it, runs the worker could drive go to new instances. Whichever parameter an
    operator overrides, both must move together."""
    main = infra_file("main.bicep")
    assert _concurrency_and_max_runs() == (32, "32")
    overridable = [
        name
        for name, param in main.params.items()
        if param.default is not None and isinstance(main.evaluate(param.default), int)
    ]
    for name in overridable:
        concurrency, max_runs = _concurrency_and_max_runs(**{name: 7})
        assert isinstance(concurrency, int), (name, concurrency)
        assert str(concurrency) == max_runs, (
            f"{name}=7 deploys perInstanceConcurrency {concurrency}, CASE_MAX_RUNS {max_runs}"
        )
    # The one value fits both: the app takes any positive CASE_MAX_RUNS, Flex Consumption
    # an HTTP concurrency of 1..1000.
    bounds = main.params["caseMaxRuns"].decorator_args
    assert bounds["minValue"] == [1] and bounds["maxValue"] == [1000]
