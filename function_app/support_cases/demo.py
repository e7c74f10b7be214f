"""The reference case `case_8842`: "I was charged twice, and I can't log in"."""

from __future__ import annotations

from typing import Any

DEMO_CASE_ID = "case_8842"


def demo_case(case_id: str = DEMO_CASE_ID) -> dict[str, Any]:
    """The demo submission: two identical charges minutes apart, plus an unrelated one."""
    return {
        "case_id": case_id,
        "customer_id": "cust_1042",
        "text": "I was charged twice, and I can't log in",
        "transactions": [
            {
                "id": "txn_1001",
                "merchant": "StreamFlix",
                "amount": 49.99,
                "currency": "USD",
                "timestamp": "2024-05-01T10:00:00Z",
            },
            {
                "id": "txn_1002",
                "merchant": "StreamFlix",
                "amount": 49.99,
                "currency": "USD",
                "timestamp": "2024-05-01T10:02:00Z",
            },
            {
                "id": "txn_0998",
                "merchant": "Corner Coffee",
                "amount": 4.5,
                "currency": "USD",
                "timestamp": "2024-04-30T08:15:00Z",
            },
        ],
    }
