"""The runtime's shared shape: typed handler registration, one refusal mapping, one role
map, and feeding a service's consumer in process (real database, inbox and outbox, no
broker)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from lotse_contracts.events.common import Role as EventRole
from lotse_contracts.events.intake import FamilyErased, FamilyRegistered
from lotse_runtime.app import ServiceRuntime, create_service_app
from lotse_runtime.consumer import Delivery
from lotse_runtime.handlers import Handlers
from lotse_runtime.identity import Role, event_role
from lotse_runtime.policy import AccessPolicy, allow
from lotse_runtime.refusal import Conflict, Refusal, Unavailable
from lotse_runtime.settings import ServiceSettings
from lotse_runtime.testing import InProcessFeed, without_broker
from lotse_visits.app import create_app as create_visits
from lotse_visits.settings import VisitsSettings
from sqlalchemy import text

from tests.support import bearer
from tests.visits.harness import Clock, erased, registered


async def test_a_handler_gets_the_model_it_was_registered_for() -> None:
    handlers = Handlers()
    seen: list[str] = []

    @handlers.on(FamilyRegistered)
    async def family_registered(delivery: Delivery[FamilyRegistered]) -> None:
        seen.append(delivery.data.case_id)

    assert list(handlers) == [FamilyRegistered.event_type]
    event = registered()
    delivery: Delivery[Any] = Delivery(
        event=event.to_cloudevent(),
        data=event,
        session=None,  # type: ignore[arg-type]
        outbox=None,  # type: ignore[arg-type]
        topic="t",
        partition=0,
        offset=0,
    )
    await handlers[FamilyRegistered.event_type](delivery)
    assert seen == [event.case_id]
    # What the catalogue parsed must be what the handler asked for: checked once, here.
    wrong = Delivery(**{**delivery.__dict__, "data": erased(event.case_id)})
    with pytest.raises(TypeError, match="FamilyErased"):
        await handlers[FamilyRegistered.event_type](wrong)
    with pytest.raises(ValueError, match="registered already"):
        handlers.on(FamilyRegistered)(family_registered)


def test_refusals_have_one_shape_in_every_service(tmp_path: Any) -> None:
    router = APIRouter()

    def raising(exc: Exception) -> Callable[[], Awaitable[None]]:
        async def route() -> None:
            raise exc

        return route

    cases: dict[str, tuple[Exception, int]] = {
        "/invalid": (Refusal("birth_date", "lies in the future"), 422),
        "/conflict": (Conflict("step", "the referral is completed"), 409),
        "/gone": (Refusal("case_id", "erased", status=410), 410),
        "/later": (Unavailable("keyring not reachable"), 503),
    }
    for path, (exc, _status) in cases.items():
        router.add_api_route(path, raising(exc), methods=["GET"])
    settings = ServiceSettings(
        service_name="probe", database_url=f"sqlite:///{tmp_path}/probe.db", create_topics=False
    )
    policy = AccessPolicy({f"GET {path}": allow(Role.dpo) for path in cases})
    app = create_service_app(settings, title="p", description="", routers=[router], policy=policy)
    app.state.runtime.with_broker = False
    with TestClient(app) as client:
        for path, (exc, status) in cases.items():
            answer = client.get(path, headers=bearer("dpo", subject="d"))
            assert answer.status_code == status, path
            if isinstance(exc, Refusal):
                assert answer.json() == {
                    "detail": exc.reason,
                    "errors": [{"field": exc.field, "reason": exc.reason}],
                }
            else:
                assert answer.headers["Retry-After"] == "2"
                assert "keyring not reachable" in answer.json()["detail"]


def test_one_role_map_for_every_service() -> None:
    assert event_role(Role.babylotse) is EventRole.BABYLOTSE
    assert event_role(Role.traeger) is EventRole.TRAEGER
    assert event_role(Role.service) is EventRole.SYSTEM
    assert event_role(Role.dpo) is EventRole.SYSTEM
    citizens = event_role(Role.service, service_acts_as=EventRole.CITIZENS_OFFICE)
    assert citizens is EventRole.CITIZENS_OFFICE
    # Only a service speaks for someone else; a person is always their own role.
    assert event_role(Role.familienbuero, service_acts_as=EventRole.CITIZENS_OFFICE) is (
        EventRole.FAMILIENBUERO
    )


async def test_events_fed_in_process_take_the_runtime_path(sqlite_url: str) -> None:
    """A record fed without a broker is parsed, claimed in the inbox, handled in one
    transaction with its outbox rows, deduplicated on redelivery and dead-lettered when bad."""
    settings = VisitsSettings(
        database_url=sqlite_url,
        kafka_bootstrap="127.0.0.1:1",  # nothing listens: the test must not need a broker
        consumer_backoff_s=0.01,
        overdue_check_interval_s=3600,
    )
    app = create_visits(settings, clock=Clock())
    async with without_broker(app) as runtime:
        typed: ServiceRuntime[Any] = runtime
        feed = InProcessFeed(typed, "main")
        event = registered()
        assert await feed.send(event, event_id="e-1") == "ok"
        assert await feed.send(event, event_id="e-1") == "duplicate"
        async with runtime.db.transaction() as session:
            visits = (
                await session.execute(
                    text("SELECT status FROM visits_visit WHERE case_id = :c"), {"c": event.case_id}
                )
            ).all()
            outbox = (
                await session.execute(
                    text("SELECT event_type FROM outbox WHERE record_key = :c"),
                    {"c": event.case_id},
                )
            ).all()
        assert [v[0] for v in visits] == ["scheduled"]
        # One event, on the domain topic and the Bezirk feed, committed with the visit.
        assert {o[0] for o in outbox} == {"de.lotse.visits.visit-scheduled.v1"}
        # Not the broker's business, but the consumer's: a broken record is dead-lettered
        # with its reason and the next one is applied.
        assert await feed.send_raw(b"{not json", [("ce_type", b"x")]) == "dead_lettered"
        assert feed.dead_letters[-1].stage == "envelope"
        assert await feed.send(FamilyErased(**erased(event.case_id).model_dump())) == "ok"
        assert feed.consumer.processed == 2


async def test_a_refusal_in_a_handler_dead_letters_the_event_with_field_and_reason(
    sqlite_url: str,
) -> None:
    handlers = Handlers()

    @handlers.on(FamilyRegistered)
    async def refuse(delivery: Delivery[FamilyRegistered]) -> None:
        raise Conflict("bezirk", "no Familienbüro for this Stadtbezirk")

    def wire(runtime: ServiceRuntime[ServiceSettings]) -> None:
        runtime.add_consumer("main", ["lotse.intake"], handlers)

    settings = ServiceSettings(service_name="probe", database_url=sqlite_url)
    app = create_service_app(settings, title="p", description="", wire=wire)
    async with without_broker(app) as runtime:
        feed = InProcessFeed(runtime, "main")
        assert await feed.send(registered(), event_id="r-1") == "dead_lettered"
        [letter] = feed.dead_letters
        assert (letter.event_id, letter.stage) == ("r-1", "rejected")
        assert letter.reason == "bezirk: no Familienbüro for this Stadtbezirk"
        assert feed.consumer.processed == 0
