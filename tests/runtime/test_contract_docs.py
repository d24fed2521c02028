"""Self-describing contracts (issue 18): an event's ``dataschema`` is an absolute URI below
the configured contracts base URL, the service serves exactly that document (public,
read-only, ``application/schema+json``, the committed bytes), and the event's data validates
against it. Readers still take events naming the old repository path.

In process: the referrals service on the real database, its HTTP API through ASGI."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from jsonschema import Draft202012Validator, FormatChecker
from lotse_contracts.events.base import SCHEMA_DIR
from lotse_referrals.settings import ReferralsSettings
from lotse_referrals.tables import Referral
from lotse_runtime.outbox import OutboxMessage
from pydantic import ValidationError

from tests.referrals.helpers import Family
from tests.referrals.test_referrals_handlers import handover
from tests.referrals.test_referrals_wishes import service

CONTRACTS = Path(__file__).resolve().parents[2] / "contracts"
BASE = "https://lotse.example/stadt-dortmund/contracts"
REQUESTED = "de.lotse.referrals.referral-requested.v1"


def _headers(row: OutboxMessage) -> dict[str, str]:
    return dict(json.loads(row.headers))


async def test_a_produced_event_names_a_schema_the_service_serves(
    database_url: str, topic_prefix: str
) -> None:
    async with service(database_url, topic_prefix, contracts_base_url=BASE + "/") as svc:
        family = Family()
        await svc.register(family)
        assert await svc.main.send(handover(family)) == "ok"
        rows = await svc.outbox(REQUESTED)
        [domain] = [r for r in rows if r.topic == f"{topic_prefix}lotse.referrals"]
        dataschema = _headers(domain)["ce_dataschema"]
        assert dataschema == f"{BASE}/schemas/{REQUESTED}.json"
        # A feed copy names the same schema, or none when cut below its required fields.
        for row in rows:
            assert _headers(row).get("ce_dataschema", dataschema) == dataschema

        # Exactly that path, without a token, answers the committed schema.
        answer = await svc.http.get(urlsplit(dataschema).path)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/schema+json"
        committed = (CONTRACTS / "schemas" / f"{REQUESTED}.json").read_bytes()
        assert answer.content == committed
        schema = answer.json()
        data = json.loads(domain.value or b"null")
        validator = Draft202012Validator(schema, format_checker=FormatChecker())
        assert [e.message for e in validator.iter_errors(data)] == []
        # ... and the schema says something: data without its referral id fails.
        broken = {k: v for k, v in data.items() if k != "referral_id"}
        assert list(validator.iter_errors(broken))

        # The AsyncAPI document sits next to the schemas it refers to.
        asyncapi = await svc.http.get("/stadt-dortmund/contracts/asyncapi.json")
        assert asyncapi.status_code == 200
        assert asyncapi.headers["content-type"] == "application/json"
        assert asyncapi.content == (CONTRACTS / "asyncapi.json").read_bytes()
        message = asyncapi.json()["components"]["messages"][REQUESTED]
        assert message["payload"] == {"$ref": f"./schemas/{REQUESTED}.json"}


async def test_the_documents_are_read_only_and_unknown_ones_are_named(
    database_url: str, topic_prefix: str
) -> None:
    async with service(database_url, topic_prefix, contracts_base_url=BASE) as svc:
        path = f"/stadt-dortmund/contracts/schemas/{REQUESTED}.json"
        assert (await svc.http.head(path)).status_code == 200
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            refused = await svc.http.request(method, path, json={})
            assert refused.status_code == 405, method
        missing = await svc.http.get("/stadt-dortmund/contracts/schemas/de.lotse.x.y.v9.json")
        assert missing.status_code == 404
        assert missing.json()["errors"][0]["field"] == "name"
        # Not below the configured path: nothing there.
        assert (await svc.http.get(f"/contracts/schemas/{REQUESTED}.json")).status_code == 404
        example = await svc.http.get(f"/stadt-dortmund/contracts/examples/{REQUESTED}.json")
        assert example.json()["type"] == REQUESTED


async def test_without_a_base_the_service_names_its_own_address(
    database_url: str, topic_prefix: str
) -> None:
    async with service(database_url, topic_prefix, http_port=8123) as svc:
        family = Family()
        await svc.register(family)
        assert await svc.main.send(handover(family)) == "ok"
        rows = await svc.outbox(REQUESTED)
        [domain] = [r for r in rows if r.topic == f"{topic_prefix}lotse.referrals"]
        dataschema = _headers(domain)["ce_dataschema"]
        assert dataschema == f"http://127.0.0.1:8123/contracts/schemas/{REQUESTED}.json"
        assert (await svc.http.get(urlsplit(dataschema).path)).status_code == 200


async def test_events_naming_the_old_path_or_another_base_are_still_read(
    database_url: str, topic_prefix: str
) -> None:
    async with service(database_url, topic_prefix) as svc:
        old, elsewhere = Family(), Family()
        for family, base in ((old, None), (elsewhere, "https://hamm.example/contracts")):
            registered = family.registered().to_cloudevent(schema_base=base)
            assert await svc.main.send(registered) == "ok"
            sent = handover(family).to_cloudevent(schema_base=base)
            assert sent.dataschema is not None
            assert sent.dataschema.startswith(base or SCHEMA_DIR)
            svc.keyring.families[family.case_id] = family.in_keyring()
            assert await svc.main.send(sent) == "ok"
        for family in (old, elsewhere):
            assert await svc.rows(Referral, case_id=family.case_id)


@pytest.mark.parametrize(
    "base",
    ["lotse.example/contracts", "ftp://lotse.example/contracts", "https://x/c?v=1", "/contracts"],
)
def test_a_base_that_is_no_absolute_http_url_is_refused(base: str) -> None:
    with pytest.raises(ValidationError, match="contracts_base_url"):
        ReferralsSettings(contracts_base_url=base)
