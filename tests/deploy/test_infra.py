"""Static proof of the azd + Bicep deployment (nothing here reaches Azure).

Every `.bicep` file is parsed with tree-sitter-bicep (no Bicep compiler can be
installed here). A small evaluator walks the parse tree: it finds `resource`
declarations by type, folds their bodies into Python values (literals,
variables, `loadJsonContent`, interpolated strings, `union`, ternaries over
known conditions) and leaves anything else as an `Expr` placeholder. The
security checks read those values, never the raw text; each checker returns a
list of problems, and the tests at the end run every checker against a
deliberately broken snippet to prove it can fail.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tree_sitter_bicep
import yaml
from tree_sitter import Language, Node, Parser

from support_cases.settings import AppSettings

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
SAMPLE = REPO / "local.settings.sample.json"
AZURE_YAML = REPO / "azure.yaml"
DEPLOY_DOC = REPO / "README.md"

LANGUAGE = Language(tree_sitter_bicep.language())
EXTENSION_STATEMENT = re.compile(r"^extension[ \t]+([A-Za-z_][A-Za-z0-9_]*)[ \t]*$", re.MULTILINE)
BICEP_CONFIG = INFRA / "bicepconfig.json"
# The Microsoft Graph Bicep extension (v1.0 endpoint) as published on MCR.
GRAPH_EXTENSION_REGISTRY = "br:mcr.microsoft.com/bicep/extensions/microsoftgraph/v1.0:"
GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# The Azure CLI's public client id: azure-cli's `AZURE_CLI_CLIENT_ID` (src/azure-cli-core/
# azure/cli/core/auth/identity.py) and Microsoft's list of first-party application ids
# ("Verify first-party Microsoft applications in sign-in reports"). azd signs users in
# with the same id (Azure/azure-dev, cli/azd/pkg/auth/manager.go: `azdClientID`).
AZURE_CLI_CLIENT_ID = "04b07795-8ddb-461a-bbee-02f9e1bf7b46"
DAEMON_CLIENT_ID = "33333333-3333-3333-3333-333333333333"

# ------------------------------------------------------------------ expectations

# Built-in role ids, each looked up in published role definitions:
ROLE_IDS = {
    # "Storage Blob Data Owner": Azure built-in roles reference (Storage), role JSON "name".
    "storageBlobDataOwner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    # "Storage Table Data Contributor": Azure built-in roles reference (Storage), role JSON
    # "name" (MicrosoftDocs/azure-docs, role-based-access-control/built-in-roles/storage.md).
    "storageTableDataContributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    # "Monitoring Metrics Publisher": Azure built-in roles reference (Monitor), role JSON "name".
    "monitoringMetricsPublisher": "3913510d-42f4-4e42-8a64-420c390055eb",
    # "Cosmos DB Built-in Data Contributor", a Cosmos data-plane SQL role definition
    # (Cosmos DB docs, "Use data plane role-based access control", sample output).
    "cosmosBuiltInDataContributor": "00000000-0000-0000-0000-000000000002",
}

# (file, resource symbol) -> the role each assignment must grant.
EXPECTED_ROLE_ASSIGNMENTS = {
    ("storage.bicep", "appBlobDataOwner"): ROLE_IDS["storageBlobDataOwner"],
    ("storage.bicep", "appTableDataContributor"): ROLE_IDS["storageTableDataContributor"],
    ("monitoring.bicep", "appMetricsPublisher"): ROLE_IDS["monitoringMetricsPublisher"],
    ("cosmos.bicep", "appDataContributor"): ROLE_IDS["cosmosBuiltInDataContributor"],
    ("cosmos.bicep", "developerDataContributor"): ROLE_IDS["cosmosBuiltInDataContributor"],
}

# (file, resource symbol) -> the Redis data access policy each assignment must grant.
EXPECTED_REDIS_ACCESS = {
    # Azure Cache for Redis built-in policy: read/write, no @dangerous commands.
    ("redis.bicep", "cacheAppAccess"): "Data Contributor",
    ("redis.bicep", "cacheDeveloperAccess"): "Data Contributor",
    # Azure Managed Redis has one built-in policy, "default".
    ("redis.bicep", "managedRedisAppAccess"): "default",
    ("redis.bicep", "managedRedisDeveloperAccess"): "default",
}

# The Functions host's own settings in Azure (not read by the app's AppSettings).
# On Flex Consumption FUNCTIONS_WORKER_RUNTIME / FUNCTIONS_EXTENSION_VERSION are not
# app settings: the runtime lives in functionAppConfig.runtime.
AZURE_HOST_SETTINGS = {
    "AzureWebJobsStorage__accountName",
    "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId",
    "PYTHON_ENABLE_OPENTELEMETRY",
    "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY",
}
# The Functions host's own settings when run locally (`func start`).
LOCAL_HOST_SETTINGS = {"AzureWebJobsStorage", "FUNCTIONS_WORKER_RUNTIME"}
# Settings the app reads that are absent in Azure on purpose: each is a secret
# for which the managed identity is the alternative. They must NOT be in Bicep.
ABSENT_IN_AZURE = {
    "COSMOS_KEY": "Cosmos account key; Azure uses Entra RBAC (disableLocalAuth is true)",
    "REDIS_URL": "may carry a password; Azure uses REDIS_HOST + the identity (keys disabled)",
    "POSTGRES_URL": "may carry a password; Azure uses POSTGRES_HOST/USER + an Entra token",
}

# Names that must never be outputs (they would be secrets in the azd .env file).
SECRET_NAME = re.compile(
    r"key|password|secret|connection_?string|sas|token|credential", re.IGNORECASE
)
# Properties that hold a credential.
SECRET_PROPERTIES = {
    "primarykey",
    "secondarykey",
    "primarymasterkey",
    "secondarymasterkey",
    "primaryreadonlymasterkey",
    "secondaryreadonlymasterkey",
    "primaryconnectionstring",
    "secondaryconnectionstring",
    "connectionstring",
    "connectionstrings",
    "accesskeys",
    "keys",
    "administratorloginpassword",
}


# ------------------------------------------------------------------ parse tree model


@dataclass(frozen=True)
class Expr:
    """An expression the evaluator does not fold (a parameter, a reference, ...)."""

    text: str

    def __str__(self) -> str:
        return "${" + self.text + "}"


@dataclass
class Resource:
    file: BicepFile
    symbol: str
    type: str  # full type, no api version: 'Microsoft.Web/sites/config'
    api_version: str
    existing: bool
    condition: Node | None
    loop: bool
    body: Node
    parent: Resource | None = None

    @property
    def label(self) -> str:
        return f"{self.file.name}:{self.symbol}"

    def value(self, *, assume_defaults: bool = False) -> dict[str, Any]:
        folded = self.file.evaluate(self.body, assume_defaults=assume_defaults)
        return folded if isinstance(folded, dict) else {}

    def get(self, path: str, *, assume_defaults: bool = False) -> Any:
        return dig(self.value(assume_defaults=assume_defaults), path)


@dataclass
class Module:
    file: BicepFile
    symbol: str
    path: str
    condition: Node | None
    body: Node

    def params(self) -> dict[str, Node]:
        params_node = object_member(self.body, "params")
        if params_node is None:
            return {}
        return dict(object_items(params_node))


@dataclass
class Output:
    name: str
    value: Node
    decorators: list[str]


@dataclass
class Param:
    name: str
    default: Node | None
    decorators: list[str]
    # Folded arguments of each decorator: {"minValue": [40], "allowed": [["a", "b"]]}.
    decorator_args: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class BicepFile:
    name: str
    source: str
    path: Path | None = None
    tree_root: Node = field(init=False)
    params: dict[str, Param] = field(default_factory=dict)
    variables: dict[str, Node] = field(default_factory=dict)
    resources: list[Resource] = field(default_factory=list)
    modules: list[Module] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    target_scope: str = "resourceGroup"
    # `extension <alias>` statements (aliases configured in bicepconfig.json).
    extensions: list[str] = field(default_factory=list)
    # Parameter values to evaluate with (see `bind`); wins over defaults.
    bound: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # tree-sitter-bicep 1.1 predates the `extension` statement (Bicep 0.30): an
        # alias-form one is recorded, then blanked (same length, so positions hold)
        # before parsing. Any other form is left in and still fails to parse.
        def blank(match: re.Match[str]) -> str:
            self.extensions.append(match.group(1))
            return " " * len(match.group(0))

        source = EXTENSION_STATEMENT.sub(blank, self.source)
        tree = Parser(LANGUAGE).parse(source.encode())
        self._tree = tree  # keep the tree alive while nodes are in use
        self.tree_root = tree.root_node
        for node in self.tree_root.named_children:
            self._declare(node)

    @classmethod
    def load(cls, path: Path) -> BicepFile:
        return cls(name=path.name, source=path.read_text(), path=path)

    def bind(self, **values: Any) -> BicepFile:
        """A fresh copy that evaluates the named parameters as these values."""
        return BicepFile(name=self.name, source=self.source, path=self.path, bound=values)

    # ---------------------------------------------------------------- declarations

    def _declare(self, node: Node) -> None:
        kind = node.type
        if kind == "target_scope_assignment":
            scope = self.evaluate(node.named_children[-1])
            self.target_scope = scope if isinstance(scope, str) else "?"
        elif kind == "parameter_declaration":
            children = node.named_children
            default = children[-1] if len(children) >= 3 else None
            self.params[text(children[0])] = Param(
                text(children[0]), default, decorators(node), self._decorator_args(node)
            )
        elif kind == "variable_declaration":
            children = node.named_children
            self.variables[text(children[0])] = children[-1]
        elif kind == "resource_declaration":
            self._resource(node, parent=None)
        elif kind == "module_declaration":
            children = node.named_children
            body, condition, _ = unwrap_body(children[-1])
            path = self.evaluate(children[1])
            self.modules.append(
                Module(
                    self, text(children[0]), path if isinstance(path, str) else "", condition, body
                )
            )
        elif kind == "output_declaration":
            children = node.named_children
            self.outputs.append(Output(text(children[0]), children[-1], decorators(node)))

    def _decorator_args(self, node: Node) -> dict[str, list[Any]]:
        previous = node.prev_named_sibling
        if previous is None or previous.type != "decorators":
            return {}
        folded: dict[str, list[Any]] = {}
        for decorator in previous.named_children:
            call = decorator.named_children[0] if decorator.named_children else None
            if call is not None and call.type == "call_expression":
                arguments = call.named_children[-1]
                folded[text(call.named_children[0])] = [
                    self.evaluate(arg) for arg in arguments.named_children
                ]
        return folded

    def _resource(self, node: Node, parent: Resource | None) -> None:
        children = node.named_children
        symbol = text(children[0])
        type_value = self.evaluate(children[1])
        type_string = type_value if isinstance(type_value, str) else ""
        type_name, _, api_version = type_string.partition("@")
        if parent is not None and "/" not in type_name:
            type_name = f"{parent.type}/{type_name}"
            api_version = api_version or parent.api_version
        existing = any(child.type == "existing" for child in node.children)
        body, condition, loop = unwrap_body(children[-1])
        resource = Resource(
            self, symbol, type_name, api_version, existing, condition, loop, body, parent
        )
        self.resources.append(resource)
        for item in body.named_children:
            if item.type == "object_property":
                for nested in item.named_children:
                    if nested.type == "resource_declaration":
                        self._resource(nested, parent=resource)

    # ---------------------------------------------------------------- queries

    def of_type(self, type_name: str, *, include_existing: bool = False) -> list[Resource]:
        return [
            r
            for r in self.resources
            if r.type.lower() == type_name.lower() and (include_existing or not r.existing)
        ]

    @property
    def parse_errors(self) -> list[str]:
        problems = []
        for node in walk(self.tree_root):
            if node.type == "ERROR" or node.is_missing:
                row, column = node.start_point
                snippet = text(node)[:60].replace("\n", " ")
                what = "missing" if node.is_missing else "error"
                problems.append(f"{self.name}:{row + 1}:{column + 1}: {what} near {snippet!r}")
        return problems

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, node: Node, *, assume_defaults: bool = False, depth: int = 0) -> Any:
        """Fold `node` into a Python value; what cannot be folded becomes an `Expr`."""
        if depth > 40:
            return Expr(text(node))

        def ev(child: Node) -> Any:
            return self.evaluate(child, assume_defaults=assume_defaults, depth=depth + 1)

        kind = node.type
        if kind == "string":
            return self._string(node, ev)
        if kind == "number":
            return int(text(node))
        if kind == "boolean":
            return text(node) == "true"
        if kind == "null":
            return None
        if kind == "object":
            return {key: ev(value) for key, value in object_items(node, key_eval=ev)}
        if kind == "array":
            return [ev(child) for child in node.named_children]
        if kind == "parenthesized_expression":
            return ev(node.named_children[0])
        if kind == "identifier":
            name = text(node)
            if name in self.bound:
                return self.bound[name]
            if name in self.variables:
                return ev(self.variables[name])
            param = self.params.get(name)
            if assume_defaults and param is not None and param.default is not None:
                return ev(param.default)
            return Expr(name)
        if kind == "member_expression":
            target = ev(node.child_by_field_name("object") or node.named_children[0])
            prop = node.child_by_field_name("property") or node.named_children[-1]
            if isinstance(target, dict) and text(prop) in target:
                return target[text(prop)]
            return Expr(text(node))
        if kind == "ternary_expression":
            condition, consequence, alternative = node.named_children
            decided = ev(condition)
            if isinstance(decided, bool):
                return ev(consequence if decided else alternative)
            return Expr(text(node))
        if kind == "unary_expression" and len(node.named_children) == 1:
            operand = ev(node.named_children[0])
            operator = text(node.children[0])
            if operator == "!" and isinstance(operand, bool):
                return not operand
            if operator == "-" and isinstance(operand, int) and not isinstance(operand, bool):
                return -operand
            return Expr(text(node))
        if kind == "binary_expression" and len(node.named_children) == 2:
            left, right = (ev(child) for child in node.named_children)
            operator = text(node.children[1])
            # Short-circuit on a known side, as Bicep does.
            if operator == "&&" and (left is False or right is False):
                return False
            if operator == "||" and (left is True or right is True):
                return True
            if not isinstance(left, Expr) and not isinstance(right, Expr):
                if operator == "==":
                    return left == right
                if operator == "!=":
                    return left != right
                if operator in {"&&", "||"} and isinstance(left, bool) and isinstance(right, bool):
                    return left and right if operator == "&&" else left or right
                if _is_int(left) and _is_int(right):
                    return _integer_operation(operator, left, right, text(node))
            return Expr(text(node))
        if kind == "subscript_expression" and len(node.named_children) == 2:
            target, key = (ev(child) for child in node.named_children)
            if isinstance(target, dict) and isinstance(key, str) and key in target:
                return target[key]
            if isinstance(target, list) and _is_int(key) and 0 <= key < len(target):
                return target[key]
            return Expr(text(node))
        if kind == "call_expression":
            return self._call(node, ev)
        return Expr(text(node))

    def _string(self, node: Node, ev: Callable[[Node], Any]) -> Any:
        parts: list[str] = []
        for child in node.children:
            if child.type == "string_content":
                parts.append(text(child))
            elif child.type == "escape_sequence":
                parts.append(
                    {"\\n": "\n", "\\t": "\t", "\\r": "\r"}.get(text(child), text(child)[1:])
                )
            elif child.type == "interpolation":
                value = ev(child.named_children[0])
                parts.append(str(value).lower() if isinstance(value, bool) else str(value))
        raw = text(node)
        if raw.startswith("'''"):
            return raw[3:-3]
        return "".join(parts)

    def _call(self, node: Node, ev: Callable[[Node], Any]) -> Any:
        function = node.child_by_field_name("function") or node.named_children[0]
        arguments_node = node.child_by_field_name("arguments") or node.named_children[-1]
        name = text(function)
        args = [ev(arg) for arg in arguments_node.named_children]
        if name == "loadJsonContent" and args and isinstance(args[0], str) and self.path:
            return json.loads((self.path.parent / args[0]).read_text())
        if name == "loadTextContent" and args and isinstance(args[0], str) and self.path:
            return (self.path.parent / args[0]).read_text()
        if name in {"subscriptionResourceId", "resourceId", "tenantResourceId"}:
            if all(isinstance(arg, str) for arg in args):
                return "/".join(args)
            return Expr(text(node))
        if name == "union" and args and all(isinstance(arg, list) for arg in args):
            # Arrays: the first's items, then each later one's not already in (Bicep's order).
            joined: list[Any] = []
            for item in (item for arg in args for item in arg):
                if item not in joined:
                    joined.append(item)
            return joined
        if name == "union" and args:
            merged: dict[str, Any] = {}
            for arg in args:
                if isinstance(arg, dict):
                    merged.update(arg)
            return merged
        if name in {"map", "filter"} and len(args) == 2 and isinstance(args[0], list):
            lambda_node = arguments_node.named_children[1]
            if lambda_node.type == "lambda_expression":
                results = [self._apply(lambda_node, item, ev) for item in args[0]]
                if any(isinstance(result, Expr) for result in results):
                    return Expr(text(node))
                if name == "map":
                    return results
                return [item for item, keep in zip(args[0], results, strict=True) if keep is True]
        if name == "split" and len(args) == 2 and all(isinstance(arg, str) for arg in args):
            return args[0].split(args[1])
        if (
            name == "join"
            and len(args) == 2
            and isinstance(args[0], list)
            and all(isinstance(item, str) for item in [*args[0], args[1]])
        ):
            return str(args[1]).join(args[0])
        if name in {"trim", "toLower"} and len(args) == 1 and isinstance(args[0], str):
            return args[0].strip() if name == "trim" else args[0].lower()
        if name == "string" and len(args) == 1 and isinstance(args[0], (str, int, bool)):
            return str(args[0]).lower() if isinstance(args[0], bool) else str(args[0])
        if name == "empty" and len(args) == 1 and isinstance(args[0], (str, list, dict)):
            return len(args[0]) == 0
        if name in {"min", "max"} and args and all(_is_int(arg) for arg in args):
            return min(args) if name == "min" else max(args)
        return Expr(text(node))

    def _apply(self, lambda_node: Node, item: Any, ev: Callable[[Node], Any]) -> Any:
        """A one-parameter lambda's body, its parameter bound to `item`."""
        parameter = text(lambda_node.named_children[0])
        saved = self.bound
        self.bound = {**saved, parameter: item}
        try:
            return ev(lambda_node.named_children[-1])
        finally:
            self.bound = saved


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer_operation(operator: str, left: int, right: int, source: str) -> Any:
    """Bicep's integer arithmetic and comparisons; `/` truncates toward zero, as ARM's div()."""
    if operator == "/" and right != 0:
        quotient = abs(left) // abs(right)
        return quotient if (left < 0) == (right < 0) else -quotient
    operations: dict[str, Callable[[int, int], Any]] = {
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "*": lambda a, b: a * b,
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
    }
    operation = operations.get(operator)
    return Expr(source) if operation is None else operation(left, right)


def text(node: Node) -> str:
    return node.text.decode() if node.text is not None else ""


def walk(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children:
        yield from walk(child)


def decorators(node: Node) -> list[str]:
    """Names of the decorators written just above a declaration."""
    previous = node.prev_named_sibling
    if previous is None or previous.type != "decorators":
        return []
    names = []
    for decorator in previous.named_children:
        call = decorator.named_children[0] if decorator.named_children else None
        if call is not None and call.type == "call_expression":
            names.append(text(call.named_children[0]))
        elif call is not None:
            names.append(text(call))
    return names


def unwrap_body(node: Node) -> tuple[Node, Node | None, bool]:
    """(object body, condition, is a loop) of `= {..}`, `= if (c) {..}`, `= [for ..: {..}]`."""
    condition: Node | None = None
    loop = False
    while node.type in {"if_statement", "for_statement"}:
        if node.type == "if_statement":
            condition = node.named_children[0]
            node = node.named_children[-1]
        else:
            loop = True
            node = node.child_by_field_name("body") or node.named_children[-1]
    return node, condition, loop


def object_items(
    node: Node, key_eval: Callable[[Node], Any] | None = None
) -> Iterator[tuple[str, Node]]:
    """(key, value node) of each property of an object literal (nested resources skipped)."""
    for prop in node.named_children:
        if prop.type != "object_property" or len(prop.named_children) < 2:
            continue
        key_node, value_node = prop.named_children[0], prop.named_children[-1]
        if key_node.type == "string" and key_eval is not None:
            key = key_eval(key_node)
        elif key_node.type == "string":
            key = text(key_node).strip("'")
        else:
            key = text(key_node)
        yield str(key), value_node


def object_member(node: Node, key: str) -> Node | None:
    for name, value in object_items(node):
        if name == key:
            return value
    return None


def dig(value: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def calls_and_properties(node: Node) -> tuple[set[str], set[str]]:
    """Function names called and property names read anywhere under `node`."""
    calls: set[str] = set()
    props: set[str] = set()
    for child in walk(node):
        if child.type == "call_expression":
            function = child.child_by_field_name("function") or child.named_children[0]
            if function.type == "member_expression":  # resource.listKeys()
                calls.add(text(function.named_children[-1]))
            else:
                calls.add(text(function))
        elif child.type == "property_identifier":
            props.add(text(child))
    return calls, props


def parse(source: str, name: str = "snippet.bicep", path: Path | None = None) -> BicepFile:
    return BicepFile(name=name, source=source, path=path)


@cache
def infra_files() -> tuple[BicepFile, ...]:
    return tuple(BicepFile.load(path) for path in sorted(INFRA.rglob("*.bicep")))


def infra_file(name: str) -> BicepFile:
    matches = [f for f in infra_files() if f.name == name]
    assert matches, f"infra/**/{name} not found"
    return matches[0]


def all_resources(files: tuple[BicepFile, ...] | list[BicepFile]) -> list[Resource]:
    return [r for f in files for r in f.resources]


# ------------------------------------------------------------------ checkers (problems, not asserts)


def check_parses(files: list[BicepFile] | tuple[BicepFile, ...]) -> list[str]:
    return [problem for f in files for problem in f.parse_errors]


def check_api_registration(
    files: list[BicepFile] | tuple[BicepFile, ...], config: dict[str, Any]
) -> list[str]:
    """The API's app registration: idempotent, v2 tokens, the app's roles, assignment required."""
    from support_cases.auth import ALL_ROLES

    problems = []
    apps = [r for f in files for r in f.of_type("Microsoft.Graph/applications")]
    if len(apps) != 1:
        return [f"expected one Microsoft.Graph/applications resource, found {len(apps)}"]
    app = apps[0]
    aliases = config.get("extensions") or {}
    graph = [
        a
        for a in app.file.extensions
        if str(aliases.get(a, "")).startswith(GRAPH_EXTENSION_REGISTRY)
    ]
    if not graph:
        problems.append(f"{app.file.name}: no `extension` mapped to {GRAPH_EXTENSION_REGISTRY}")
    if not app.get("uniqueName"):
        problems.append(f"{app.label}: needs uniqueName (re-provisioning must not duplicate it)")
    if app.get("api.requestedAccessTokenVersion") != 2:
        problems.append(f"{app.label}: api.requestedAccessTokenVersion must be 2")
    if app.get("signInAudience") != "AzureADMyOrg":
        problems.append(f"{app.label}: signInAudience must be AzureADMyOrg")
    roles = (
        app.file.evaluate(app.file.variables["appRoles"])
        if "appRoles" in app.file.variables
        else []
    )
    values = {role.get("value") for role in roles if isinstance(role, dict)}
    if values != set(ALL_ROLES):
        problems.append(f"{app.label}: app roles {sorted(map(str, values))} != {sorted(ALL_ROLES)}")
    declared = app.get("appRoles")
    if not (isinstance(declared, Expr) and "in appRoles" in declared.text):
        problems.append(f"{app.label}: appRoles must be declared from the appRoles variable")
    elif "'User'" not in declared.text or "'Application'" not in declared.text:
        problems.append(f"{app.label}: roles must be assignable to users and applications")
    principals = [r for f in files for r in f.of_type("Microsoft.Graph/servicePrincipals")]
    if not principals or any(sp.get("appRoleAssignmentRequired") is not True for sp in principals):
        problems.append("the API's service principal must set appRoleAssignmentRequired: true")
    return problems


def check_auth_settings(files: list[BicepFile] | tuple[BicepFile, ...]) -> list[str]:
    """Built-in authentication in front of the app: 401 without a token, health excluded."""
    configs = [
        r
        for f in files
        for r in f.of_type("Microsoft.Web/sites/config")
        if r.get("name") == "authsettingsV2"
    ]
    if len(configs) != 1:
        return [f"expected one authsettingsV2 config resource, found {len(configs)}"]
    config = configs[0]
    wanted = {
        "properties.platform.enabled": True,
        "properties.globalValidation.requireAuthentication": True,
        "properties.globalValidation.unauthenticatedClientAction": "Return401",
        "properties.globalValidation.excludedPaths": ["/api/health"],
        "properties.httpSettings.requireHttps": True,
        "properties.identityProviders.azureActiveDirectory.enabled": True,
    }
    problems = [
        f"{config.label}: {path} must be {value!r}, got {config.get(path)!r}"
        for path, value in wanted.items()
        if config.get(path) != value
    ]
    audiences = config.get(
        "properties.identityProviders.azureActiveDirectory.validation.allowedAudiences"
    )
    if not audiences:
        problems.append(f"{config.label}: allowedAudiences must name the API's client id")
    applications = config.get(
        "properties.identityProviders.azureActiveDirectory.validation"
        ".defaultAuthorizationPolicy.allowedApplications"
    )
    if not applications:
        # Otherwise a token for any client a user consented to passes, with the user's roles.
        problems.append(f"{config.label}: allowedApplications must name the accepted clients")
    issuer = config.get(
        "properties.identityProviders.azureActiveDirectory.registration.openIdIssuer"
    )
    if not str(issuer).endswith("/v2.0"):
        problems.append(f"{config.label}: openIdIssuer must be the tenant's v2.0 issuer")
    return problems


def check_storage(files: list[BicepFile] | tuple[BicepFile, ...]) -> list[str]:
    accounts = [r for f in files for r in f.of_type("Microsoft.Storage/storageAccounts")]
    if not accounts:
        return ["no Microsoft.Storage/storageAccounts resource"]
    problems = []
    for account in accounts:
        props = account.get("properties") or {}
        if props.get("allowSharedKeyAccess") is not False:
            problems.append(f"{account.label}: allowSharedKeyAccess must be false")
        if props.get("allowBlobPublicAccess") is not False:
            problems.append(f"{account.label}: allowBlobPublicAccess must be false")
        if props.get("minimumTlsVersion") != "TLS1_2":
            problems.append(f"{account.label}: minimumTlsVersion must be TLS1_2")
    return problems


def check_cosmos(
    files: list[BicepFile] | tuple[BicepFile, ...], expected_excluded_paths: list[str]
) -> list[str]:
    problems = []
    accounts = [r for f in files for r in f.of_type("Microsoft.DocumentDB/databaseAccounts")]
    if not accounts:
        problems.append("no Microsoft.DocumentDB/databaseAccounts resource")
    for account in accounts:
        if account.get("properties.disableLocalAuth") is not True:
            problems.append(f"{account.label}: disableLocalAuth must be true")
        capabilities = account.get("properties.capabilities", assume_defaults=True)
        names = [c.get("name") for c in capabilities] if isinstance(capabilities, list) else []
        if "EnableServerless" not in names:
            problems.append(f"{account.label}: not serverless with default parameters")
    containers = [
        r
        for f in files
        for r in f.of_type("Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers")
    ]
    if not containers:
        problems.append("no Cosmos SQL container resource")
    for container in containers:
        resource = container.get("properties.resource") or {}
        partition_key = resource.get("partitionKey") or {}
        if partition_key.get("paths") != ["/thread_id"]:
            problems.append(
                f"{container.label}: partition key must be ['/thread_id'], got {partition_key.get('paths')}"
            )
        if "defaultTtl" not in resource:
            problems.append(f"{container.label}: defaultTtl is not set")
        excluded = [
            p.get("path")
            for p in dig(resource, "indexingPolicy.excludedPaths") or []
            if isinstance(p, dict)
        ]
        if excluded != expected_excluded_paths:
            problems.append(
                f"{container.label}: excludedPaths {excluded} != the app's {expected_excluded_paths}"
            )
    return problems


def check_redis(files: list[BicepFile] | tuple[BicepFile, ...]) -> list[str]:
    problems = []
    caches = [r for f in files for r in f.of_type("Microsoft.Cache/redis")]
    databases = [r for f in files for r in f.of_type("Microsoft.Cache/redisEnterprise/databases")]
    if not caches and not databases:
        problems.append("no Redis resource")
    for cache_resource in caches:
        props = cache_resource.get("properties") or {}
        if (
            dig(props, "redisConfiguration") is None
            or props["redisConfiguration"].get("aad-enabled") != "true"
        ):
            problems.append(
                f"{cache_resource.label}: redisConfiguration 'aad-enabled' must be 'true'"
            )
        if props.get("disableAccessKeyAuthentication") is not True:
            problems.append(f"{cache_resource.label}: disableAccessKeyAuthentication must be true")
        if props.get("enableNonSslPort") is not False:
            problems.append(f"{cache_resource.label}: enableNonSslPort must be false")
        assignments = [
            r
            for r in cache_resource.file.of_type("Microsoft.Cache/redis/accessPolicyAssignments")
            if r.get("parent") == Expr(cache_resource.symbol)
        ]
        if not assignments:
            problems.append(f"{cache_resource.label}: no access policy assignment")
    for database in databases:
        props = database.get("properties") or {}
        if props.get("accessKeysAuthentication") != "Disabled":
            problems.append(f"{database.label}: accessKeysAuthentication must be 'Disabled'")
        if props.get("clientProtocol") != "Encrypted":
            problems.append(f"{database.label}: clientProtocol must be 'Encrypted'")
        assignments = [
            r
            for r in database.file.of_type(
                "Microsoft.Cache/redisEnterprise/databases/accessPolicyAssignments"
            )
            if r.get("parent") == Expr(database.symbol)
        ]
        if not assignments:
            problems.append(f"{database.label}: no access policy assignment")
    return problems


def check_app_insights(files: list[BicepFile] | tuple[BicepFile, ...]) -> list[str]:
    components = [r for f in files for r in f.of_type("Microsoft.Insights/components")]
    if not components:
        return ["no Microsoft.Insights/components resource"]
    problems = []
    for component in components:
        if component.get("properties.DisableLocalAuth") is not True:
            problems.append(f"{component.label}: DisableLocalAuth must be true")
        if component.get("properties.WorkspaceResourceId") is None:
            problems.append(f"{component.label}: not workspace-based (no WorkspaceResourceId)")
    return problems


def check_postgres(files: list[BicepFile] | tuple[BicepFile, ...]) -> list[str]:
    problems = []
    for server in [
        r for f in files for r in f.of_type("Microsoft.DBforPostgreSQL/flexibleServers")
    ]:
        props = server.get("properties") or {}
        auth = props.get("authConfig") or {}
        if auth.get("activeDirectoryAuth") != "Enabled":
            problems.append(f"{server.label}: authConfig.activeDirectoryAuth must be 'Enabled'")
        if auth.get("passwordAuth") != "Disabled":
            problems.append(f"{server.label}: authConfig.passwordAuth must be 'Disabled'")
        if "administratorLoginPassword" in props:
            problems.append(f"{server.label}: has an administrator password")
    return problems


def check_outputs(files: list[BicepFile] | tuple[BicepFile, ...]) -> list[str]:
    """No output is (or is named like, or is computed from) a secret."""
    problems = []
    for f in files:
        for output in f.outputs:
            where = f"{f.name}: output {output.name}"
            if SECRET_NAME.search(output.name) or output.name in ABSENT_IN_AZURE:
                problems.append(f"{where}: named like a secret")
            if "secure" in output.decorators:
                problems.append(f"{where}: @secure() output")
            calls, props = calls_and_properties(output.value)
            listing = sorted(c for c in calls if c.lower().startswith("list"))
            if listing:
                problems.append(f"{where}: calls {', '.join(listing)}")
            secret_props = sorted(p for p in props if p.lower() in SECRET_PROPERTIES)
            if secret_props:
                problems.append(f"{where}: reads {', '.join(secret_props)}")
    return problems


def check_role_assignments(
    files: list[BicepFile] | tuple[BicepFile, ...], expected: dict[tuple[str, str], str]
) -> list[str]:
    """Every Azure RBAC / Cosmos data-plane assignment grants exactly its intended role."""
    problems = []
    seen = set()
    types = (
        "Microsoft.Authorization/roleAssignments",
        "Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments",
    )
    for resource in all_resources(files):
        if resource.existing or resource.type not in types:
            continue
        key = (resource.file.name, resource.symbol)
        seen.add(key)
        if key not in expected:
            problems.append(
                f"{resource.label}: role assignment without an expected role in the test"
            )
            continue
        role = resource.get("properties.roleDefinitionId")
        role_text = str(role)
        guids = GUID.findall(role_text)
        if not guids or not role_text.endswith(guids[-1]) or guids[-1].lower() != expected[key]:
            problems.append(
                f"{resource.label}: grants {role_text!r}, expected role {expected[key]}"
            )
        if resource.type.endswith("sqlRoleAssignments") and "/sqlRoleDefinitions/" not in role_text:
            problems.append(f"{resource.label}: not a Cosmos SQL role definition id")
        if (
            resource.type == types[0]
            and "Microsoft.Authorization/roleDefinitions/" not in role_text
        ):
            problems.append(f"{resource.label}: not a built-in role definition id")
        if not resource.get("properties.principalId"):
            problems.append(f"{resource.label}: no principalId")
    for key in sorted(set(expected) - seen):
        problems.append(f"{key[0]}:{key[1]}: expected role assignment is missing")
    return problems


def check_redis_access(
    files: list[BicepFile] | tuple[BicepFile, ...], expected: dict[tuple[str, str], str]
) -> list[str]:
    problems = []
    seen = set()
    types = (
        "Microsoft.Cache/redis/accessPolicyAssignments",
        "Microsoft.Cache/redisEnterprise/databases/accessPolicyAssignments",
    )
    for resource in all_resources(files):
        if resource.existing or resource.type not in types:
            continue
        key = (resource.file.name, resource.symbol)
        seen.add(key)
        policy = resource.get("properties.accessPolicyName")
        if key not in expected:
            problems.append(f"{resource.label}: access policy assignment not expected by the test")
        elif policy != expected[key]:
            problems.append(f"{resource.label}: grants {policy!r}, expected {expected[key]!r}")
        object_id = resource.get("properties.objectId") or resource.get("properties.user.objectId")
        if not object_id:
            problems.append(f"{resource.label}: no object id")
    for key in sorted(set(expected) - seen):
        problems.append(f"{key[0]}:{key[1]}: expected access policy assignment is missing")
    return problems


def check_function_app(
    files: list[BicepFile] | tuple[BicepFile, ...], service_name: str
) -> list[str]:
    problems = []
    plans = [r for f in files for r in f.of_type("Microsoft.Web/serverfarms")]
    if not any(
        p.get("sku.name") == "FC1" and p.get("sku.tier") == "FlexConsumption" for p in plans
    ):
        problems.append("no Flex Consumption (FC1) plan")
    sites = [r for f in files for r in f.of_type("Microsoft.Web/sites")]
    if not sites:
        problems.append("no Microsoft.Web/sites resource")
    for site in sites:
        value = site.value(assume_defaults=True)
        if "functionapp" not in str(value.get("kind")):
            problems.append(f"{site.label}: kind is not a function app")
        if dig(value, "identity.type") != "UserAssigned":
            problems.append(f"{site.label}: identity must be UserAssigned")
        runtime = dig(value, "properties.functionAppConfig.runtime") or {}
        if runtime.get("name") != "python" or runtime.get("version") not in {"3.11", "3.12"}:
            problems.append(f"{site.label}: runtime must be python 3.11/3.12, got {runtime}")
        storage = dig(value, "properties.functionAppConfig.deployment.storage") or {}
        if storage.get("type") != "blobContainer":
            problems.append(f"{site.label}: deployment storage must be a blob container")
        if dig(storage, "authentication.type") != "UserAssignedIdentity":
            problems.append(f"{site.label}: deployment storage must be reached by the identity")
        if (value.get("tags") or {}).get("azd-service-name") != service_name:
            problems.append(f"{site.label}: tag azd-service-name must be {service_name!r}")
        if dig(value, "properties.httpsOnly") is not True:
            problems.append(f"{site.label}: httpsOnly must be true")
    return problems


def check_basic_publishing(files: list[BicepFile] | tuple[BicepFile, ...]) -> list[str]:
    """Every site turns off the user name / password publishing of both its endpoints."""
    policies = [
        r
        for f in files
        for r in f.of_type("Microsoft.Web/sites/basicPublishingCredentialsPolicies")
    ]
    problems = []
    for endpoint in ("scm", "ftp"):
        found = [p for p in policies if p.get("name") == endpoint]
        if not found:
            problems.append(f"no basicPublishingCredentialsPolicies {endpoint!r}")
        problems.extend(
            f"{p.label}: {endpoint} basic publishing must be off (allow: false)"
            for p in found
            if p.get("properties.allow") is not False
        )
    return problems


# Every site's transport settings (Microsoft.Web/sites siteConfig): TLS 1.2 at least on
# the app and on its Kudu (scm) endpoint, and the FTP/FTPS server off.
SITE_TRANSPORT = {"minTlsVersion": "1.2", "scmMinTlsVersion": "1.2", "ftpsState": "Disabled"}


def check_site_transport(files: list[BicepFile] | tuple[BicepFile, ...]) -> list[str]:
    problems = []
    for f in files:
        for site in f.of_type("Microsoft.Web/sites"):
            config = site.get("properties.siteConfig", assume_defaults=True) or {}
            problems.extend(
                f"{site.label}: siteConfig.{name} is {config.get(name)!r}, not {wanted!r}"
                for name, wanted in SITE_TRANSPORT.items()
                if config.get(name) != wanted
            )
    return problems


def app_settings_resource(files: list[BicepFile] | tuple[BicepFile, ...]) -> Resource:
    matches = [
        r
        for f in files
        for r in f.of_type("Microsoft.Web/sites/config")
        if r.get("name") == "appsettings"
    ]
    assert len(matches) == 1, f"expected one appsettings config resource, found {len(matches)}"
    return matches[0]


def check_app_settings(files: list[BicepFile] | tuple[BicepFile, ...]) -> list[str]:
    """Values of the Function App settings: identity everywhere, no key anywhere."""
    resource = app_settings_resource(files)
    settings = resource.get("properties") or {}
    problems = []
    expect_literal = {
        "COSMOS_CREATE_IF_MISSING": "false",
        "REDIS_SSL": "true",
        "AzureWebJobsStorage__credential": "managedidentity",
    }
    for name, wanted in expect_literal.items():
        if settings.get(name) != wanted:
            problems.append(f"{name} must be {wanted!r}, got {settings.get(name)!r}")
    for name in ("AZURE_CLIENT_ID", "AzureWebJobsStorage__clientId"):
        if settings.get(name) != Expr("identityClientId"):
            problems.append(f"{name} must be the user-assigned identity's client id")
    if "Authorization=AAD" not in str(settings.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING")):
        problems.append("APPLICATIONINSIGHTS_AUTHENTICATION_STRING must use Authorization=AAD")
    if not isinstance(settings.get("STATE_COLD_BACKEND"), Expr):
        problems.append("STATE_COLD_BACKEND must come from a parameter")
    properties_node = object_member(resource.body, "properties")
    assert properties_node is not None
    for name, value_node in object_items(properties_node):
        calls, props = calls_and_properties(value_node)
        if any(c.lower().startswith("list") for c in calls):
            problems.append(f"app setting {name} calls a list*() function")
        if props & {"primaryKey", "secondaryKey", "primaryMasterKey", "accessKeys", "keys"}:
            problems.append(f"app setting {name} reads a key")
    return problems


def check_modules(files: list[BicepFile] | tuple[BicepFile, ...]) -> list[str]:
    """Each module call points at a file and passes exactly parameters it declares."""
    problems = []
    for f in files:
        assert f.path is not None
        for module in f.modules:
            target = (f.path.parent / module.path).resolve()
            if not target.is_file():
                problems.append(f"{f.name}: module {module.symbol} -> missing {module.path}")
                continue
            declared = BicepFile.load(target).params
            passed = set(module.params())
            for unknown in sorted(passed - set(declared)):
                problems.append(f"{f.name}: module {module.symbol} passes unknown param {unknown}")
            required = {name for name, p in declared.items() if p.default is None}
            for missing in sorted(required - passed):
                problems.append(f"{f.name}: module {module.symbol} misses required param {missing}")
        for node in walk(f.tree_root):
            if node.type == "call_expression" and text(node.named_children[0]) in {
                "loadJsonContent",
                "loadTextContent",
            }:
                relative = f.evaluate(node.named_children[-1].named_children[0])
                if not (f.path.parent / str(relative)).is_file():
                    problems.append(f"{f.name}: loadJsonContent({relative}) not found")
    return problems


# ------------------------------------------------------------------ helpers for settings parity


def app_setting_names() -> set[str]:
    """What the app reads: `AppSettings` field names upper-cased (env var names)."""
    return {name.upper() for name in AppSettings.model_fields}


def sample_values() -> dict[str, Any]:
    return json.loads(SAMPLE.read_text())["Values"]


def bicep_app_setting_names() -> set[str]:
    return set(app_settings_resource(infra_files()).get("properties") or {})


def load_script(name: str) -> ModuleType:
    path = REPO / "scripts" / "azd" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"azd_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cosmos_excluded_paths() -> list[str]:
    from state.cold.cosmos_client import INDEXING_POLICY

    return [entry["path"] for entry in INDEXING_POLICY["excludedPaths"]]


def azure_yaml() -> dict[str, Any]:
    loaded = yaml.safe_load(AZURE_YAML.read_text())
    assert isinstance(loaded, dict)
    return loaded


# ================================================================== tests: the real infra


def test_every_bicep_file_parses_without_error_nodes() -> None:
    files = infra_files()
    names = {f.name for f in files}
    assert {"main.bicep", "function-app.bicep", "cosmos.bicep", "redis.bicep"} <= names
    assert check_parses(files) == []


def test_main_is_subscription_scoped_with_resource_group_token_and_abbreviations() -> None:
    main = infra_file("main.bicep")
    assert main.target_scope == "subscription"
    assert main.of_type("Microsoft.Resources/resourceGroups"), "no resource group"
    token = main.variables.get("resourceToken")
    assert token is not None and "uniqueString" in {
        text(n) for n in walk(token) if n.type == "identifier"
    }
    abbreviations = main.evaluate(main.variables["abbrs"])
    assert isinstance(abbreviations, dict) and abbreviations, "abbreviations.json not loaded"
    module_files = {Path(m.path).name for m in main.modules}
    assert {
        "identity.bicep",
        "monitoring.bicep",
        "storage.bicep",
        "cosmos.bicep",
        "redis.bicep",
        "postgres.bicep",
        "function-app.bicep",
    } <= module_files
    postgres = [m for m in main.modules if Path(m.path).name == "postgres.bicep"]
    assert postgres[0].condition is not None, "Postgres must be deployed only when selected"


def test_modules_resolve_and_pass_declared_params() -> None:
    assert check_modules(infra_files()) == []


def test_parameters_file_matches_main_params() -> None:
    main = infra_file("main.bicep")
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert set(parameters) <= set(main.params), set(parameters) - set(main.params)
    required = {name for name, p in main.params.items() if p.default is None}
    assert required <= set(parameters)
    assert parameters["environmentName"]["value"] == "${AZURE_ENV_NAME}"
    assert parameters["location"]["value"] == "${AZURE_LOCATION}"
    assert parameters["principalId"]["value"] == "${AZURE_PRINCIPAL_ID}"


def test_an_output_of_a_parameter_is_read_back_from_its_azd_variable() -> None:
    """azd keeps every output as an environment variable: one that only echoes a
    parameter must also feed it (main.parameters.json), or `azd env set NAME` shows a
    value the next provision ignores and overwrites (CASE_MAX_RUNS, STATE_HOT_TTL_SECONDS
    were output, never read)."""
    main = infra_file("main.bicep")
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    for output in main.outputs:
        param = text(output.value)
        if param not in main.params:
            continue
        value = parameters.get(param, {}).get("value", "")
        assert value == "${" + output.name + "}" or value.startswith("${" + output.name + "="), (
            f"output {output.name} = {param}, read back from {value!r}"
        )


AZD_REFERENCE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?:=([^}]*))?\}")


def azd_bound_main(env: dict[str, str]) -> BicepFile:
    """main.bicep bound to the parameters `azd provision` gives it from this azd
    environment: main.parameters.json's `${NAME}` / `${NAME=default}` substituted, as
    azd does, then read as the parameter's type (a number or a bool as such)."""
    main = infra_file("main.bicep")
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    values: dict[str, Any] = {}
    for name, entry in parameters.items():
        written = AZD_REFERENCE.sub(
            lambda match: env.get(match.group(1)) or (match.group(2) or ""), entry["value"]
        )
        if written == "":
            continue  # empty: the parameter's own default
        if re.fullmatch(r"-?[0-9]+", written):
            values[name] = int(written)
        elif written in ("true", "false"):
            values[name] = written == "true"
        else:
            values[name] = written
    for name, value in values.items():
        bounds = main.params[name].decorator_args
        low, high = bounds.get("minValue", [None])[0], bounds.get("maxValue", [None])[0]
        # A value outside a parameter's bounds fails the provision before anything deploys.
        assert low is None or value >= low, f"{name}={value} is below @minValue({low})"
        assert high is None or value <= high, f"{name}={value} is above @maxValue({high})"
    return main.bind(**values)


@pytest.mark.parametrize(
    ("variable", "chosen"),
    [
        ("STATE_COLD_TTL_SECONDS", 2592000),
        ("STATE_COLD_TTL_SECONDS", -1),
        ("STATE_HOT_TTL_SECONDS", 3600),
        ("CASE_MAX_RUNS", 8),
    ],
)
def test_an_app_setting_set_in_the_azd_environment_reaches_the_app(
    variable: str, chosen: int
) -> None:
    """`azd env get-values` lists the app settings the deployment chose; `azd env set` of
    one of them, then `azd provision`, must deploy it, and the output read back again
    (the next provision starts from the outputs of the last). STATE_COLD_TTL_SECONDS
    came from two parameters no azd variable fed (stateColdKeepForever,
    stateColdTtlSeconds): set in the environment, it was ignored, the app kept every
    thread forever and the provision wrote -1 back over the operator's retention."""
    main = azd_bound_main({variable: str(chosen)})
    outputs = {o.name: o.value for o in main.outputs}
    # Parameters azd leaves unset take their defaults, as in ARM.
    assert main.evaluate(outputs[variable], assume_defaults=True) == chosen
    module = next(m for m in main.modules if m.path.endswith("function-app.bicep"))
    setting = {
        "STATE_COLD_TTL_SECONDS": "stateColdTtlSeconds",
        "STATE_HOT_TTL_SECONDS": "stateHotTtlSeconds",
        "CASE_MAX_RUNS": "caseMaxRuns",
    }[variable]
    assert main.evaluate(module.params()[setting], assume_defaults=True) == chosen


def test_an_unset_azd_environment_deploys_the_app_defaults() -> None:
    main = azd_bound_main({})
    outputs = {o.name: o.value for o in main.outputs}
    for variable, field_name in (
        ("STATE_COLD_TTL_SECONDS", "state_cold_ttl_seconds"),
        ("STATE_HOT_TTL_SECONDS", "state_hot_ttl_seconds"),
        ("CASE_MAX_RUNS", "case_max_runs"),
    ):
        value = main.evaluate(outputs[variable], assume_defaults=True)
        assert value == AppSettings.model_fields[field_name].default


def test_storage_has_no_shared_key_access() -> None:
    assert check_storage(infra_files()) == []


def test_cosmos_is_identity_only_serverless_and_partitioned_by_thread() -> None:
    assert check_cosmos(infra_files(), cosmos_excluded_paths()) == []


def test_cosmos_container_ttl_and_names_follow_the_app_settings() -> None:
    cosmos = infra_file("cosmos.bicep")
    container = cosmos.of_type("Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers")[0]
    # TTL on, nothing expires by itself: the app sweeps whole threads (per-thread retention).
    assert container.get("properties.resource.defaultTtl") == -1
    main = infra_file("main.bicep")
    assert (
        main.evaluate(main.variables["stateColdTtl"], assume_defaults=True)
        == AppSettings.model_fields["state_cold_ttl_seconds"].default
    )
    assert (
        main.evaluate(main.variables["cosmosDatabaseName"])
        == AppSettings.model_fields["cosmos_database"].default
    )
    assert (
        main.evaluate(main.variables["cosmosContainerName"])
        == AppSettings.model_fields["cosmos_container"].default
    )
    assert (
        main.evaluate(main.variables["postgresDatabaseName"])
        == AppSettings.model_fields["postgres_database"].default
    )


def test_cosmos_data_plane_roles_are_scoped_to_the_app_database() -> None:
    # Account scope would also grant every other database in the account (and any
    # created later); the Cosmos RBAC scope form for one database is <account id>/dbs/<name>.
    cosmos = infra_file("cosmos.bicep").bind(databaseName="agentstate")
    assignments = cosmos.of_type("Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments")
    assert {r.symbol for r in assignments} == {"appDataContributor", "developerDataContributor"}
    for assignment in assignments:
        scope = assignment.get("properties.scope")
        assert str(scope) == "${account.id}/dbs/agentstate", assignment.label


def test_redis_uses_entra_auth_and_access_policies() -> None:
    assert check_redis(infra_files()) == []
    assert check_redis_access(infra_files(), EXPECTED_REDIS_ACCESS) == []


def test_app_insights_local_auth_disabled() -> None:
    assert check_app_insights(infra_files()) == []


def test_postgres_is_entra_only() -> None:
    assert infra_file("postgres.bicep").of_type("Microsoft.DBforPostgreSQL/flexibleServers")
    assert check_postgres(infra_files()) == []


def test_no_secret_in_outputs() -> None:
    assert check_outputs(infra_files()) == []


def test_roles_json_holds_the_verified_role_ids() -> None:
    roles = json.loads((INFRA / "roles.json").read_text())
    assert roles["azure"] == {
        key: ROLE_IDS[key]
        for key in (
            "storageBlobDataOwner",
            "storageTableDataContributor",
            "monitoringMetricsPublisher",
        )
    }
    assert roles["cosmosSql"] == {
        "builtInDataContributor": ROLE_IDS["cosmosBuiltInDataContributor"]
    }
    assert set(roles["redisAccessPolicies"].values()) == set(EXPECTED_REDIS_ACCESS.values())


def test_each_role_assignment_grants_its_intended_role() -> None:
    assert check_role_assignments(infra_files(), EXPECTED_ROLE_ASSIGNMENTS) == []


# What the Functions host keeps in AzureWebJobsStorage, and the built-in roles that
# covers ("Connecting to host storage with an identity", Azure Functions docs): the host
# alone needs Storage Blob Data Owner (coordination, key store, containers it creates) and
# Storage Table Data Contributor for its diagnostic events; a timer's locks are blobs.
HOST_STORAGE_ROLES = {"storageBlobDataOwner", "storageTableDataContributor"}
# Roles each trigger or binding decorator of function_app.py adds to the host's.
BINDING_STORAGE_ROLES: dict[str, set[str]] = {
    "timer_trigger": set(),
    "queue_trigger": {"storageQueueDataContributor"},
    "queue_output": {"storageQueueDataContributor"},
    # The blob trigger keeps receipts in blobs and poison blobs in a queue.
    "blob_trigger": {"storageQueueDataContributor", "storageAccountContributor"},
    "durable_client_input": {"storageQueueDataContributor"},
}


def _binding_decorators() -> set[str]:
    """Trigger and binding decorators (`@app.timer_trigger(...)`) of the Functions entry."""
    tree = ast.parse((REPO / "function_app" / "function_app.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                call = decorator.func if isinstance(decorator, ast.Call) else decorator
                if isinstance(call, ast.Attribute) and re.search(
                    r"_(trigger|input|output)$", call.attr
                ):
                    found.add(call.attr)
    return found


def test_the_app_identity_gets_only_the_storage_roles_the_host_uses() -> None:
    """Queue Data Contributor was granted for nothing: no trigger or binding of this app
    uses queues, so the identity could read and write every queue of the account."""
    decorators = _binding_decorators()
    unknown = decorators - set(BINDING_STORAGE_ROLES)
    assert not unknown, f"add the host storage roles of {sorted(unknown)}"
    needed = HOST_STORAGE_ROLES.union(*(BINDING_STORAGE_ROLES[d] for d in decorators))
    by_id = {role_id: key for key, role_id in ROLE_IDS.items()}
    storage = infra_file("storage.bicep")
    granted = set()
    for assignment in storage.of_type("Microsoft.Authorization/roleAssignments"):
        role = str(assignment.get("properties.roleDefinitionId"))
        guids = GUID.findall(role)
        granted.add(by_id.get(guids[-1].lower(), role) if guids else role)
        # The account: the host creates its own containers and diagnostics tables.
        assert assignment.get("scope") == Expr("storage"), assignment.label
        assert assignment.get("properties.principalId") == Expr("identityPrincipalId")
    assert granted == needed, f"granted {sorted(granted)}, the host uses {sorted(needed)}"


# Settings tied to the Function App's own identity and resources, not for a local run;
# APPLICATIONINSIGHTS_CONNECTION_STRING is also named like a secret (no such output).
APP_ONLY_SETTINGS = {
    "AzureWebJobsStorage__accountName",
    "AzureWebJobsStorage__clientId",
    "AZURE_CLIENT_ID",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
}
# A bare name in a setting's expression: not a property (`.x`), not a function (`f(`).
BARE_NAME = re.compile(r"(?<![.\w])([A-Za-z_]\w*)\b(?!\s*\()")


def chosen_app_settings(files: list[BicepFile] | tuple[BicepFile, ...]) -> dict[str, str]:
    """App settings the deployment chooses (an expression, not a literal): name -> source."""
    settings = app_settings_resource(files).get("properties") or {}
    return {
        name: value.text
        for name, value in settings.items()
        if isinstance(value, Expr) and name not in APP_ONLY_SETTINGS
    }


def check_outputs_match_app_settings(
    main: BicepFile, function_app: BicepFile, chosen: dict[str, str]
) -> list[str]:
    """Each chosen setting is a main.bicep output whose expression is the setting's, each
    module parameter replaced by what main passes it."""
    module = next(m for m in main.modules if m.path.endswith(function_app.name))
    passed = {name: text(node) for name, node in module.params().items()}
    outputs = {o.name: text(o.value) for o in main.outputs}

    def in_main(match: re.Match[str]) -> str:
        name = match.group(1)
        # A name main does not pass is the module's own (a parameter's default, a
        # variable): same-named in main or not, the app does not get main's value.
        return passed.get(name, f"<{function_app.name}'s own {name}>")

    problems = []
    for name, expression in chosen.items():
        if name not in outputs:
            problems.append(f"app setting {name} is not a main.bicep output")
            continue
        unwrapped = re.fullmatch(r"string\((.*)\)", expression)
        expected = BARE_NAME.sub(in_main, unwrapped.group(1) if unwrapped else expression)
        if outputs[name] != expected:
            problems.append(f"output {name} = {outputs[name]}, the app gets {expected}")
    return problems


def test_every_app_setting_the_deployment_chooses_is_an_output() -> None:
    """README: `azd env get-values` shows what the deployment chose, and the postprovision
    hook gives a local run the same values. STATE_HOT_TTL_SECONDS (parameter
    stateHotTtlSeconds) and the computed POSTGRES_POOL_MAX_SIZE were set on the app but
    never output, so neither could be read back, and a local run used the sample's."""
    chosen = chosen_app_settings(infra_files())
    main, function_app = infra_file("main.bicep"), infra_file("function-app.bicep")
    assert check_outputs_match_app_settings(main, function_app, chosen) == []
    assert {"STATE_HOT_TTL_SECONDS", "CASE_MAX_RUNS", "POSTGRES_POOL_MAX_SIZE"} <= set(chosen)
    local_settings = load_script("local_settings")
    assert set(chosen) <= set(local_settings.FROM_AZURE), set(chosen) - set(
        local_settings.FROM_AZURE
    )


def test_an_output_of_a_parameter_main_does_not_pass_is_refused() -> None:
    """main.bicep without `stateHotTtlSeconds: stateHotTtlSeconds` in the module's params
    deploys the module's default (86400) whatever the parameter says, while the output
    STATE_HOT_TTL_SECONDS = stateHotTtlSeconds reports the parameter: same text, another
    value."""
    main, function_app = infra_file("main.bicep"), infra_file("function-app.bicep")
    chosen = chosen_app_settings(infra_files())
    line = "    stateHotTtlSeconds: stateHotTtlSeconds\n"
    assert line in main.source
    broken = parse(main.source.replace(line, ""), name="main.bicep")
    assert check_outputs_match_app_settings(broken, function_app, chosen) == [
        "output STATE_HOT_TTL_SECONDS = stateHotTtlSeconds, the app gets"
        " <function-app.bicep's own stateHotTtlSeconds>"
    ]


def test_function_app_is_flex_consumption_with_identity() -> None:
    service_name = next(iter(azure_yaml()["services"]))
    assert check_function_app(infra_files(), service_name) == []


def test_function_app_publishes_with_entra_tokens_only() -> None:
    assert check_basic_publishing(infra_files()) == []


def test_function_app_takes_tls_1_2_only_and_runs_no_ftp() -> None:
    assert check_site_transport(infra_files()) == []


def test_function_app_settings_use_identities_not_keys() -> None:
    assert check_app_settings(infra_files()) == []


# ---------------------------------------------------------------- settings parity


def test_settings_parity_sample_has_every_setting_the_app_reads() -> None:
    assert set(sample_values()) == app_setting_names() | LOCAL_HOST_SETTINGS


def test_settings_parity_bicep_has_every_setting_except_identity_replaced_secrets() -> None:
    assert set(ABSENT_IN_AZURE) <= app_setting_names(), "stale exception list"
    expected = (app_setting_names() - set(ABSENT_IN_AZURE)) | AZURE_HOST_SETTINGS
    bicep = bicep_app_setting_names()
    assert bicep - expected == set(), "in Bicep but not read by the app"
    assert expected - bicep == set(), "read by the app but not set in Bicep"


def test_settings_with_an_identity_alternative_are_not_in_bicep() -> None:
    assert bicep_app_setting_names() & set(ABSENT_IN_AZURE) == set()
    outputs = {o.name for f in infra_files() for o in f.outputs}
    assert outputs & set(ABSENT_IN_AZURE) == set()


def test_bicep_literal_app_settings_equal_the_app_defaults() -> None:
    """Tunables written as literals in Bicep keep the defaults of the settings classes."""
    settings = app_settings_resource(infra_files()).get("properties") or {}
    checked = 0
    for name, field_info in AppSettings.model_fields.items():
        value = settings.get(name.upper())
        if not isinstance(value, str) or field_info.default is None:
            continue
        default = field_info.default
        if isinstance(default, bool):
            continue  # the deployment sets its own (COSMOS_CREATE_IF_MISSING, REDIS_SSL)
        if isinstance(default, (int, float)):
            assert float(value) == float(default), name
            checked += 1
        elif isinstance(default, str):
            assert value == str(default), name
            checked += 1
        elif isinstance(default, tuple):
            assert value == ",".join(default), name
            checked += 1
    assert checked >= 6


def test_bicep_app_settings_parse_as_the_app_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """With deployment-time values in place of the expressions, AppSettings accepts Azure's values."""
    deployed = {
        "storage.name": "stabc",
        "identityClientId": "11111111-1111-1111-1111-111111111111",
        "applicationInsights.properties.ConnectionString": (
            "InstrumentationKey=33333333-3333-3333-3333-333333333333;IngestionEndpoint=https://x/"
        ),
        "stateColdBackend": "cosmos",
        "cosmosEndpoint": "https://cosmos-abc.documents.azure.com:443/",
        "cosmosDatabase": "agentstate",
        "cosmosContainer": "state",
        "postgresHost": "",
        "postgresDatabase": "agentstate",
        "postgresUser": "",
        "string(postgresPoolMaxSize)": "10",
        "redisHost": "redis-abc.redis.cache.windows.net",
        "string(redisPort)": "6380",
        "string(stateHotTtlSeconds)": "86400",
        "string(caseMaxRuns)": "32",
        "string(stateColdTtlSeconds)": "-1",
        "tenant().tenantId": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "authClientId": "22222222-2222-2222-2222-222222222222",
        "corsAllowedOrigins": "https://portal.contoso.com,https://support.contoso.com",
        "join(authAllowedClientIds, ',')": f"{AZURE_CLI_CLIENT_ID},{DAEMON_CLIENT_ID}",
    }
    settings_values = app_settings_resource(infra_files()).get("properties") or {}
    for name in app_setting_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in settings_values.items():
        if isinstance(value, Expr):
            assert value.text in deployed, f"{name}: no deployment-time value for {value.text}"
            value = deployed[value.text]
        assert isinstance(value, str), name
        monkeypatch.setenv(name, value.replace("${identityClientId}", deployed["identityClientId"]))
    settings = AppSettings()
    assert settings.cosmos_key is None and settings.redis_url is None
    assert settings.postgres_url is None
    assert settings.cosmos_create_if_missing is False
    assert settings.hot_tier_configured and settings.redis_ssl
    assert settings.azure_client_id == deployed["identityClientId"]
    assert not settings.auth_disabled and settings.auth_audience == deployed["authClientId"]
    assert settings.auth_issuer_url == (
        f"https://login.microsoftonline.com/{deployed['tenant().tenantId']}/v2.0"
    )
    assert not settings.cosmos_is_local_emulator
    assert settings.auth_allowed_client_ids == (AZURE_CLI_CLIENT_ID, DAEMON_CLIENT_ID)


def test_sample_values_run_the_app_against_the_local_stack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from devstack import COSMOS_EMULATOR_KEY
    from devstack.stack import DEFAULT_PORTS

    values = sample_values()
    assert all(isinstance(v, str) for v in values.values()), "Values must be strings"
    for name in app_setting_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = AppSettings()
    assert settings.cosmos_is_local_emulator
    assert settings.cosmos_endpoint == f"https://127.0.0.1:{DEFAULT_PORTS['cosmos']}/"
    assert settings.cosmos_key is not None
    assert settings.cosmos_key.get_secret_value() == COSMOS_EMULATOR_KEY
    assert settings.cosmos_create_if_missing is True
    assert settings.hot_tier_configured
    assert settings.redis_url is not None
    assert f"127.0.0.1:{DEFAULT_PORTS['redis']}" in settings.redis_url.get_secret_value()
    assert settings.postgres_url is not None
    assert f"127.0.0.1:{DEFAULT_PORTS['postgres']}" in settings.postgres_url.get_secret_value()
    assert not settings.azure_client_id
    assert not settings.applicationinsights_connection_string
    assert settings.state_hot_ttl_seconds > 0


# ---------------------------------------------------------------- azure.yaml, hooks, packaging


def test_azure_yaml_parses_and_points_at_existing_folders() -> None:
    config = azure_yaml()
    assert config["name"]
    services = config["services"]
    assert list(services) == ["api"]
    api = services["api"]
    assert api["project"] == "./function_app"
    assert api["language"] == "python"
    assert api["host"] == "function"
    project = REPO / api["project"]
    assert project.is_dir()
    assert (project / "requirements.txt").is_file()
    infra = REPO / config.get("infra", {}).get("path", "infra")
    assert (infra / f"{config.get('infra', {}).get('module', 'main')}.bicep").is_file()
    assert (infra / "main.parameters.json").is_file()


def _hook_scripts(hooks: dict[str, Any], base: Path) -> Iterator[tuple[str, Path]]:
    for event, hook in hooks.items():
        posix = hook.get("posix", hook)
        run = posix["run"]
        assert posix.get("shell") == "sh", event
        yield event, (base / run).resolve()


def test_azure_yaml_hooks_exist_and_are_executable() -> None:
    config = azure_yaml()
    service = config["services"]["api"]
    service_dir = REPO / service["project"]
    scripts = dict(_hook_scripts(service["hooks"], service_dir))
    scripts.update({f"project {k}": v for k, v in _hook_scripts(config["hooks"], REPO)})
    assert {
        "prepackage",
        "postpackage",
        "project preprovision",
        "project postprovision",
    } <= set(scripts)
    for event, script in scripts.items():
        assert script.is_file(), f"{event}: {script} missing"
        assert script.stat().st_mode & stat.S_IXUSR, f"{event}: {script} not executable"
    assert scripts["prepackage"].name == "prepackage.sh"


def test_prepackage_hook_vendors_the_state_package(tmp_path: Path) -> None:
    project = tmp_path / "function_app"
    project.mkdir()
    (project / "requirements.txt").write_text("pydantic==2.0\n")
    (project / "state").mkdir()
    (project / "state" / "stale.py").write_text("# left over from an older package\n")
    subprocess.run(
        ["sh", str(REPO / "scripts/azd/prepackage.sh"), "--project-dir", str(project)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    vendored = project / "state"
    expected = {p.relative_to(REPO / "state") for p in (REPO / "state").rglob("*.py")}
    assert {p.relative_to(vendored) for p in vendored.rglob("*.py")} == expected
    assert not (vendored / "stale.py").exists()
    assert not list(vendored.rglob("__pycache__"))
    subprocess.run(
        ["sh", str(REPO / "scripts/azd/postpackage.sh"), "--project-dir", str(project)],
        check=True,
        capture_output=True,
    )
    assert not vendored.exists()


def test_prepackage_refuses_a_project_without_requirements(tmp_path: Path) -> None:
    package_state = load_script("package_state")
    with pytest.raises(package_state.PackagingError, match=r"requirements\.txt"):
        package_state.copy_state(project_dir=tmp_path)


def test_funcignore_keeps_state_and_drops_local_settings() -> None:
    lines = {
        line.strip()
        for line in (REPO / "function_app" / ".funcignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert "local.settings.json" in lines
    assert not any(line.strip("/") in {"state", "state/*", "*"} for line in lines)


def test_postprovision_writes_local_settings_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_settings = load_script("local_settings")
    azd_values = {
        "STATE_COLD_BACKEND": "cosmos",
        "COSMOS_ENDPOINT": "https://cosmos-abc.documents.azure.com:443/",
        "COSMOS_DATABASE": "agentstate",
        "COSMOS_CONTAINER": "state",
        "REDIS_HOST": "redis-abc.redis.cache.windows.net",
        "REDIS_PORT": "6380",
        "REDIS_SSL": "true",
        "POSTGRES_HOST": "",
        "POSTGRES_DATABASE": "agentstate",
        "POSTGRES_USER": "",
        "AZURE_FUNCTION_IDENTITY_CLIENT_ID": "11111111-1111-1111-1111-111111111111",
        "AUTH_TENANT_ID": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "AUTH_AUDIENCE": "22222222-2222-2222-2222-222222222222",
        "AUTH_ALLOWED_CLIENT_IDS": f"{AZURE_CLI_CLIENT_ID},{DAEMON_CLIENT_ID}",
    }
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(azd_values))
    output = tmp_path / "local.settings.json"
    assert local_settings.main(["--from-json", str(values_file), "--output", str(output)]) == 0
    document = json.loads(output.read_text())
    values = document["Values"]
    assert document["IsEncrypted"] is False
    assert set(values) == set(sample_values()) - set(ABSENT_IN_AZURE)
    assert values["COSMOS_ENDPOINT"] == azd_values["COSMOS_ENDPOINT"]
    assert values["REDIS_HOST"] == azd_values["REDIS_HOST"]
    assert values["COSMOS_CREATE_IF_MISSING"] == "false"
    assert values["AZURE_CLIENT_ID"] == ""
    for name in app_setting_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = AppSettings()
    assert not settings.cosmos_is_local_emulator
    assert settings.cosmos_key is None and settings.redis_url is None
    assert settings.redis_host == azd_values["REDIS_HOST"] and settings.redis_ssl
    # Tokens from Entra for the provisioned registration, not from the local issuer.
    assert settings.auth_audience == azd_values["AUTH_AUDIENCE"]
    assert settings.auth_issuer_url == (
        f"https://login.microsoftonline.com/{azd_values['AUTH_TENANT_ID']}/v2.0"
    )
    # The app run locally accepts the clients the deployed one does, no other.
    assert settings.auth_allowed_client_ids == (AZURE_CLI_CLIENT_ID, DAEMON_CLIENT_ID)


def test_postprovision_fails_clearly_before_provisioning(tmp_path: Path) -> None:
    local_settings = load_script("local_settings")
    values_file = tmp_path / "values.json"
    values_file.write_text("{}")
    output = tmp_path / "local.settings.json"
    assert local_settings.main(["--from-json", str(values_file), "--output", str(output)]) == 1
    assert not output.exists()


def _run_postprovision(
    tmp_path: Path, azd_values: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """The posix postprovision hook as azd runs it, with an `azd` on PATH that answers
    `azd env get-values` with these values."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    fake_azd = bin_dir / "azd"
    fake_azd.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(azd_values)}\nEOF\n")
    fake_azd.chmod(0o755)
    hook = REPO / azure_yaml()["hooks"]["postprovision"]["posix"]["run"]
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STATE_COLD_BACKEND": azd_values.get("STATE_COLD_BACKEND", "cosmos"),
    }
    return subprocess.run(
        ["sh", str(hook), "--output", str(tmp_path / "local.settings.json")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_failed_postgres_role_hook_stops_azd_up_before_deploy(tmp_path: Path) -> None:
    """The deployed code needs the app's Postgres role and the migrations the hook applies:
    when the hook fails, `azd up` must stop rather than deploy (continueOnError false), and
    the hook's exit status must say so. A local.settings.json it cannot write only warns."""
    postprovision = azure_yaml()["hooks"]["postprovision"]
    assert postprovision["posix"]["continueOnError"] is False
    assert postprovision["windows"]["continueOnError"] is False
    assert "exit $LASTEXITCODE" in postprovision["windows"]["run"]
    # No AZURE_PRINCIPAL_NAME: the role hook refuses before reaching any server.
    postgres = {
        "STATE_COLD_BACKEND": "postgres",
        "POSTGRES_HOST": "psql-abc.postgres.database.azure.com",
        "POSTGRES_DATABASE": "agentstate",
        "POSTGRES_USER": "id-api-abc",
        "REDIS_HOST": "redis-abc.redis.azure.net",
    }
    failed = _run_postprovision(tmp_path / "postgres", postgres)
    assert failed.returncode != 0, failed.stderr
    assert "[azd] postgres:" in failed.stderr
    # Outputs missing: the local file cannot be written, which stops nothing.
    no_outputs = _run_postprovision(tmp_path / "cosmos", {"STATE_COLD_BACKEND": "cosmos"})
    assert no_outputs.returncode == 0, no_outputs.stderr
    assert "local.settings.json not written" in no_outputs.stderr


def test_preprovision_refuses_postgres_without_its_entra_administrator(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bicep would create a server with no Entra administrator, and the app's database
    role could never be created: refused before anything is provisioned."""
    preprovision = load_script("preprovision")
    assert preprovision.main({"STATE_COLD_BACKEND": "postgres"}) == 1
    assert "azd env set AZURE_PRINCIPAL_NAME" in capsys.readouterr().err
    assert preprovision.main({"STATE_COLD_BACKEND": "postgres", "AZURE_PRINCIPAL_NAME": " "}) == 1
    named = {
        "STATE_COLD_BACKEND": "postgres",
        "AZURE_PRINCIPAL_NAME": "dev@contoso.com",
        "VNET_ENABLED": "true",
    }
    assert preprovision.main(named) == 0
    assert preprovision.main({}) == 0  # Cosmos, the default, needs no name
    assert preprovision.main({"STATE_COLD_BACKEND": "cosmos"}) == 0


def test_postgres_is_open_to_all_of_azure_only_on_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The 0.0.0.0 firewall rule admits every Azure customer's traffic: not deployed by
    default, only with public access and POSTGRES_ALLOW_AZURE_SERVICES; a Postgres
    deployment with neither it nor a VNet (an app that could not connect) is refused
    before provisioning."""
    rule_type = "Microsoft.DBforPostgreSQL/flexibleServers/firewallRules"

    def opened(**bound: Any) -> Any:
        postgres = infra_file("postgres.bicep").bind(**bound)
        rule = next(
            r
            for r in postgres.of_type(rule_type)
            if r.get("properties.startIpAddress") == "0.0.0.0"
        )
        assert rule.condition is not None
        return postgres.evaluate(rule.condition, assume_defaults=True)

    assert opened() is False
    assert opened(allowAzureServices=True) is True
    assert opened(allowAzureServices=True, publicNetworkAccess="Disabled") is False
    main = infra_file("main.bicep")
    module = next(m for m in main.modules if Path(m.path).name == "postgres.bicep")
    assert main.evaluate(module.params()["allowAzureServices"], assume_defaults=True) is False
    wanted = main.bind(postgresAllowAzureServices=True)
    assert wanted.evaluate(module.params()["allowAzureServices"], assume_defaults=True) is True
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert (
        parameters["postgresAllowAzureServices"]["value"]
        == "${POSTGRES_ALLOW_AZURE_SERVICES=false}"
    )

    preprovision = load_script("preprovision")
    public = {"STATE_COLD_BACKEND": "postgres", "AZURE_PRINCIPAL_NAME": "dev@contoso.com"}
    assert preprovision.main(public) == 1
    assert "azd env set POSTGRES_ALLOW_AZURE_SERVICES true" in capsys.readouterr().err
    assert preprovision.main({**public, "POSTGRES_ALLOW_AZURE_SERVICES": "true"}) == 0
    assert preprovision.main({**public, "VNET_ENABLED": "True"}) == 0
    assert preprovision.main({**public, "POSTGRES_ALLOW_AZURE_SERVICES": "false"}) == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("VNET_ENABLED", "yes"),
        ("POSTGRES_ALLOW_AZURE_SERVICES", "1"),
        ("STATE_COLD_BACKEND", "Postgres"),
        ("STATE_COLD_BACKEND", "sql"),
    ],
)
def test_preprovision_refuses_a_switch_or_backend_it_would_misread(
    name: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`yes` is no bool to Bicep and was read here as false; `Postgres` passed the checks
    meant for the Postgres backend unchecked. Both are refused, named, before provisioning."""
    preprovision = load_script("preprovision")
    ready = {
        "STATE_COLD_BACKEND": "postgres",
        "AZURE_PRINCIPAL_NAME": "dev@contoso.com",
        "VNET_ENABLED": "true",
    }
    assert preprovision.main(ready) == 0
    assert preprovision.main({**ready, name: value}) == 1
    assert f"{name} is {value!r}" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["VNET_ENABLED", "POSTGRES_ALLOW_AZURE_SERVICES"])
@pytest.mark.parametrize("written", [" true", "true ", "true\n", "tRuE", " false", "  "])
def test_preprovision_refuses_a_switch_azd_passes_as_text(
    name: str, written: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """azd reads a bool parameter only if Go's strconv.ParseBool takes the value whole (no
    spaces; `true`, `True` or `TRUE`): " true" reached ARM as the string " true", which it
    refuses for a bool parameter, after this hook had read it as true (as it did the cold
    retention's spaced number)."""
    preprovision = load_script("preprovision")
    ready = {"STATE_COLD_BACKEND": "postgres", "AZURE_PRINCIPAL_NAME": "dev@contoso.com"}
    for spelled in ("true", "True", "TRUE"):
        assert preprovision.main({**ready, name: spelled}) == 0
    assert preprovision.main({**ready, "VNET_ENABLED": "true", name: written}) == 1
    assert f"{name} is {written!r}" in capsys.readouterr().err


def test_preprovision_refuses_allowed_client_ids_the_app_would_refuse(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The app refuses an AUTH_ALLOWED_CLIENT_IDS entry that is no GUID at start in Azure,
    and answers every request 503: refused before anything is provisioned, named by its
    position, not repeated."""
    preprovision = load_script("preprovision")
    named = {"AUTH_ALLOWED_CLIENT_IDS": f"{DAEMON_CLIENT_ID},nightly-daemon"}
    assert preprovision.main(named) == 1
    err = capsys.readouterr().err
    assert "AUTH_ALLOWED_CLIENT_IDS: entry 2 is not an application (client) id" in err
    assert "nightly-daemon" not in err
    # What Bicep and the app accept passes: any case, spaces, empty entries, the
    # deployment's own output fed back, and nothing at all.
    messy = f" {DAEMON_CLIENT_ID.upper()} , ,{AZURE_CLI_CLIENT_ID},"
    for accepted in ("", " ", messy, f"{AZURE_CLI_CLIENT_ID},{DAEMON_CLIENT_ID}"):
        assert preprovision.main({"AUTH_ALLOWED_CLIENT_IDS": accepted}) == 0, accepted


def test_preprovision_refuses_a_cold_retention_the_app_would_refuse(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """STATE_COLD_TTL_SECONDS now feeds stateColdTtlSeconds: 0 (the app refuses it) or a
    value Bicep's bounds refuse stops `azd up` before anything is provisioned, with the
    command that fixes it."""
    preprovision = load_script("preprovision")
    for refused in ("0", "-5", "30d", "2147483648"):
        assert preprovision.main({"STATE_COLD_TTL_SECONDS": refused}) == 1, refused
        assert "azd env set STATE_COLD_TTL_SECONDS" in capsys.readouterr().err
    for accepted in ("", "-1", "1", "2592000", "2147483647"):
        assert preprovision.main({"STATE_COLD_TTL_SECONDS": accepted}) == 0, accepted
    main = infra_file("main.bicep")
    bounds = main.params["stateColdTtlSeconds"].decorator_args
    assert (bounds["minValue"][0], bounds["maxValue"][0]) == (-1, preprovision.COLD_TTL_MAX)


def test_preprovision_refuses_a_cold_retention_azd_passes_as_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """azd substitutes the variable as written and reads it as a number only if Go's
    strconv.ParseInt takes it whole: " 2592000 " reached ARM as the string " 2592000 ",
    which refuses it for an int parameter after the hook had let it through."""
    preprovision = load_script("preprovision")
    for written in (" 2592000 ", "2592000\n", " -1", "  "):
        assert preprovision.main({"STATE_COLD_TTL_SECONDS": written}) == 1, repr(written)
        assert "azd env set STATE_COLD_TTL_SECONDS" in capsys.readouterr().err


def test_deploy_doc_covers_deployment_and_every_setting() -> None:
    doc = DEPLOY_DOC.read_text()
    for needle in (
        "Prerequisites",
        "azd auth login",
        "azd up",
        "azd down --purge",
        "estimate",
        "What it creates",
    ):
        assert needle in doc, needle
    for name in sample_values():
        assert re.search(rf"^\|\s*`{re.escape(name)}`\s*\|", doc, re.MULTILINE), name


# ================================================================== tests: the checkers can fail

GOOD_COSMOS = """
resource account 'Microsoft.DocumentDB/databaseAccounts@2024-11-15' = {
  name: 'a'
  properties: {
    disableLocalAuth: true
    capabilities: [
      {
        name: 'EnableServerless'
      }
    ]
  }
  resource db 'sqlDatabases' = {
    name: 'db'
    resource c 'containers' = {
      name: 'c'
      properties: {
        resource: {
          partitionKey: {
            paths: [
              '/thread_id'
            ]
          }
          defaultTtl: -1
          indexingPolicy: {
            excludedPaths: [
              {
                path: '/data/?'
              }
            ]
          }
        }
      }
    }
  }
}
"""


def test_checker_accepts_a_good_snippet() -> None:
    """Guards the negative tests below: they fail because of the one change each makes."""
    assert check_cosmos([parse(GOOD_COSMOS)], ["/data/?"]) == []


def test_checker_catches_syntax_errors() -> None:
    broken = parse("resource x 'Microsoft.Storage/storageAccounts@2023-05-01' = {\n  name: 'a'\n")
    assert check_parses([broken])
    assert check_parses([parse("param p string = \n")])


def test_checker_catches_cosmos_local_auth_enabled() -> None:
    broken = GOOD_COSMOS.replace("disableLocalAuth: true", "disableLocalAuth: false")
    assert any("disableLocalAuth" in p for p in check_cosmos([parse(broken)], ["/data/?"]))
    missing = GOOD_COSMOS.replace("disableLocalAuth: true", "")
    assert any("disableLocalAuth" in p for p in check_cosmos([parse(missing)], ["/data/?"]))


def test_checker_catches_wrong_partition_key_and_index_policy() -> None:
    broken = GOOD_COSMOS.replace("'/thread_id'", "'/id'")
    assert any("partition key" in p for p in check_cosmos([parse(broken)], ["/data/?"]))
    assert any("excludedPaths" in p for p in check_cosmos([parse(GOOD_COSMOS)], ["/blob/?"]))


def test_checker_catches_provisioned_cosmos_by_default() -> None:
    broken = GOOD_COSMOS.replace("name: 'EnableServerless'", "name: 'EnableAnalyticalStorage'")
    assert any("serverless" in p for p in check_cosmos([parse(broken)], ["/data/?"]))


def test_checker_catches_storage_shared_key_access() -> None:
    snippet = """
resource st 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: 'st'
  properties: {
    allowSharedKeyAccess: %s
    allowBlobPublicAccess: false
    minimumTlsVersion: 'TLS1_2'
  }
}
"""
    assert check_storage([parse(snippet % "false")]) == []
    assert any("allowSharedKeyAccess" in p for p in check_storage([parse(snippet % "true")]))
    assert check_storage([parse("var x = 1\n")]) == [
        "no Microsoft.Storage/storageAccounts resource"
    ]


REDIS_SNIPPET = """
resource cache 'Microsoft.Cache/redis@2024-11-01' = {
  name: 'r'
  properties: {
    enableNonSslPort: false
    disableAccessKeyAuthentication: %(keys)s
    redisConfiguration: {
      'aad-enabled': '%(aad)s'
    }
  }
}
resource access 'Microsoft.Cache/redis/accessPolicyAssignments@2024-11-01' = {
  parent: cache
  name: 'a'
  properties: {
    accessPolicyName: '%(policy)s'
    objectId: principalId
  }
}
"""


def test_checker_catches_redis_without_entra_auth() -> None:
    good = {"keys": "true", "aad": "true", "policy": "Data Contributor"}
    assert check_redis([parse(REDIS_SNIPPET % good)]) == []
    no_aad = parse(REDIS_SNIPPET % {**good, "aad": "false"})
    assert any("aad-enabled" in p for p in check_redis([no_aad]))
    keys_on = parse(REDIS_SNIPPET % {**good, "keys": "false"})
    assert any("disableAccessKeyAuthentication" in p for p in check_redis([keys_on]))
    no_policy = parse((REDIS_SNIPPET % good).split("resource access")[0])
    assert any("no access policy assignment" in p for p in check_redis([no_policy]))
    managed = parse(
        """
resource db 'Microsoft.Cache/redisEnterprise/databases@2025-07-01' = {
  name: 'default'
  properties: {
    clientProtocol: 'Encrypted'
    accessKeysAuthentication: 'Enabled'
  }
}
"""
    )
    assert any("accessKeysAuthentication" in p for p in check_redis([managed]))


def test_checker_catches_wrong_redis_access_policy() -> None:
    snippet = parse(
        REDIS_SNIPPET % {"keys": "true", "aad": "true", "policy": "Data Owner"}, name="redis.bicep"
    )
    expected = {("redis.bicep", "access"): "Data Contributor"}
    assert any("Data Owner" in p for p in check_redis_access([snippet], expected))


def test_checker_catches_app_insights_local_auth() -> None:
    snippet = """
resource appi 'Microsoft.Insights/components@2020-02-02' = {
  name: 'a'
  kind: 'web'
  properties: {
    WorkspaceResourceId: law.id
    %s
  }
}
"""
    assert check_app_insights([parse(snippet % "DisableLocalAuth: true")]) == []
    assert check_app_insights([parse(snippet % "DisableLocalAuth: false")])
    assert check_app_insights([parse(snippet % "")])


def test_checker_catches_postgres_password_auth() -> None:
    snippet = """
resource pg 'Microsoft.DBforPostgreSQL/flexibleServers@2024-08-01' = {
  name: 'pg'
  properties: {
    authConfig: {
      activeDirectoryAuth: 'Enabled'
      passwordAuth: '%s'
    }
  }
}
"""
    assert check_postgres([parse(snippet % "Disabled")]) == []
    assert any("passwordAuth" in p for p in check_postgres([parse(snippet % "Enabled")]))


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("output cacheKey string = 'x'", "named like a secret"),
        ("output COSMOS_KEY string = 'x'", "named like a secret"),
        ("output APPLICATIONINSIGHTS_CONNECTION_STRING string = 'x'", "named like a secret"),
        ("output primary string = cache.listKeys().primaryKey", "listKeys"),
        ("output p string = listKeys(cache.id, '2024-11-01').primaryKey", "listKeys"),
        ("output c string = appi.properties.ConnectionString", "ConnectionString"),
        ("@secure()\noutput hidden string = 'x'", "@secure"),
    ],
)
def test_checker_catches_secret_outputs(output: str, reason: str) -> None:
    problems = check_outputs([parse(output + "\n")])
    assert any(reason in p for p in problems), problems


def test_checker_accepts_plain_outputs() -> None:
    snippet = "output REDIS_HOST string = cache.properties.hostName\noutput REDIS_PORT int = 6380\n"
    assert check_outputs([parse(snippet)]) == []


ROLE_SNIPPET = """
var roles = {
  blob: '%s'
}
resource ra 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid('x')
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.blob)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
"""


def test_checker_catches_a_wrong_role_id() -> None:
    expected = {("storage.bicep", "ra"): ROLE_IDS["storageBlobDataOwner"]}
    good = parse(ROLE_SNIPPET % ROLE_IDS["storageBlobDataOwner"], name="storage.bicep")
    assert check_role_assignments([good], expected) == []
    # Storage Blob Data Contributor instead of Owner.
    wrong = parse(ROLE_SNIPPET % "ba92f5b4-2d11-453d-a403-e96b0029c9fe", name="storage.bicep")
    assert any("expected role" in p for p in check_role_assignments([wrong], expected))
    unexpected = parse(ROLE_SNIPPET % ROLE_IDS["storageBlobDataOwner"], name="other.bicep")
    problems = check_role_assignments([unexpected], expected)
    assert any("without an expected role" in p for p in problems)
    assert any("missing" in p for p in problems)


def test_checker_catches_a_wrong_cosmos_data_role() -> None:
    snippet = """
resource account 'Microsoft.DocumentDB/databaseAccounts@2024-11-15' existing = {
  name: 'a'
}
resource ra 'Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments@2024-11-15' = {
  parent: account
  name: guid('x')
  properties: {
    roleDefinitionId: '${account.id}/sqlRoleDefinitions/%s'
    principalId: principalId
    scope: account.id
  }
}
"""
    expected = {("cosmos.bicep", "ra"): ROLE_IDS["cosmosBuiltInDataContributor"]}
    good = parse(snippet % ROLE_IDS["cosmosBuiltInDataContributor"], name="cosmos.bicep")
    assert check_role_assignments([good], expected) == []
    # Built-in Data Reader instead of Contributor.
    reader = parse(snippet % "00000000-0000-0000-0000-000000000001", name="cosmos.bicep")
    assert check_role_assignments([reader], expected)


def test_checker_catches_key_based_app_settings() -> None:
    snippet = """
resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: 's'
  resource cfg 'config' = {
    name: 'appsettings'
    properties: {
      AzureWebJobsStorage__credential: 'managedidentity'
      AzureWebJobsStorage__clientId: identityClientId
      AZURE_CLIENT_ID: identityClientId
      APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
      STATE_COLD_BACKEND: stateColdBackend
      COSMOS_CREATE_IF_MISSING: 'false'
      REDIS_SSL: 'true'
      %s
    }
  }
}
"""
    assert check_app_settings([parse(snippet % "")]) == []
    leaked = parse(snippet % "REDIS_PASSWORD: redis.listKeys().primaryKey")
    assert any("list*()" in p for p in check_app_settings([leaked]))
    create = parse(
        (snippet % "").replace(
            "COSMOS_CREATE_IF_MISSING: 'false'", "COSMOS_CREATE_IF_MISSING: 'true'"
        )
    )
    assert any("COSMOS_CREATE_IF_MISSING" in p for p in check_app_settings([create]))


def test_checker_catches_a_function_app_without_identity_deployment() -> None:
    snippet = """
resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: 'p'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
}
resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: 's'
  kind: 'functionapp,linux'
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  identity: {
    type: 'UserAssigned'
  }
  properties: {
    httpsOnly: true
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          authentication: {
            type: '%s'
          }
        }
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}
"""
    assert check_function_app([parse(snippet % "UserAssignedIdentity")], "api") == []
    broken = parse(snippet % "StorageAccountConnectionString")
    assert any("identity" in p for p in check_function_app([broken], "api"))
    assert any(
        "azd-service-name" in p
        for p in check_function_app([parse(snippet % "UserAssignedIdentity")], "web")
    )


def test_checker_catches_basic_publishing_left_on() -> None:
    snippet = """
resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: 's'
  kind: 'functionapp,linux'

  resource scm 'basicPublishingCredentialsPolicies' = {
    name: 'scm'
    properties: {
      allow: %s
    }
  }
%s
}
"""
    ftp = """
  resource ftp 'basicPublishingCredentialsPolicies' = {
    name: 'ftp'
    properties: {
      allow: false
    }
  }
"""
    assert check_basic_publishing([parse(snippet % ("false", ftp))]) == []
    assert any(
        "scm basic publishing" in p
        for p in check_basic_publishing([parse(snippet % ("true", ftp))])
    )
    assert check_basic_publishing([parse(snippet % ("false", ""))]) == [
        "no basicPublishingCredentialsPolicies 'ftp'"
    ]


def test_checker_catches_ftp_left_on_and_an_old_scm_tls() -> None:
    snippet = """
resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: 's'
  kind: 'functionapp,linux'
  properties: {
    siteConfig: {
      minTlsVersion: '1.2'
      %s
    }
  }
}
"""
    good = "scmMinTlsVersion: '1.2'\n      ftpsState: 'Disabled'"
    assert check_site_transport([parse(snippet % good)]) == []
    assert check_site_transport([parse(snippet % good.replace("Disabled", "FtpsOnly"))]) == [
        "snippet.bicep:site: siteConfig.ftpsState is 'FtpsOnly', not 'Disabled'"
    ]
    assert check_site_transport([parse(snippet % "ftpsState: 'Disabled'")]) == [
        "snippet.bicep:site: siteConfig.scmMinTlsVersion is None, not '1.2'"
    ]


def test_api_registration_has_the_app_roles_and_requires_assignment() -> None:
    assert check_api_registration(infra_files(), json.loads(BICEP_CONFIG.read_text())) == []


def test_function_app_requires_entra_tokens_in_front_of_the_app() -> None:
    assert check_auth_settings(infra_files()) == []


def test_the_app_checks_tokens_for_the_registration_bicep_creates() -> None:
    """AUTH_AUDIENCE and the built-in authentication's audience are the registration's id."""
    main = infra_file("main.bicep")
    modules = {m.symbol: m for m in main.modules}
    for module, param in (("functionApp", "authClientId"), ("apiAuthSettings", "clientId")):
        assert text(modules[module].params()[param]) == "apiRegistration.outputs.clientId"
    settings = app_settings_resource(infra_files()).get("properties") or {}
    assert settings["AUTH_DISABLED"] == "false"
    assert settings["AUTH_AUDIENCE"] == Expr("authClientId")
    assert settings["AUTH_ISSUER"] == settings["AUTH_JWKS_URL"] == ""


def test_only_the_listed_client_applications_are_accepted_in_azure() -> None:
    """The app (AUTH_ALLOWED_CLIENT_IDS) and built-in authentication (allowedApplications)
    accept the same clients: the Azure CLI (which azd signs in as) and the ids of the
    `authAllowedClientIds` parameter (azd env AUTH_ALLOWED_CLIENT_IDS), nothing else. Any
    client a user consents to otherwise calls the API with that user's app roles."""
    main = infra_file("main.bicep")
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert parameters["authAllowedClientIds"]["value"] == "${AUTH_ALLOWED_CLIENT_IDS}"
    default = main.params["authAllowedClientIds"].default
    assert default is not None and main.evaluate(default) == ""
    modules = {m.symbol: m for m in main.modules}
    passed = {
        text(modules["functionApp"].params()["authAllowedClientIds"]),
        text(modules["apiAuthSettings"].params()["allowedClientIds"]),
    }
    assert passed == {"allowedClientIds"}
    allowed = main.variables["allowedClientIds"]
    assert main.bind(authAllowedClientIds="").evaluate(allowed) == [AZURE_CLI_CLIENT_ID]
    extra = f" {DAEMON_CLIENT_ID.upper()} ,,{AZURE_CLI_CLIENT_ID},"
    assert main.bind(authAllowedClientIds=extra).evaluate(allowed) == [
        AZURE_CLI_CLIENT_ID,
        DAEMON_CLIENT_ID,
    ]
    settings = app_settings_resource(infra_files()).get("properties") or {}
    assert settings["AUTH_ALLOWED_CLIENT_IDS"] == Expr("join(authAllowedClientIds, ',')")
    # The app run locally against the deployment (postprovision hook) gets the same list.
    outputs = {o.name: o.value for o in main.outputs}
    assert text(outputs["AUTH_ALLOWED_CLIENT_IDS"]) == "join(allowedClientIds, ',')"
    function_app = infra_file("function-app.bicep")
    joined = function_app.bind(authAllowedClientIds=[AZURE_CLI_CLIENT_ID, DAEMON_CLIENT_ID])
    assert app_settings_resource([joined]).get("properties.AUTH_ALLOWED_CLIENT_IDS") == (
        f"{AZURE_CLI_CLIENT_ID},{DAEMON_CLIENT_ID}"
    )
    auth = [
        r
        for r in infra_file("api-auth-settings.bicep").of_type("Microsoft.Web/sites/config")
        if r.get("name") == "authsettingsV2"
    ]
    assert [
        r.get(
            "properties.identityProviders.azureActiveDirectory.validation"
            ".defaultAuthorizationPolicy.allowedApplications"
        )
        for r in auth
    ] == [Expr("allowedClientIds")]


GOOD_REGISTRATION = """
extension microsoftGraphV1
var appRoles = [
  { value: 'Cases.Submit' }
  { value: 'Cases.Review' }
  { value: 'Cases.Operate' }
]
resource api 'Microsoft.Graph/applications@v1.0' = {
  uniqueName: 'agent-state-api'
  displayName: 'api'
  signInAudience: 'AzureADMyOrg'
  api: {
    requestedAccessTokenVersion: 2
  }
  appRoles: [for role in appRoles: {
    value: role.value
    allowedMemberTypes: [
      'User'
      'Application'
    ]
  }]
}
resource sp 'Microsoft.Graph/servicePrincipals@v1.0' = {
  appId: api.appId
  appRoleAssignmentRequired: true
}
"""
GRAPH_CONFIG = {"extensions": {"microsoftGraphV1": GRAPH_EXTENSION_REGISTRY + "1.0.0"}}


def test_checker_catches_a_broken_app_registration() -> None:
    assert check_api_registration([parse(GOOD_REGISTRATION)], GRAPH_CONFIG) == []
    for change, complaint in (
        (("  { value: 'Cases.Operate' }\n", ""), "app roles"),
        (("requestedAccessTokenVersion: 2", "requestedAccessTokenVersion: 1"), "Version must be 2"),
        (
            ("appRoleAssignmentRequired: true", "appRoleAssignmentRequired: false"),
            "appRoleAssignmentRequired",
        ),
        (("  uniqueName: 'agent-state-api'\n", ""), "uniqueName"),
        (("      'Application'\n", ""), "users and applications"),
        (("extension microsoftGraphV1\n", ""), "no `extension`"),
    ):
        broken = parse(GOOD_REGISTRATION.replace(*change))
        assert any(complaint in p for p in check_api_registration([broken], GRAPH_CONFIG)), change
    unmapped = {"extensions": {"microsoftGraphV1": "br:example.com/other:1.0"}}
    assert check_api_registration([parse(GOOD_REGISTRATION)], unmapped)


GOOD_AUTH_SETTINGS = """
resource site 'Microsoft.Web/sites@2024-04-01' existing = {
  name: 'func'
}
resource auth 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: site
  name: 'authsettingsV2'
  properties: {
    platform: {
      enabled: true
    }
    globalValidation: {
      requireAuthentication: true
      unauthenticatedClientAction: 'Return401'
      excludedPaths: [
        '/api/health'
      ]
    }
    httpSettings: {
      requireHttps: true
    }
    identityProviders: {
      azureActiveDirectory: {
        enabled: true
        registration: {
          clientId: clientId
          openIdIssuer: 'https://login.microsoftonline.com/${tenant().tenantId}/v2.0'
        }
        validation: {
          allowedAudiences: [
            clientId
          ]
          defaultAuthorizationPolicy: {
            allowedApplications: allowedClientIds
          }
        }
      }
    }
  }
}
"""


def test_checker_catches_authentication_that_lets_callers_through() -> None:
    assert check_auth_settings([parse(GOOD_AUTH_SETTINGS)]) == []
    for change in (
        ("requireAuthentication: true", "requireAuthentication: false"),
        ("'Return401'", "'AllowAnonymous'"),
        ("        '/api/health'\n", "        '/api/health'\n        '/api/cases'\n"),
        ("      enabled: true\n        registration", "      enabled: false\n        registration"),
        ("allowedApplications: allowedClientIds", "allowedApplications: []"),
    ):
        broken = parse(GOOD_AUTH_SETTINGS.replace(*change))
        assert check_auth_settings([broken]), change


def test_only_the_alias_form_of_extension_is_blanked() -> None:
    assert parse("extension microsoftGraphV1\nparam p string\n").extensions == ["microsoftGraphV1"]
    assert check_parses([parse("extension 'br:example.com/x:1.0' as g\nparam p string\n")])


def test_settings_parity_fails_when_the_app_gains_a_setting() -> None:
    """A new AppSettings field breaks parity until Bicep and the sample learn it."""
    with_new_field = app_setting_names() | {"STATE_NEW_KNOB"}
    assert set(sample_values()) != with_new_field | LOCAL_HOST_SETTINGS
    assert (
        bicep_app_setting_names() != (with_new_field - set(ABSENT_IN_AZURE)) | AZURE_HOST_SETTINGS
    )


def test_evaluator_folds_integer_arithmetic_lookups_and_min_max_as_bicep_does() -> None:
    snippet = parse(
        """
var limits = { small: { connections: 414 } }
var budget = limits['small'].connections - 1
var perInstance = min(10, budget / 40)
var truncated = -7 / 2
var fits = 40 * perInstance <= budget
"""
    )
    values = {name: snippet.evaluate(node) for name, node in snippet.variables.items()}
    assert values["budget"] == 413
    assert values["perInstance"] == 10
    assert values["truncated"] == -3
    assert values["fits"] is True
