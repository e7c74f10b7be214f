"""What a customer and a reviewer are told, against what the workflow did."""

from __future__ import annotations

from typing import Any

import httpx

from support_cases.runtime import Runtime
from tests.support.effects import provider_calls


def _charge(tx_id: str, amount: float, currency: str, at: str) -> dict[str, Any]:
    return {
        "id": tx_id,
        "merchant": "Globetrotter Air",
        "amount": amount,
        "currency": currency,
        "timestamp": at,
    }


async def test_an_approved_refund_in_several_currencies_is_not_one_sum_without_a_currency(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, reviewer: dict[str, str]
) -> None:
    body = {
        "case_id": case_id,
        "customer_id": "cust-mixed",
        "text": "I was charged twice in dollars and twice in yen",
        "transactions": [
            _charge("u1", 300.0, "USD", "2024-05-01T10:00:00Z"),
            _charge("u2", 300.0, "USD", "2024-05-01T10:01:00Z"),
            _charge("j1", 300.0, "JPY", "2024-05-01T10:00:00Z"),
            _charge("j2", 300.0, "JPY", "2024-05-01T10:01:00Z"),
        ],
    }
    response = await client.post("/api/cases", json=body)
    assert response.status_code == 201, response.text
    escalated = response.json()
    assert escalated["status"] == "awaiting_review"
    # The reviewer is shown what each currency's refund would be, not their sum alone.
    assert escalated["awaiting_review"]["amounts"] == {"JPY": 300.0, "USD": 300.0}
    decided = await client.post(
        f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer
    )
    assert decided.status_code == 200, decided.text
    case = decided.json()
    # 300 USD and 300 JPY are refunded as such: not as "600" in no currency.
    assert case["refund"]["status"] == "issued"
    assert case["refund"]["amounts"] == {"JPY": 300.0, "USD": 300.0}
    assert "refunded 300.00 JPY and 300.00 USD" in case["final_response"]
    [call] = await provider_calls(runtime, case_id, "refund")
    assert call["request"]["amounts"] == {"JPY": 300.0, "USD": 300.0}
