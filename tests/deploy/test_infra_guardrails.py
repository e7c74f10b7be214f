"""Production guard rails of the deployment, checked from the tree-sitter-bicep parse tree.

One checker per concern of the deployment that a fresh subscription and an
operator need: Azure Managed Redis by default with a TTL-only eviction policy and
optional AOF; parameter bounds the platform accepts; worker telemetry through the
app's own exporter; Postgres least privilege (and no Cosmos DB with Postgres);
diagnostics, alerts, an availability test and a workbook; private networking.
Every checker returns problems, and is run against a broken snippet below to show
that it fails. Nothing here reaches Azure: facts about the platform rest on
Microsoft's documentation (README.md, "Deploy to Azure").
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_infra import (
    INFRA,
    REPO,
    BicepFile,
    Expr,
    Module,
    app_settings_resource,
    dig,
    infra_file,
    infra_files,
    load_script,
    parse,
    sample_values,
)

from support_cases import metrics

Files = list[BicepFile] | tuple[BicepFile, ...]

# Documented bounds (README "Deploy to Azure" cites the sources):
# Flex Consumption maximumInstanceCount 40..1000; Cosmos DB default TTL -1 or 1..2^31-1.
COSMOS_TTL_MAX = 2147483647
EXPECTED_BOUNDS = {
    ("main.bicep", "maximumInstanceCount"): (40, 1000),
    ("function-app.bicep", "maximumInstanceCount"): (40, 1000),
    ("main.bicep", "stateColdTtlSeconds"): (-1, COSMOS_TTL_MAX),
    ("function-app.bicep", "stateColdTtlSeconds"): (-1, COSMOS_TTL_MAX),
}
# No queue endpoint: the app has an HTTP and a timer trigger, whose host keeps its locks in
# blobs; the identity has no queue role either (storage.bicep), so one would serve nothing.
PRIVATE_GROUPS = {
    ("cosmos", "AzureManagedRedis"): {"blob", "table", "Sql", "redisEnterprise"},
    ("postgres", "AzureCacheForRedis"): {"blob", "table", "postgresqlServer", "redisCache"},
}
# Private DNS zone of each private endpoint group (Azure private endpoint DNS reference).
ZONE_PREFIX = {
    "blob": "privatelink.blob.",
    "table": "privatelink.table.",
    "Sql": "privatelink.documents.azure.com",
    "postgresqlServer": "privatelink.postgres.database.azure.com",
    "redisEnterprise": "privatelink.redis.azure.net",
    "redisCache": "privatelink.redis.cache.windows.net",
}
DATA_MODULES = ("storage.bicep", "cosmos.bicep", "redis.bicep", "postgres.bicep")


def module_by_file(main: BicepFile, file_name: str) -> list[Module]:
    return [m for m in main.modules if Path(m.path).name == file_name]


def deployed(main: BicepFile, module: Module) -> Any:
    """True/False when the module's condition folds (parameters bound), else an Expr."""
    return True if module.condition is None else main.evaluate(module.condition)


def module_param(main: BicepFile, module: Module, name: str) -> Any:
    node = module.params().get(name)
    return None if node is None else main.evaluate(node, assume_defaults=True)


def param_default(f: BicepFile, name: str) -> Any:
    param = f.params.get(name)
    return None if param is None or param.default is None else f.evaluate(param.default)


# ================================================================== 1. Redis


def check_redis_default(main: BicepFile, redis: BicepFile, parameters: dict[str, Any]) -> list[str]:
    problems = []
    for f in (main, redis):
        name = "redisKind" if f is main else "kind"
        if param_default(f, name) != "AzureManagedRedis":
            problems.append(f"{f.name}: {name} must default to AzureManagedRedis")
    mapped = dig(parameters, "redisKind.value")
    if mapped != "${AZURE_REDIS_KIND=AzureManagedRedis}":
        problems.append(f"main.parameters.json: redisKind is {mapped!r}")
    return problems


def check_redis_eviction_and_persistence(files: Files) -> list[str]:
    """Only keys with a TTL are evicted; AOF is a parameter of Managed Redis."""
    problems = []
    for f in files:
        for cache in f.of_type("Microsoft.Cache/redis"):
            policy = cache.get("properties.redisConfiguration.maxmemory-policy")
            if policy not in {"volatile-lru", "volatile-lfu", "volatile-ttl", "volatile-random"}:
                problems.append(
                    f"{cache.label}: maxmemory-policy {policy!r} evicts keys without TTL"
                )
        for database in f.of_type("Microsoft.Cache/redisEnterprise/databases"):
            props = database.get("properties", assume_defaults=True) or {}
            if props.get("evictionPolicy") not in {"VolatileLRU", "VolatileLFU", "VolatileTTL"}:
                problems.append(
                    f"{database.label}: evictionPolicy {props.get('evictionPolicy')!r} evicts "
                    "keys without TTL (unflushed write-behind entries)"
                )
            if props.get("port") != 10000 or props.get("clusteringPolicy") != "EnterpriseCluster":
                problems.append(f"{database.label}: must be clustered (EnterpriseCluster) on 10000")
            allowed = f.params.get("managedRedisPersistence")
            if allowed is None or "AOF" not in allowed.decorator_args.get("allowed", [[]])[0]:
                problems.append(f"{f.name}: no managedRedisPersistence parameter offering AOF")
                continue
            with_aof = f.bind(managedRedisPersistence="AOF")
            without = f.bind(managedRedisPersistence="None")
            [aof_db] = with_aof.of_type("Microsoft.Cache/redisEnterprise/databases")
            [plain_db] = without.of_type("Microsoft.Cache/redisEnterprise/databases")
            aof = aof_db.get("properties.persistence") or {}
            plain = plain_db.get("properties.persistence") or {}
            if aof.get("aofEnabled") is not True or aof.get("aofFrequency") != "1s":
                problems.append(
                    f"{database.label}: AOF (every second) not enabled by the parameter"
                )
            if plain.get("aofEnabled") is not False:
                problems.append(f"{database.label}: AOF on although the parameter says None")
    return problems


def test_managed_redis_is_the_default() -> None:
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    problems = check_redis_default(infra_file("main.bicep"), infra_file("redis.bicep"), parameters)
    assert problems == []


def test_redis_evicts_only_keys_with_a_ttl_and_offers_aof() -> None:
    assert check_redis_eviction_and_persistence(infra_files()) == []


AMR_SNIPPET = """
@allowed([
  'None'
  'AOF'
])
param managedRedisPersistence string = 'None'
var aof = {
  aofEnabled: true
  aofFrequency: '1s'
}
var none = {
  aofEnabled: false
}
resource db 'Microsoft.Cache/redisEnterprise/databases@2025-07-01' = {
  name: 'default'
  properties: {
    port: 10000
    clusteringPolicy: 'EnterpriseCluster'
    evictionPolicy: 'VolatileLRU'
    persistence: managedRedisPersistence == 'AOF' ? aof : none
  }
}
"""


def test_redis_checker_fails_on_allkeys_eviction_and_missing_aof() -> None:
    assert check_redis_eviction_and_persistence([parse(AMR_SNIPPET)]) == []
    evicting = parse(AMR_SNIPPET.replace("'VolatileLRU'", "'AllKeysLRU'"))
    assert any("evictionPolicy" in p for p in check_redis_eviction_and_persistence([evicting]))
    no_aof = parse(AMR_SNIPPET.replace("'None'\n  'AOF'", "'None'"))
    assert any("AOF" in p for p in check_redis_eviction_and_persistence([no_aof]))
    ignored = parse(AMR_SNIPPET.replace("? aof : none", "? none : none"))
    assert any("AOF" in p for p in check_redis_eviction_and_persistence([ignored]))
    cache = parse(
        "resource c 'Microsoft.Cache/redis@2024-11-01' = {\n  name: 'c'\n  properties: {\n"
        "    redisConfiguration: {\n      'maxmemory-policy': 'allkeys-lru'\n    }\n  }\n}\n"
    )
    assert any("maxmemory-policy" in p for p in check_redis_eviction_and_persistence([cache]))
    default_kind = parse("param kind string = 'AzureCacheForRedis'\n", name="redis.bicep")
    main = parse("param redisKind string = 'AzureManagedRedis'\n", name="main.bicep")
    problems = check_redis_default(main, default_kind, {"redisKind": {"value": "x"}})
    assert len(problems) == 2


# ================================================================== 2. bounds


def check_param_bounds(files: Files, expected: dict[tuple[str, str], tuple[int, int]]) -> list[str]:
    problems = []
    by_name = {f.name: f for f in files}
    for (file_name, name), (low, high) in expected.items():
        f = by_name.get(file_name)
        param = f.params.get(name) if f is not None else None
        if param is None:
            problems.append(f"{file_name}: parameter {name} missing")
            continue
        found = (
            param.decorator_args.get("minValue", [None])[0],
            param.decorator_args.get("maxValue", [None])[0],
        )
        if found != (low, high):
            problems.append(f"{file_name}: {name} bounds {found}, expected {(low, high)}")
        default = param_default(f, name) if f is not None else None
        if isinstance(default, int) and not low <= default <= high:
            problems.append(f"{file_name}: {name} default {default} outside {(low, high)}")
    return problems


def check_cold_ttl_never_zero(main: BicepFile) -> list[str]:
    """Whatever the parameters, the TTL that reaches Cosmos DB and the app is -1 or > 0."""
    problems = []
    param = main.params.get("stateColdTtlSeconds")
    low = param.decorator_args.get("minValue", [None])[0] if param else None
    if not isinstance(low, int):
        return ["main.bicep: stateColdTtlSeconds has no @minValue"]
    # Every value the bounds admit up to 1 (-1, and the 0 the app refuses, included).
    for chosen in range(low, 2):
        bound = main.bind(stateColdTtlSeconds=chosen)
        ttl = bound.evaluate(bound.variables["stateColdTtl"])
        if not isinstance(ttl, int) or ttl == 0 or ttl < -1:
            problems.append(f"main.bicep: stateColdTtlSeconds={chosen} gives a cold TTL of {ttl!r}")
    for file_name, name in (("function-app.bicep", "stateColdTtlSeconds"),):
        for module in module_by_file(main, file_name):
            passed = module.params().get(name)
            if passed is None or passed.text != b"stateColdTtl":
                problems.append(f"main.bicep: {file_name} {name} is not the checked stateColdTtl")
    return problems


def test_platform_bounds_are_declared() -> None:
    assert check_param_bounds(infra_files(), EXPECTED_BOUNDS) == []
    assert check_cold_ttl_never_zero(infra_file("main.bicep")) == []


BOUNDS_SNIPPET = """
@minValue(-1)
@maxValue(2147483647)
param stateColdTtlSeconds int = -1
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40
var stateColdTtl = stateColdTtlSeconds == 0 ? -1 : stateColdTtlSeconds
"""


def test_bounds_checkers_fail_on_values_the_platform_rejects() -> None:
    expected = {
        ("main.bicep", "maximumInstanceCount"): (40, 1000),
        ("main.bicep", "stateColdTtlSeconds"): (-1, COSMOS_TTL_MAX),
    }
    good = parse(BOUNDS_SNIPPET, name="main.bicep")
    assert check_param_bounds([good], expected) == []
    low_scale = parse(BOUNDS_SNIPPET.replace("@minValue(40)", "@minValue(1)"), name="main.bicep")
    assert any("maximumInstanceCount" in p for p in check_param_bounds([low_scale], expected))
    zero_ttl = parse(BOUNDS_SNIPPET.replace("@minValue(-1)\n", "@minValue(0)\n"), name="main.bicep")
    assert any("stateColdTtlSeconds" in p for p in check_param_bounds([zero_ttl], expected))
    zero_passed = parse(BOUNDS_SNIPPET.replace("== 0 ? -1 :", "== -2 ? -1 :"), name="main.bicep")
    assert any("0" in p for p in check_cold_ttl_never_zero(zero_passed))
    unbounded = parse(BOUNDS_SNIPPET.replace("@maxValue(1000)\n", ""), name="main.bicep")
    assert check_param_bounds([unbounded], expected)


# A serverless container serves up to 5,000 RU/s ("Azure Cosmos DB serverless performance",
# https://learn.microsoft.com/azure/cosmos-db/serverless-performance; docs/CAPACITY.md).
SERVERLESS_CONTAINER_RU = 5000


def provisioned_cosmos_ru(main: BicepFile, cosmos: BicepFile) -> Any:
    """The autoscale maximum the container gets with cosmosServerless=false: what main
    passes, else cosmos.bicep's own default."""
    modules = module_by_file(main, "cosmos.bicep")
    passed = module_param(main, modules[0], "autoscaleMaxThroughput") if modules else None
    return passed if passed is not None else param_default(cosmos, "autoscaleMaxThroughput")


def test_provisioned_cosmos_serves_more_than_serverless() -> None:
    """README and docs/CAPACITY.md: past the serverless container's 5,000 RU/s, provisioned
    (autoscale) throughput (cosmosServerless=false). It deployed an autoscale maximum of
    1,000 RU/s, a fifth of serverless, that no main.bicep parameter could raise: the
    switch made for more throughput throttled (429) at a fifth of the load."""
    main, cosmos = infra_file("main.bicep"), infra_file("cosmos.bicep")
    ru = provisioned_cosmos_ru(main, cosmos)
    assert isinstance(ru, int) and ru > SERVERLESS_CONTAINER_RU, ru
    # Autoscale maxima are whole thousands of RU/s, from 1,000.
    assert ru % 1000 == 0
    param = main.params.get("cosmosAutoscaleMaxThroughput")
    assert param is not None, "main.bicep does not offer the autoscale maximum"
    assert param.decorator_args.get("minValue") == [1000]


# ================================================================== 3. worker telemetry


def check_worker_telemetry(files: Files, host: dict[str, Any]) -> list[str]:
    settings = app_settings_resource(files).get("properties") or {}
    problems = []
    if settings.get("PYTHON_ENABLE_OPENTELEMETRY") != "true":
        problems.append("PYTHON_ENABLE_OPENTELEMETRY must be 'true' (trace context for the app)")
    if settings.get("PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY") != "false":
        problems.append(
            "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY must be 'false': the worker would "
            "configure its own exporter without a credential"
        )
    if "Authorization=AAD" not in str(settings.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING")):
        problems.append("the app's exporter must authenticate with Entra ID")
    if host.get("telemetryMode") != "OpenTelemetry":
        problems.append("host.json telemetryMode must be OpenTelemetry")
    return problems


def test_the_app_exporter_is_the_only_one() -> None:
    host = json.loads((REPO / "function_app" / "host.json").read_text())
    assert check_worker_telemetry(infra_files(), host) == []


TELEMETRY_SNIPPET = """
resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: 's'
  resource cfg 'config' = {
    name: 'appsettings'
    properties: {
      PYTHON_ENABLE_OPENTELEMETRY: 'true'
      PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY: 'false'
      APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${id};Authorization=AAD'
    }
  }
}
"""


def test_telemetry_checker_fails_when_the_worker_exports_too() -> None:
    host = {"telemetryMode": "OpenTelemetry"}
    assert check_worker_telemetry([parse(TELEMETRY_SNIPPET)], host) == []
    worker = parse(TELEMETRY_SNIPPET.replace("TELEMETRY: 'false'", "TELEMETRY: 'true'"))
    assert any("configure its own" in p for p in check_worker_telemetry([worker], host))
    unset = parse(
        TELEMETRY_SNIPPET.replace(
            "      PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY: 'false'\n", ""
        )
    )
    assert check_worker_telemetry([unset], host)
    assert check_worker_telemetry([parse(TELEMETRY_SNIPPET)], {"telemetryMode": "Default"})


# ================================================================== 4. Postgres least privilege


def check_postgres_least_privilege(main: BicepFile, postgres: BicepFile) -> list[str]:
    problems = []
    admins = postgres.of_type("Microsoft.DBforPostgreSQL/flexibleServers/administrators")
    if not admins:
        problems.append(f"{postgres.name}: no Entra administrator")
    for admin in admins:
        name = admin.get("name")
        if not isinstance(name, Expr) or "identity" in name.text.lower():
            problems.append(f"{admin.label}: the administrator must not be the app identity")
    for module in module_by_file(main, "postgres.bicep"):
        for param in ("administratorObjectId", "administratorName"):
            node = module.params().get(param)
            if node is None or b"identity" in (node.text or b""):
                problems.append(f"main.bicep: postgres {param} must name the deploying principal")
    for backend, wants_cosmos in (("cosmos", True), ("postgres", False)):
        bound = main.bind(stateColdBackend=backend)
        for module in module_by_file(bound, "cosmos.bicep"):
            if deployed(bound, module) is not wants_cosmos:
                problems.append(f"main.bicep: Cosmos DB deployed={not wants_cosmos} with {backend}")
        for module in module_by_file(bound, "postgres.bicep"):
            if deployed(bound, module) is wants_cosmos:
                problems.append(f"main.bicep: Postgres deployed={wants_cosmos} with {backend}")
    return problems


def test_postgres_admin_is_not_the_app_and_cosmos_is_skipped_with_postgres() -> None:
    assert (
        check_postgres_least_privilege(infra_file("main.bicep"), infra_file("postgres.bicep")) == []
    )
    hook = (REPO / "scripts" / "azd" / "postprovision.sh").read_text()
    assert "postgres_access.py" in hook


PG_MAIN = """
param stateColdBackend string = 'cosmos'
param principalId string = ''
var usePostgres = stateColdBackend == 'postgres'
module cosmos 'modules/cosmos.bicep' = if (!usePostgres) {
  name: 'cosmos'
}
module postgres 'modules/postgres.bicep' = if (usePostgres) {
  name: 'postgres'
  params: {
    administratorObjectId: principalId
    administratorName: principalName
  }
}
"""
PG_SERVER = """
param administratorObjectId string
resource server 'Microsoft.DBforPostgreSQL/flexibleServers@2024-08-01' = {
  name: 's'
}
resource admin 'Microsoft.DBforPostgreSQL/flexibleServers/administrators@2024-08-01' = {
  parent: server
  name: administratorObjectId
}
"""


def test_postgres_checker_fails_on_an_app_admin_or_cosmos_beside_postgres() -> None:
    good = (parse(PG_MAIN, name="main.bicep"), parse(PG_SERVER, name="postgres.bicep"))
    assert check_postgres_least_privilege(*good) == []
    app_admin = parse(PG_SERVER.replace("name: administratorObjectId", "name: identityPrincipalId"))
    assert any("app identity" in p for p in check_postgres_least_privilege(good[0], app_admin))
    passes_identity = parse(PG_MAIN.replace(": principalId", ": identity.outputs.principalId"))
    assert check_postgres_least_privilege(passes_identity, good[1])
    always_cosmos = parse(PG_MAIN.replace("= if (!usePostgres) {", "= {"), name="main.bicep")
    assert any("Cosmos DB" in p for p in check_postgres_least_privilege(always_cosmos, good[1]))


def test_local_settings_for_postgres_need_no_cosmos_and_sign_in_as_the_admin(
    tmp_path: Path,
) -> None:
    local_settings = load_script("local_settings")
    values = {
        "STATE_COLD_BACKEND": "postgres",
        "COSMOS_ENDPOINT": "",
        "REDIS_HOST": "amr-abc.westeurope.redis.azure.net",
        "REDIS_PORT": "10000",
        "POSTGRES_HOST": "psql-abc.postgres.database.azure.com",
        "POSTGRES_USER": "id-api-abc",
        "AZURE_PRINCIPAL_NAME": "dev@example.com",
    }
    document = local_settings.build_local_settings(values, {"Values": sample_values()})
    assert document["Values"]["POSTGRES_USER"] == "dev@example.com"
    assert document["Values"]["POSTGRES_HOST"] == values["POSTGRES_HOST"]
    with pytest.raises(local_settings.LocalSettingsError, match="POSTGRES_HOST"):
        local_settings.build_local_settings(
            {**values, "POSTGRES_HOST": ""}, {"Values": sample_values()}
        )


# ================================================================== 5. watchable


DIAGNOSED = {
    # resource type -> where its diagnostic setting must point
    "Microsoft.DocumentDB/databaseAccounts": "cosmos",
    "Microsoft.DBforPostgreSQL/flexibleServers": "postgres",
    "Microsoft.Cache/redis": "redis",
    "Microsoft.Cache/redisEnterprise/databases": "redis",
    "Microsoft.Storage/storageAccounts/blobServices": "storage",
}


def check_diagnostics(files: Files) -> list[str]:
    """Each data resource sends logs to the workspace, unless switched off."""
    problems = []
    for f in files:
        settings = f.of_type("Microsoft.Insights/diagnosticSettings")
        scoped = {str(s.get("scope")) for s in settings}
        for resource in f.resources:
            if resource.existing or resource.type not in DIAGNOSED:
                continue
            names = {resource.symbol, str(Expr(resource.symbol))}
            if resource.parent is not None:
                names.add(str(Expr(f"{resource.parent.symbol}::{resource.symbol}")))
            if not names & scoped:
                problems.append(f"{resource.label}: no diagnostic setting")
        for setting in settings:
            if setting.get("properties.workspaceId") is None:
                problems.append(f"{setting.label}: no workspaceId")
            if not setting.get("properties.logs"):
                problems.append(f"{setting.label}: sends no logs")
            if (
                setting.condition is None
                or b"logAnalyticsWorkspaceId" not in setting.condition.text
            ):
                problems.append(f"{setting.label}: not switched by logAnalyticsWorkspaceId")
    return problems


def check_alerts(files: Files, *custom_metrics: str) -> list[str]:
    problems = []
    alerts = [r for f in files for r in f.of_type("Microsoft.Insights/metricAlerts")]
    found: dict[str, Any] = {}
    for alert in alerts:
        if alert.condition is None or b"alertsEnabled" not in alert.condition.text:
            problems.append(f"{alert.label}: no alertsEnabled off switch")
        for criterion in alert.get("properties.criteria.allOf") or []:
            found[str(criterion.get("metricName"))] = criterion
    for metric in (
        "Http5xx",
        "TotalRequests",
        "serverLoad",
        "usedmemorypercentage",
        *custom_metrics,
    ):
        if metric not in found:
            problems.append(f"no metric alert on {metric}")
    throttled = found.get("TotalRequests") or {}
    if not any("429" in (d.get("values") or []) for d in throttled.get("dimensions") or []):
        problems.append("the Cosmos DB alert must filter StatusCode 429")
    for custom in custom_metrics:
        if custom in found and found[custom].get("skipMetricValidation") is not True:
            problems.append(f"the alert on the app's {custom} needs skipMetricValidation")
    tests = [r for f in files for r in f.of_type("Microsoft.Insights/webtests")]
    if not any(str(t.get("properties.Request.RequestUrl")).endswith("/api/health") for t in tests):
        problems.append("no availability test against /api/health")
    for webtest in tests:
        if webtest.condition is None or b"availabilityTestEnabled" not in webtest.condition.text:
            problems.append(f"{webtest.label}: no availabilityTestEnabled off switch")
    return problems


def check_workbook(files: Files, needles: list[str]) -> list[str]:
    workbooks = [r for f in files for r in f.of_type("Microsoft.Insights/workbooks")]
    if not workbooks:
        return ["no workbook"]
    problems = []
    for workbook in workbooks:
        if workbook.condition is None or b"workbookEnabled" not in workbook.condition.text:
            problems.append(f"{workbook.label}: no workbookEnabled off switch")
        data = workbook.get("properties.serializedData")
        try:
            document = json.loads(data) if isinstance(data, str) else None
        except json.JSONDecodeError as exc:
            problems.append(f"{workbook.label}: serializedData is not JSON ({exc})")
            continue
        if not isinstance(document, dict) or not document.get("items"):
            problems.append(f"{workbook.label}: serializedData has no items")
            continue
        queries = " ".join(str(dig(i, "content.query") or "") for i in document["items"])
        problems += [f"{workbook.label}: no query over {n}" for n in needles if n not in queries]
    return problems


OFF_SWITCHES = ("diagnosticsEnabled", "alertsEnabled", "availabilityTestEnabled", "workbookEnabled")
WORKBOOK_NEEDLES = [
    metrics.RUNS,  # case throughput
    metrics.RUN_DURATION,  # latency
    metrics.CACHE_LOOKUPS,  # cache hit ratio
    metrics.COLD_REQUEST_CHARGE,  # RU per case
    metrics.BACKLOG_OLDEST_AGE,  # backlog
]


def test_diagnostics_alerts_availability_and_workbook() -> None:
    files = infra_files()
    assert check_diagnostics(files) == []
    assert (
        check_alerts(
            files,
            metrics.BACKLOG_OLDEST_AGE,
            metrics.BACKLOG_LOSSES,
            metrics.BACKLOG_STUCK_THREADS,
        )
        == []
    )
    assert check_workbook(files, WORKBOOK_NEEDLES) == []
    main = infra_file("main.bicep")
    for switch in OFF_SWITCHES:
        assert param_default(main, switch) is True, switch
    # diagnosticsEnabled=false hands every module an empty workspace id.
    off = main.bind(diagnosticsEnabled=False)
    assert off.evaluate(off.variables["logAnalyticsWorkspaceId"]) == ""


DIAG_SNIPPET = """
param logAnalyticsWorkspaceId string = ''
resource account 'Microsoft.DocumentDB/databaseAccounts@2024-11-15' = {
  name: 'a'
}
resource diag 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = if (!empty(logAnalyticsWorkspaceId)) {
  name: 'd'
  scope: account
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
  }
}
"""

ALERTS_SNIPPET = """
param alertsEnabled bool = true
param availabilityTestEnabled bool = true
resource a1 'Microsoft.Insights/metricAlerts@2018-03-01' = if (alertsEnabled) {
  name: 'a1'
  properties: {
    criteria: {
      allOf: [
        {
          metricName: 'Http5xx'
        }
        {
          metricName: 'TotalRequests'
          dimensions: [
            {
              name: 'StatusCode'
              values: [
                '429'
              ]
            }
          ]
        }
        {
          metricName: 'serverLoad'
        }
        {
          metricName: 'usedmemorypercentage'
        }
        {
          metricName: 'backlog.age'
          skipMetricValidation: true
        }
      ]
    }
  }
}
resource t 'Microsoft.Insights/webtests@2022-06-15' = if (availabilityTestEnabled) {
  name: 't'
  properties: {
    Request: {
      RequestUrl: '${uri}/api/health'
    }
  }
}
"""


def test_watchability_checkers_fail_on_broken_snippets(tmp_path: Path) -> None:
    assert check_diagnostics([parse(DIAG_SNIPPET)]) == []
    undiagnosed = parse(DIAG_SNIPPET.split("resource diag")[0])
    assert any("no diagnostic setting" in p for p in check_diagnostics([undiagnosed]))
    always_on = parse(DIAG_SNIPPET.replace(" = if (!empty(logAnalyticsWorkspaceId)) {", " = {"))
    assert any("not switched" in p for p in check_diagnostics([always_on]))

    assert check_alerts([parse(ALERTS_SNIPPET)], "backlog.age") == []
    no_backlog = parse(ALERTS_SNIPPET.replace("'backlog.age'", "'other'"))
    assert any("backlog.age" in p for p in check_alerts([no_backlog], "backlog.age"))
    no_429 = parse(ALERTS_SNIPPET.replace("'429'", "'500'"))
    assert any("429" in p for p in check_alerts([no_429], "backlog.age"))
    wrong_path = parse(ALERTS_SNIPPET.replace("/api/health", "/api/cases"))
    assert any("/api/health" in p for p in check_alerts([wrong_path], "backlog.age"))
    validated = parse(ALERTS_SNIPPET.replace("skipMetricValidation: true", "x: 1"))
    assert any("skipMetricValidation" in p for p in check_alerts([validated], "backlog.age"))
    unswitched = parse(ALERTS_SNIPPET.replace("= if (alertsEnabled) {", "= {"))
    assert any("off switch" in p for p in check_alerts([unswitched], "backlog.age"))

    workbook_dir = tmp_path / "modules"
    workbook_dir.mkdir()
    (tmp_path / "wb.json").write_text(
        json.dumps({"items": [{"content": {"query": "customMetrics | where name == 'a.b'"}}]})
    )
    source = (
        "param workbookEnabled bool = true\n"
        "resource wb 'Microsoft.Insights/workbooks@2023-06-01' = if (workbookEnabled) {\n"
        "  name: 'w'\n  properties: {\n    serializedData: loadTextContent('../wb.json')\n  }\n}\n"
    )
    path = workbook_dir / "o.bicep"
    workbook = BicepFile(name="o.bicep", source=source, path=path)
    assert check_workbook([workbook], ["a.b"]) == []
    assert any("c.d" in p for p in check_workbook([workbook], ["c.d"]))
    (tmp_path / "wb.json").write_text("{not json")
    assert any("not JSON" in p for p in check_workbook([workbook], ["a.b"]))


# ================================================================== 6. private networking


def check_private_networking(main: BicepFile, modules: Files) -> list[str]:
    problems = []
    if param_default(main, "vnetEnabled") is not False:
        problems.append("main.bicep: vnetEnabled must default to false")
    for (backend, redis_kind), groups in PRIVATE_GROUPS.items():
        for vnet in (True, False):
            bound = main.bind(vnetEnabled=vnet, stateColdBackend=backend, redisKind=redis_kind)
            where = f"vnetEnabled={vnet}, {backend}, {redis_kind}"
            endpoints = {
                module_param(bound, m, "groupId")
                for m in module_by_file(bound, "private-endpoint.bicep")
                if deployed(bound, m) is True
            }
            if endpoints != (groups if vnet else set()):
                problems.append(f"{where}: private endpoints {sorted(map(str, endpoints))}")
            zones = bound.evaluate(bound.variables["privateDnsZoneNames"])
            # A zone no endpoint registers in (left behind by a removed endpoint).
            unused = set(map(str, zones))
            for m in module_by_file(bound, "private-endpoint.bicep"):
                if deployed(bound, m) is not True:
                    continue
                group = module_param(bound, m, "groupId")
                index = re.fullmatch(
                    r"network\.outputs\.zoneIds\[(\d)\]",
                    (m.params()["privateDnsZoneId"].text or b"").decode(),
                )
                position = int(index.group(1)) if index else len(zones)
                zone = zones[position] if position < len(zones) else None
                unused.discard(str(zone))
                if not str(zone).startswith(ZONE_PREFIX.get(str(group), "?")):
                    problems.append(f"{where}: endpoint {group} registered in zone {zone!r}")
            if vnet and unused:
                problems.append(f"{where}: private DNS zones no endpoint uses {sorted(unused)}")
            networks = [m for m in module_by_file(bound, "network.bicep") if deployed(bound, m)]
            if bool(networks) != vnet:
                problems.append(f"{where}: network deployed={bool(networks)}")
            for file_name in DATA_MODULES:
                for m in module_by_file(bound, file_name):
                    if deployed(bound, m) is not True:
                        continue
                    access = module_param(bound, m, "publicNetworkAccess")
                    if access != ("Disabled" if vnet else "Enabled"):
                        problems.append(f"{where}: {file_name} publicNetworkAccess {access!r}")
            for m in module_by_file(bound, "function-app.bicep"):
                subnet = module_param(bound, m, "virtualNetworkSubnetId")
                if (subnet not in (None, "")) != vnet:
                    problems.append(f"{where}: function app subnet {subnet!r}")
    # Inside each data module, the parameter reaches the resource.
    wired = {
        "storage.bicep": ("Microsoft.Storage/storageAccounts", "properties.publicNetworkAccess"),
        "cosmos.bicep": ("Microsoft.DocumentDB/databaseAccounts", "properties.publicNetworkAccess"),
        "redis.bicep": ("Microsoft.Cache/redisEnterprise", "properties.publicNetworkAccess"),
        "postgres.bicep": (
            "Microsoft.DBforPostgreSQL/flexibleServers",
            "properties.network.publicNetworkAccess",
        ),
    }
    by_name = {f.name: f for f in modules}
    for file_name, (type_name, path) in wired.items():
        f = by_name.get(file_name)
        resources = f.of_type(type_name) if f is not None else []
        if not resources or any(r.get(path) != Expr("publicNetworkAccess") for r in resources):
            problems.append(f"{file_name}: {type_name} ignores the publicNetworkAccess parameter")
    return problems


def test_vnet_option_makes_every_data_service_private() -> None:
    files = infra_files()
    assert check_private_networking(infra_file("main.bicep"), files) == []


def test_networking_checker_fails_when_a_service_stays_public() -> None:
    main = infra_file("main.bicep")
    source = main.source.replace(
        "    publicNetworkAccess: publicNetworkAccess\n    logAnalyticsWorkspaceId: logAnalyticsWorkspaceId\n  }\n}\n\nmodule redis",
        "    publicNetworkAccess: 'Enabled'\n    logAnalyticsWorkspaceId: logAnalyticsWorkspaceId\n  }\n}\n\nmodule redis",
    )
    assert source != main.source
    public_cosmos = BicepFile(name="main.bicep", source=source, path=main.path)
    problems = check_private_networking(public_cosmos, infra_files())
    assert any("cosmos.bicep publicNetworkAccess 'Enabled'" in p for p in problems)
    on_by_default = BicepFile(
        name="main.bicep",
        source=main.source.replace(
            "param vnetEnabled bool = false", "param vnetEnabled bool = true"
        ),
        path=main.path,
    )
    assert any(
        "default to false" in p for p in check_private_networking(on_by_default, infra_files())
    )
    no_redis_endpoint = BicepFile(
        name="main.bicep",
        source=main.source.replace(
            "module redisEndpoint 'modules/private-endpoint.bicep' = if (vnetEnabled)",
            "module redisEndpoint 'modules/private-endpoint.bicep' = if (false)",
        ),
        path=main.path,
    )
    assert any(
        "private endpoints" in p for p in check_private_networking(no_redis_endpoint, infra_files())
    )
    swapped = BicepFile(
        name="main.bicep",
        source=main.source.replace("zoneIds[3]", "zoneIds[9]").replace("zoneIds[2]", "zoneIds[3]"),
        path=main.path,
    )
    assert any("registered in zone" in p for p in check_private_networking(swapped, infra_files()))
    queue_zone = "  'privatelink.queue.${environment().suffixes.storage}'\n"
    table_zone = "  'privatelink.table.${environment().suffixes.storage}'\n"
    queue_endpoint = (
        "module storageQueueEndpoint 'modules/private-endpoint.bicep' = if (vnetEnabled) {\n"
        "  name: 'pe-storage-queue'\n  scope: rg\n  params: {\n"
        "    subnetId: network.outputs.privateEndpointSubnetId\n"
        "    serviceId: storage.outputs.id\n    groupId: 'queue'\n"
        "    privateDnsZoneId: network.outputs.zoneIds[4]\n  }\n}\n\n"
    )
    assert table_zone in main.source
    with_queue = main.source.replace(table_zone, table_zone + queue_zone)
    queue_problems = check_private_networking(
        BicepFile(name="main.bicep", source=with_queue, path=main.path), infra_files()
    )
    assert any("private DNS zones no endpoint uses" in p for p in queue_problems)
    with_queue = with_queue.replace(
        "module cosmosEndpoint", queue_endpoint + "module cosmosEndpoint"
    )
    queue_problems = check_private_networking(
        BicepFile(name="main.bicep", source=with_queue, path=main.path), infra_files()
    )
    assert any("private endpoints" in p and "'queue'" in p for p in queue_problems)
    modules = [f for f in infra_files() if f.name != "redis.bicep"] + [
        parse(
            infra_file("redis.bicep").source.replace(
                "publicNetworkAccess: publicNetworkAccess", "publicNetworkAccess: 'Enabled'"
            ),
            name="redis.bicep",
        )
    ]
    assert any("redis.bicep" in p for p in check_private_networking(main, modules))
