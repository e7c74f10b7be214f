"""Request bodies the end-to-end tests share."""

from __future__ import annotations

import uuid
from typing import Any


def duplicate_charges(amount: float, merchant: str = "Acme Streaming") -> list[dict[str, Any]]:
    return [
        {
            "id": f"tx-{uuid.uuid4().hex[:8]}",
            "merchant": merchant,
            "amount": amount,
            "currency": "USD",
            "timestamp": "2024-05-01T10:00:00Z",
        },
        {
            "id": f"tx-{uuid.uuid4().hex[:8]}",
            "merchant": merchant,
            "amount": amount,
            "currency": "USD",
            "timestamp": "2024-05-01T10:02:00Z",
        },
        {
            "id": f"tx-{uuid.uuid4().hex[:8]}",
            "merchant": "Corner Coffee",
            "amount": 4.5,
            "currency": "USD",
            "timestamp": "2024-05-01T08:15:00Z",
        },
    ]
