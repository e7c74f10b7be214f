"""An API with a short request deadline, and a body a client sends slower than it: for the
tests that the deadline counts the body's arrival (no store is reached)."""

from __future__ import annotations

import json

from fastapi import FastAPI

from support_cases.api import create_app
from support_cases.runtime import RuntimeHolder
from support_cases.settings import AppSettings

DEADLINE_SECONDS = 0.5
# Time for the answer to come back once the deadline passed: far below the trickle's length.
MARGIN_SECONDS = 1.5
BODY = json.dumps({"case_id": "case_8842", "message": "charged twice"}).encode()
# A byte every so often: the whole body takes ~10 s, the deadline and its margin far less.
TRICKLE_SECONDS = 10.0 / len(BODY)


def bounded_app() -> FastAPI:
    """The API with auth off (no token to present) and a deadline of DEADLINE_SECONDS."""
    settings = AppSettings.model_validate(
        {
            "cosmos_endpoint": "https://127.0.0.1:1/",
            "auth_disabled": True,
            "api_request_deadline_seconds": DEADLINE_SECONDS,
        }
    )
    return create_app(holder=RuntimeHolder(lambda: settings))
