"""Pure rules of webhook delivery, and the partner kit's receiver against the library."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from lotse_contracts.city import load_city
from lotse_contracts.events.referrals import ReferralRequested
from lotse_contracts.subscriptions import load_registry
from lotse_delivery import domain
from lotse_delivery.app import create_app
from lotse_delivery.settings import DeliverySettings
from lotse_delivery.tables import SubscriptionCreate
from lotse_runtime.refusal import Refusal
from standardwebhooks.webhooks import Webhook

from examples.webhook_receiver import InvalidSignature, verify
from tests.delivery.helpers import TRAEGER, referral

REGISTRY = load_registry(load_city("dortmund"))
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a test value, signs nothing real
REQUESTED = "de.lotse.referrals.referral-requested.v1"


def body(**values: object) -> SubscriptionCreate:
    return SubscriptionCreate.model_validate({"sink": "https://partner.example/hook", **values})


def test_a_traeger_gets_its_registry_types_and_nothing_beyond() -> None:
    owner = domain.Owner("traeger", TRAEGER)
    domain.check_within_ceiling(REGISTRY, owner, body(types=[REQUESTED]))
    with pytest.raises(Refusal) as refused:
        domain.check_within_ceiling(
            REGISTRY, owner, body(types=["de.lotse.visits.visit-scheduled.v1"])
        )
    assert refused.value.field == "types.0"
    assert "not an event type the subscription registry gives" in refused.value.reason
    with pytest.raises(Refusal) as refused:
        domain.check_within_ceiling(
            REGISTRY, owner, body(types=[REQUESTED], fields=["referral_id", "handover_id"])
        )
    assert refused.value.field == "fields.1"


def test_a_bezirksteam_filters_only_its_own_bezirk() -> None:
    owner = domain.Owner("bezirksteam", "hoerde")
    types = ["de.lotse.visits.visit-overdue.v1"]
    domain.check_within_ceiling(
        REGISTRY, owner, body(types=types, filters=[{"exact": {"bezirk": "hoerde"}}])
    )
    with pytest.raises(Refusal) as refused:
        domain.check_within_ceiling(
            REGISTRY, owner, body(types=types, filters=[{"exact": {"bezirk": "eving"}}])
        )
    assert refused.value.field == "filters.0.exact.bezirk"
    with pytest.raises(Refusal):
        domain.check_within_ceiling(
            REGISTRY, owner, body(types=types, filters=[{"exact": {"module": "nope"}}])
        )


@pytest.mark.parametrize(
    ("url", "policy", "addresses", "reason"),
    [
        ("http://partner.example/hook", "production", ["93.184.216.34"], "https"),
        ("https://partner.example/hook", "production", ["10.1.2.3"], "private"),
        ("https://partner.example/hook", "production", ["169.254.169.254"], "link-local"),
        ("https://127.0.0.1:8443/hook", "production", ["127.0.0.1"], "loopback"),
        ("https://partner.example/hook", "production", ["::ffff:192.168.1.1"], "private"),
        ("https://partner.example/hook", "production", ["100.64.0.1"], "shared"),
        ("http://partner.example/hook", "development", ["93.184.216.34"], "https"),
        ("https://user:pw@partner.example/hook", "production", ["93.184.216.34"], "user"),
        ("ftp://partner.example/hook", "production", ["93.184.216.34"], "https"),
    ],
)
def test_sinks_are_refused_with_a_reason(
    url: str, policy: domain.SinkPolicy, addresses: list[str], reason: str
) -> None:
    with pytest.raises(Refusal) as refused:
        domain.check_sink(domain.parse_sink(url), policy, addresses)
    assert refused.value.field == "sink"
    assert reason in refused.value.reason


def test_loopback_http_only_in_development() -> None:
    sink = domain.parse_sink("http://127.0.0.1:9000/hook")
    domain.check_sink(sink, "development", ["127.0.0.1"])
    domain.check_sink(
        domain.parse_sink("https://partner.example/h"), "production", ["93.184.216.34"]
    )
    with pytest.raises(Refusal):
        domain.check_sink(sink, "production", ["127.0.0.1"])


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    delays = [domain.backoff_s(n, base_s=1, max_s=60, rand=lambda: 1.0) for n in range(1, 9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert domain.backoff_s(3, base_s=1, max_s=60, rand=lambda: 0.0) == 2  # half is jitter
    assert domain.backoff_s(1, base_s=1, max_s=60, asked_s=30, rand=lambda: 0.0) == 30
    assert domain.backoff_s(1, base_s=1, max_s=60, asked_s=9999, rand=lambda: 0.0) == 60
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert domain.retry_after("7", now) == 7
    assert domain.retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now) == 30
    assert domain.retry_after("soon", now) is None


def test_failure_budget() -> None:
    now = datetime(2026, 1, 2, tzinfo=UTC)
    kw = {"now": now, "max_attempts": 5, "max_s": 3600.0}
    assert domain.budget_spent(consecutive_failures=4, failing_since=now, **kw) is None  # type: ignore[arg-type]
    assert domain.budget_spent(consecutive_failures=5, failing_since=now, **kw)  # type: ignore[arg-type]
    since = datetime(2026, 1, 1, 22, tzinfo=UTC)
    assert domain.budget_spent(consecutive_failures=1, failing_since=since, **kw)  # type: ignore[arg-type]


def test_filters_and_binary_rendering() -> None:
    event = referral().to_cloudevent()
    assert domain.matches([{"exact": {"traeger": TRAEGER}}], event)
    assert domain.matches(
        [{"any": [{"exact": {"bezirk": "eving"}}, {"exact": {"bezirk": "hoerde"}}]}], event
    )
    assert isinstance(event.data, dict)
    module = event.data["module"]
    assert domain.matches([{"exact": {"module": module}}], event)
    assert not domain.matches([{"exact": {"module": module + "-other"}}], event)
    headers, _raw = domain.render_http(event, "binary")
    assert headers["ce-id"] == event.id
    assert headers["ce-type"] == event.type
    assert headers["content-type"] == "application/json"
    structured, _ = domain.render_http(event, "structured")
    assert structured["content-type"] == "application/cloudevents+json"


def test_the_example_receiver_verifies_the_library_signature_and_rejects_the_rest() -> None:
    payload = b'{"a":1}'
    now = datetime.now(UTC)
    headers = {
        "webhook-id": "evt-1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(SECRET).sign("evt-1", now, payload),
    }
    assert verify([SECRET], headers, payload) == "evt-1"
    other = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
    with pytest.raises(InvalidSignature, match="no matching"):
        verify([other], headers, payload)
    with pytest.raises(InvalidSignature, match="no matching"):
        verify([SECRET], headers, payload + b" ")
    with pytest.raises(InvalidSignature, match="tolerance"):
        verify([SECRET], headers, payload, now=time.time() + 3600)
    # During a rotation both secrets sign; either one verifies.
    both = dict(headers, **{"webhook-signature": headers["webhook-signature"] + " v1,bm9wZQ=="})
    assert verify([SECRET], both, payload) == "evt-1"


def test_the_openapi_document_describes_every_header_a_webhook_carries(tmp_path: Path) -> None:
    app = create_app(DeliverySettings(data_dir=tmp_path, database_url="sqlite+aiosqlite://"))
    webhook = app.openapi()["webhooks"]["lotse-event"]["post"]
    documented = {p["name"] for p in webhook["parameters"] if p["in"] == "header"}
    assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= documented
    assert {"application/json", "application/cloudevents+json"} == set(
        webhook["requestBody"]["content"]
    )
    # What the worker puts on the wire (binary mode) is all documented.
    headers, _ = domain.render_http(ReferralRequested.example().to_cloudevent(), "binary")
    sent = set(headers) - {"content-type"}
    assert sent <= documented, sent - documented
