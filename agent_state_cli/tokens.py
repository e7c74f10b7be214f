"""Where the CLI's access token comes from (first that applies):

1. `AGENT_STATE_TOKEN`: a token obtained elsewhere, e.g.
   `az account get-access-token --scope api://<API client id>/.default --query accessToken -o tsv`;
2. a loopback API: the local stack's token issuer (`AGENT_STATE_ISSUER`, else the one
   `agent-state stack up` recorded), for `AGENT_STATE_USER` (default: the OS user)
   holding `AGENT_STATE_ROLES` (default: every role);
3. `AGENT_STATE_SCOPE` (`api://<API client id>/.default`): azure-identity's
   DefaultAzureCredential (an `az login` / `azd auth login` session, a service
   principal from the environment, or a managed identity).

None applies: no token is sent, and the API answers 401 saying what is missing.
A token is never sent over plain `http://` to an address other than loopback.
"""

from __future__ import annotations

import getpass
import http.client
import os
import re
import urllib.error
from urllib.parse import urlsplit

# RFC 6750's b64token, the form of the `Authorization: Bearer` credential.
BEARER_TOKEN = r"[A-Za-z0-9\-._~+/]+=*"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
ALL_ROLES = ("Cases.Submit", "Cases.Review", "Cases.Operate")


class TokenUnavailable(Exception):
    """A token source applies but could not produce a token."""


class InsecureApi(TokenUnavailable):
    """The token would travel in clear text to another machine."""


def access_token(api: str) -> str | None:
    token = _found_token(api)
    where = urlsplit(api)
    if token and where.scheme != "https" and where.hostname not in LOOPBACK_HOSTS:
        raise InsecureApi(f"refusing to send a bearer token to {api} unencrypted: use https://")
    return token


def _found_token(api: str) -> str | None:
    explicit = os.environ.get("AGENT_STATE_TOKEN", "").strip()
    if explicit:
        # Checked here: httpx raises UnicodeEncodeError on a non-ASCII header (a traceback),
        # and a line break in it passes for a connection failure.
        if not re.fullmatch(BEARER_TOKEN, explicit):
            raise TokenUnavailable(
                "AGENT_STATE_TOKEN is not a bearer token: it holds only letters, digits and"
                " -._~+/ (with = at the end); was something else pasted with it?"
            )
        return explicit
    if urlsplit(api).hostname in LOOPBACK_HOSTS:
        issuer = os.environ.get("AGENT_STATE_ISSUER") or _stack_issuer()
        if issuer:
            return _local_token(issuer)
    scope = os.environ.get("AGENT_STATE_SCOPE")
    if scope:
        return _entra_token(scope)
    return None


def _stack_issuer() -> str | None:
    """The issuer of a running `agent-state stack up`, if any: one its state file still
    names but that is no longer running lends nothing (the call then says it cannot reach
    the API, not that the issuer gave no token)."""
    from devstack.stack import StateFileUnreadable, status

    try:
        found = status()
    except StateFileUnreadable as error:
        raise TokenUnavailable(str(error)) from error
    env, alive = found.get("env"), found.get("alive")
    if not (isinstance(alive, dict) and alive.get("issuer")):
        return None
    return str(env["AUTH_ISSUER"]) if isinstance(env, dict) and env.get("AUTH_ISSUER") else None


def _local_token(issuer: str) -> str:
    from devstack.issuer import request_token

    name = os.environ.get("AGENT_STATE_USER") or getpass.getuser()
    wanted = os.environ.get("AGENT_STATE_ROLES")
    roles = [r.strip() for r in wanted.split(",") if r.strip()] if wanted else list(ALL_ROLES)
    try:
        return request_token(issuer, name, roles)
    # HTTPException: a port that is no number (InvalidURL) or a server that answers no HTTP
    # (BadStatusLine), neither an OSError nor a ValueError. TypeError: JSON that is no object
    # (another service), which has no "access_token" to look up.
    except (
        urllib.error.URLError,
        http.client.HTTPException,
        OSError,
        ValueError,
        KeyError,
        TypeError,
    ) as error:
        raise TokenUnavailable(f"the local issuer {issuer} gave no token: {error}") from error


def _entra_token(scope: str) -> str:
    from azure.core.exceptions import ClientAuthenticationError
    from azure.identity import DefaultAzureCredential

    from .stores import quiet_clients

    try:
        # Its logger would print the report of every credential tried, which the error
        # below already carries: said once.
        with quiet_clients(), DefaultAzureCredential() as credential:
            return credential.get_token(scope).token
    except ClientAuthenticationError as error:
        raise TokenUnavailable(
            f"azure-identity found no credential for {scope} (run `az login`): {error}"
        ) from error
