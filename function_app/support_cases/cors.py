"""Calls from browser pages of other origins (a support portal calling the API): allowed
for the origins `CORS_ALLOWED_ORIGINS` names, none by default.

Read on the first request, not when the app is built (the Functions worker builds it before
any setting is read). Outermost: a browser's preflight carries no token, and is answered
here before the token check; the answers after it (a 401 included) carry the headers a page
needs to read them. Bearer tokens, not cookies: no credentials mode.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from state import SettingsError

from .settings import AppSettings

METHODS = ("GET", "HEAD", "POST")
# What a page sends: its token, the body's type, a retry's key, an event stream's resume.
REQUEST_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID")
# What a page may read besides the safelisted ones.
RESPONSE_HEADERS = ("Location", "Retry-After", "WWW-Authenticate", "Idempotent-Replayed")
PREFLIGHT_MAX_AGE_SECONDS = 600


class BrowserOrigins:
    def __init__(self, app: ASGIApp, settings: Callable[[], AppSettings]) -> None:
        self.app = app
        self._settings = settings
        self._answering: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self._handler()(scope, receive, send)

    def _handler(self) -> ASGIApp:
        if self._answering is None:
            try:
                origins = self._settings().cors_allowed_origins
            except SettingsError:
                return self.app  # the routes answer 503 naming the problem; read again next
            self._answering = (
                CORSMiddleware(
                    self.app,
                    allow_origins=list(origins),
                    allow_methods=METHODS,
                    allow_headers=REQUEST_HEADERS,
                    expose_headers=RESPONSE_HEADERS,
                    max_age=PREFLIGHT_MAX_AGE_SECONDS,
                )
                if origins
                else self.app
            )
        return self._answering
