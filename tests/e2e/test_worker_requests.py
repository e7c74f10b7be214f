"""Requests as the Functions worker hands them to the app: through the SDK's ASGI
middleware (`func.AsgiFunctionApp`), which converts a `func.HttpRequest` itself before
the app sees it, not through uvicorn or httpx's ASGI transport as the other tests do."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import azure.functions as func
import pytest

from support_cases.api import create_app
from support_cases.auth import ROLE_SUBMIT
from support_cases.demo import demo_case
from support_cases.runtime import Runtime

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_function_app() -> ModuleType:
    """The worker entry file, imported by its stem as the Functions worker does."""
    spec = importlib.util.spec_from_file_location(
        "function_app_entry", REPO_ROOT / "function_app" / "function_app.py"
    )
    assert spec is not None and spec.loader is not None
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    return entry


async def test_a_request_the_sdk_cannot_convert_is_a_400_in_the_apps_error_shape() -> None:
    """The SDK's conversion raised (so the host answered a bare 500) on a path whose
    percent-escapes are not UTF-8, and on an X-Forwarded-Port of more digits than Python
    converts to an int. Served by uvicorn the path is a 422 and the header is not read."""
    entry = load_function_app()
    (http,) = [f for f in entry.app.get_functions() if f.get_function_name() == "http_app_func"]
    handle = http.get_user_function()
    refused = {
        "not UTF-8": ("http://worker.test/api/cases/%ff", {}),
        "an encoded surrogate": ("http://worker.test/api/cases/%ED%A0%80", {}),
        "a long forwarded port": (
            "http://worker.test/api/openapi.json",
            {"X-Forwarded-Port": "9" * 5000},
        ),
        "a port out of range": ("http://worker.test:99999/api/openapi.json", {}),
    }
    try:
        for what, (url, headers) in refused.items():
            request = func.HttpRequest("GET", url, headers=headers, body=b"")
            response = await handle(request, None)
            assert response.status_code == 400, (what, response.get_body())
            assert response.mimetype == "application/json", what
            error = json.loads(response.get_body())["error"]
            assert error.startswith("invalid request: "), (what, error)
            assert "set_int_max_str_digits" not in error, what
        # Anything else is served as before.
        request = func.HttpRequest(
            "GET",
            "http://worker.test/api/openapi.json",
            headers={"X-Forwarded-Port": "443"},
            body=b"",
        )
        served = await handle(request, None)
        assert served.status_code == 200, served.get_body()
        assert "/api/cases" in json.loads(served.get_body())["paths"]
    finally:
        # The HTTP function started the app's lifespan on its first call.
        if entry.app.startup_task_done:
            await entry.app.middleware.notify_shutdown()
            entry.app.startup_task_done = False  # else its __del__ shuts down again


@pytest.mark.parametrize("runtime", ["postgres"], indirect=True)
@pytest.mark.parametrize("separator", [",", ", "])
async def test_two_authorization_headers_joined_by_the_host_are_a_401(
    runtime: Runtime, issue_token: Callable[..., str], case_id: str, separator: str
) -> None:
    """A `func.HttpRequest` has one value per header name: the host joins the values of a
    repeated header with a comma. Two bearer tokens so joined are no bearer token, whichever
    of them a proxy in front checked."""
    first, second = (
        issue_token("worker-one", [ROLE_SUBMIT]),
        issue_token("worker-two", [ROLE_SUBMIT]),
    )
    worker = func.AsgiMiddleware(create_app(runtime))
    request = func.HttpRequest(
        "POST",
        "http://worker.test/api/cases",
        headers={
            "Authorization": f"Bearer {first}{separator}Bearer {second}",
            "Content-Type": "application/json",
        },
        body=json.dumps(demo_case(case_id)).encode(),
    )
    response = await worker.handle_async(request, None)
    assert response.status_code == 401, response.get_body()
    error = json.loads(response.get_body())["error"]
    assert error == "the Authorization header is not 'Bearer <access token>'"
    assert await runtime.store.get(case_id) is None


async def test_a_request_the_sdk_cannot_convert_is_refused_with_what_a_page_needs_to_read_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The app's other answers (its 401s included) carry the CORS headers an allowed page
    needs to read them; the 400 answered outside the app carried none, and the browser
    showed the page a network error instead."""
    portal = "https://portal.example.com"
    # Settings the app can read (no request here reaches a store); the origin allowed.
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:1/")
    monkeypatch.setenv("CORS_ALLOWED_ORIGINS", portal)
    entry = load_function_app()
    (http,) = [f for f in entry.app.get_functions() if f.get_function_name() == "http_app_func"]
    handle = http.get_user_function()
    url = "http://worker.test/api/cases/%ff"
    try:
        refused = await handle(
            func.HttpRequest("GET", url, headers={"Origin": portal}, body=b""), None
        )
        assert refused.status_code == 400, refused.get_body()
        assert refused.headers["Access-Control-Allow-Origin"] == portal
        assert json.loads(refused.get_body())["error"].startswith("invalid request: ")
        preflight = await handle(
            func.HttpRequest(
                "OPTIONS",
                url,
                headers={"Origin": portal, "Access-Control-Request-Method": "GET"},
                body=b"",
            ),
            None,
        )
        assert preflight.status_code == 200, preflight.get_body()
        assert preflight.headers["Access-Control-Allow-Origin"] == portal
        elsewhere = await handle(
            func.HttpRequest("GET", url, headers={"Origin": "https://elsewhere.example"}, body=b""),
            None,
        )
        assert elsewhere.status_code == 400, elsewhere.get_body()
        assert "Access-Control-Allow-Origin" not in elsewhere.headers
    finally:
        if entry.app.startup_task_done:
            await entry.app.middleware.notify_shutdown()
            entry.app.startup_task_done = False  # else its __del__ shuts down again
