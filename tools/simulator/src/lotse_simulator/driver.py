"""Drive a running platform through a planned city year, over its real HTTP APIs and the
Träger's partner topics, and record the ground truth.

Actions are taken in the order of the simulated calendar. With a clock file (the platform
started by :mod:`lotse_simulator.platform`) the platform's clock is moved to each action's
moment first, so registrations, appointments and answers carry the simulated dates; without
one (a platform on the wall clock, e.g. ``lotse up``) the plan is played in its order as fast
as the platform takes it, every action dated now, children's ages kept; visits whose
appointment lies in the future stay scheduled.

What the platform does in reply asynchronously (a visit proposed after a registration, a
referral made from a handover, an answer applied) is looked up at the end of each simulated
day (or every ``settle_days``, never across a month's end), and before any consent withdrawal
or erasure of the same family, so that the outcome never depends on which of two topics the
platform happens to read first.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from aiokafka import AIOKafkaProducer
from lotse_contracts import topics
from lotse_contracts.city import Municipality
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.partner import PartnerAnswer, PartnerReferralAnswer
from lotse_contracts.events.referrals import RejectionReason

from lotse_simulator import clock
from lotse_simulator.endpoints import Endpoints, Tokens
from lotse_simulator.plan import CityPlan, FamilyPlan, ReferralPlan, plan_digest, within_day
from lotse_simulator.truth import (
    AnswerTruth,
    ConsentTruth,
    FamilyTruth,
    ReferralTruth,
    Truth,
    VisitTruth,
)

#: Namespace of answer ids: the same answer to the same referral always has the same id.
ANSWER_NAMESPACE = uuid.UUID("0b7f3f7e-54c1-4a8e-9d0c-5f8a2b1e6c44")
LOOKUP_TIMEOUT_S = 60.0
POLL_S = (0.02, 0.5)  # first and longest pause between two looks

Progress = Callable[[str, int, int], None]
"""Called with (simulated date, families registered, families planned)."""


class PlatformRefused(RuntimeError):
    pass


@dataclass(order=True)
class _Action:
    at: datetime
    seq: int
    family: str = field(compare=False)
    kind: str = field(compare=False)
    data: dict[str, Any] = field(compare=False, default_factory=dict)


def _traeger_consent(referral: ReferralPlan, at: datetime) -> dict[str, Any]:
    """The family's traeger_contact consent for the planned module: naming the Träger, or,
    when the Familienbüro is to choose, naming none."""
    consent: dict[str, Any] = {
        "scope": "traeger_contact",
        "purpose": referral.module,
        "given_at": _iso(at),
    }
    if referral.traeger_named == "at_consent":
        consent["traeger"] = referral.traeger
    return consent


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment)


class Driver:
    """One run of a plan against one platform; :meth:`run` returns the ground truth."""

    def __init__(
        self,
        plan: CityPlan,
        city: Municipality,
        endpoints: Endpoints,
        tokens: Tokens,
        *,
        clock_file: Path | None = None,
        rate: float | None = None,
        progress: Progress | None = None,
        concurrency: int = 16,
        settle_days: int = 1,
    ) -> None:
        self.plan = plan
        self.city = city
        self.zone: ZoneInfo = city.zone()
        self.endpoints = endpoints
        self.tokens = tokens
        self.clock_file = clock_file
        self.rate = rate
        self.progress = progress
        self.settle_days = settle_days
        self.families = {f.key: f for f in plan.families}
        self.truth = Truth(
            city=plan.city, seed=plan.seed, year=plan.year, plan_digest=plan_digest(plan)
        )
        self._by_key: dict[str, FamilyTruth] = {}
        self._queue: list[_Action] = []
        self._seq = itertools.count()
        self._pending: dict[str, list[Callable[[], Awaitable[None]]]] = {}
        self._limit = asyncio.Semaphore(concurrency)
        self._registered = 0
        self._last_action = 0.0
        self._http: httpx.AsyncClient | None = None
        self.last_seen = ""
        self._producer: AIOKafkaProducer | None = None

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> Truth:
        self.truth.started_at = _iso(datetime.now(UTC))
        for family in self.plan.families:
            self._push(family.registered_at, family.key, "register")
        if self._queue:
            self.truth.sim_started_at = _iso(self._queue[0].at)
        async with httpx.AsyncClient(timeout=30.0) as http:
            self._http = http
            producer = AIOKafkaProducer(bootstrap_servers=self.endpoints.bootstrap, acks="all")
            await producer.start()
            self._producer = producer
            try:
                await self._loop()
            finally:
                await producer.stop()
        self.truth.families = [
            self._by_key[f.key] for f in self.plan.families if f.key in self._by_key
        ]
        self.truth.finished_at = _iso(datetime.now(UTC))
        self.truth.sim_finished_at = _iso(self._now())
        return self.truth

    def _push(self, at: datetime, family: str, kind: str, **data: Any) -> None:
        heapq.heappush(self._queue, _Action(at, next(self._seq), family, kind, data))

    def _now(self) -> datetime:
        if self.clock_file is not None:
            return clock.now(self.clock_file)
        return datetime.now(UTC)

    async def _loop(self) -> None:
        day_end: datetime | None = None
        while self._queue or self._pending:
            if not self._queue or (day_end is not None and self._queue[0].at >= day_end):
                await self._settle_all()
                day_end = None
                continue
            action = heapq.heappop(self._queue)
            if day_end is None:
                # Look up the platform's replies after ``settle_days`` simulated days, and
                # always before a new month: figures count by month.
                day = action.at.astimezone(self.zone).date()
                next_month = (day.replace(day=1) + timedelta(days=32)).replace(day=1)
                until = min(day + timedelta(days=self.settle_days), next_month)
                day_end = datetime.combine(until, datetime.min.time(), self.zone).astimezone(UTC)
            await self._pace()
            at = self._at(action.at)
            try:
                await getattr(self, f"_do_{action.kind}")(action.family, at, **action.data)
            except PlatformRefused as exc:
                # Recorded, not fatal: the checker then shows what the refusal left behind.
                self.truth.problems.append(f"{action.family}: {action.kind}: {exc}")
            if self.progress is not None:
                self.progress(
                    at.astimezone(self.zone).date().isoformat(),
                    self._registered,
                    len(self.families),
                )

    async def _pace(self) -> None:
        if self.rate:
            wait = self._last_action + 1.0 / self.rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_action = time.monotonic()

    def _at(self, planned: datetime) -> datetime:
        """The moment the action happens: as planned on the simulated clock (or later, if
        the platform is past it); on the wall clock, now."""
        if self.clock_file is not None:
            return clock.advance(self.clock_file, planned)
        return datetime.now(UTC)

    async def _settle_all(self) -> None:
        keys = list(self._pending)
        await asyncio.gather(*(self._settle(key) for key in keys))

    async def _settle(self, key: str) -> None:
        while self._pending.get(key):
            lookups = self._pending.pop(key)
            for lookup in lookups:
                async with self._limit:
                    await lookup()

    def _later(self, key: str, lookup: Callable[[], Awaitable[None]]) -> None:
        self._pending.setdefault(key, []).append(lookup)

    # -- HTTP ---------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: dict[str, Any] | None = None,
        *,
        ok: tuple[int, ...] = (200, 201),
    ) -> Any:
        assert self._http is not None
        answer = await self._http.request(method, url, headers=headers, json=body)
        if answer.status_code not in ok:
            raise PlatformRefused(f"{method} {url}: {answer.status_code} {answer.text[:300]}")
        return answer.json() if answer.content else None

    async def _poll(
        self, url: str, headers: dict[str, str], done: Callable[[Any], bool]
    ) -> Any | None:
        """GET ``url`` until ``done(body)``; None after the lookup timeout."""
        assert self._http is not None
        deadline = time.monotonic() + LOOKUP_TIMEOUT_S
        pause, longest = POLL_S
        self.last_seen = ""
        while time.monotonic() < deadline:
            answer = await self._http.get(url, headers=headers)
            if answer.status_code == 200:
                body = answer.json()
                if done(body):
                    return body
            self.last_seen = f"{answer.status_code} {answer.text[:200]}"
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)
        return None

    def _problem(self, family: FamilyTruth | FamilyPlan, what: str) -> None:
        self.truth.problems.append(f"{family.key}: {what}")

    # -- actions ------------------------------------------------------------------------------

    async def _do_register(self, key: str, at: datetime) -> None:
        plan = self.families[key]
        consents: list[dict[str, Any]] = []
        if plan.welcome_consent:
            consents.append({"scope": "welcome_visit", "given_at": _iso(at)})
        if plan.screening_data_use:
            consents.append({"scope": "screening_data_use", "given_at": _iso(at)})
        referral = plan.referral
        if referral is not None and referral.by == "babylotse":
            consents.append(_traeger_consent(referral, at))
        # The child's age at registration as planned, also when the platform's clock is not
        # the simulated one (the wall clock registers now).
        age = plan.registered_at.astimezone(self.zone).date() - plan.child_birth_date
        birth = at.astimezone(self.zone).date() - age
        body: dict[str, Any] = {
            "channel": plan.channel,
            "family": {
                "family_name": plan.family_name,
                "parent_given_names": [plan.parent_given_name],
            },
            "children": [{"birth_date": birth.isoformat()}] * plan.children,
            "address": {
                "street": plan.street,
                "house_number": plan.house_number,
                "postcode": plan.postcode,
            },
            "preferred_language": plan.language,
            "consents": consents,
        }
        if plan.bezirk_override:
            body["bezirk_override"] = plan.bezirk
        if plan.channel == "clinic":
            body["clinic_id"] = plan.clinic_id
            headers = self.tokens.headers("babylotse", clinic=plan.clinic_id)
        else:
            # The citizens' office sends move-in notices, as the service intake admits by name.
            headers = self.tokens.headers("service", subject="buergerbuero")
        case = await self._call("POST", f"{self.endpoints.intake}/cases", headers, body)
        self._registered += 1
        family = FamilyTruth(
            key=key,
            case_id=case["case_id"],
            channel=plan.channel,
            bezirk=case["bezirk"],
            registered_at=case["registered_at"],
            visit_outcome_planned=plan.visit_outcome,
            consents=[
                ConsentTruth(
                    consent_id=c["consent_id"],
                    scope=c["scope"],
                    traeger=c["traeger"],
                    purpose=c["purpose"],
                    given_at=c["given_at"],
                )
                for c in case["consents"]
            ],
        )
        self._by_key[key] = family
        self._later(key, lambda: self._find_first_visit(family))
        if plan.screening is not None:
            self._push(at + timedelta(minutes=5), key, "screen")
        if referral is not None and referral.by == "babylotse":
            self._push(at + timedelta(minutes=20), key, "handover")
        if plan.withdraw_welcome_after_h is not None:
            moment = within_day(at + timedelta(hours=plan.withdraw_welcome_after_h), self.zone)
            self._push(moment, key, "withdraw", scope="welcome_visit")
        if plan.erase_after_days is not None:
            moment = within_day(at + timedelta(days=plan.erase_after_days), self.zone)
            self._push(moment, key, "erase")

    async def _find_first_visit(self, family: FamilyTruth) -> None:
        """After a registration: the visits service's case, and the visit it proposed."""
        expect_visit = family.welcome_consent_in_force and family.erased_at is None

        def done(body: dict[str, Any]) -> bool:
            if body["state"] == "awaiting_registration":
                return False
            return bool(body["visits"]) or not expect_visit or body["state"] != "active"

        body = await self._poll(
            f"{self.endpoints.visits}/cases/{family.case_id}", self._office(family), done
        )
        if body is None:
            self._problem(family, "no welcome visit was scheduled")
            return
        for visit in body["visits"]:
            self._record_visit(family, visit)
        self._plan_visit_outcome(family)

    def _record_visit(self, family: FamilyTruth, visit: dict[str, Any]) -> VisitTruth:
        for known in family.visits:
            if known.visit_id == visit["visit_id"]:
                return known
        truth = VisitTruth(
            visit_id=visit["visit_id"],
            starts_at=visit["starts_at"],
            scheduled_at=visit["scheduled_at"],
            status=visit["status"],
            closed_at=visit["closed_at"],
        )
        family.visits.append(truth)
        return truth

    def _plan_visit_outcome(self, family: FamilyTruth) -> None:
        visit = family.open_visit()
        plan = self.families[family.key]
        if visit is None or not family.expects_open_visit() or plan.visit_outcome is None:
            return
        starts = _parse(visit.starts_at)
        attempt = sum(1 for v in family.visits if v.status == "missed")
        outcome = plan.visit_outcome
        if outcome == "declined":
            moment = max(starts - timedelta(hours=3), self._now())
            self._push(within_day(moment, self.zone), family.key, "decline", visit=visit.visit_id)
        elif outcome.startswith("no_show") and attempt == 0:
            self._push(starts + timedelta(hours=1), family.key, "no_show", visit=visit.visit_id)
        else:
            self._push(starts + timedelta(hours=1), family.key, "complete", visit=visit.visit_id)

    def _office(self, family: FamilyTruth) -> dict[str, str]:
        return self.tokens.headers("familienbuero", bezirk=family.bezirk)

    def _active_visit(self, family: FamilyTruth, visit_id: str) -> VisitTruth | None:
        if family.erased_at is not None or not family.welcome_consent_in_force:
            return None
        for visit in family.visits:
            if visit.visit_id == visit_id and visit.status == "scheduled":
                return visit
        return None

    async def _do_complete(self, key: str, at: datetime, visit: str) -> None:
        family = self._by_key[key]
        found = self._active_visit(family, visit)
        if found is None:
            return
        if _parse(found.starts_at) > at:
            return  # wall clock: the appointment is still to come
        completed_at = _parse(found.starts_at) + timedelta(minutes=50)
        referral = self.families[key].referral
        body = {
            "completed_at": _iso(completed_at),
            "informed_about_offers": True,
            "topics": ["health", "early_help_offers"],
            "needs_noted": referral is not None,
        }
        answer = await self._call(
            "POST", f"{self.endpoints.visits}/visits/{visit}/complete", self._office(family), body
        )
        found.status, found.closed_at = "completed", answer["closed_at"]
        if referral is not None and referral.by == "familienbuero":
            self._push(at + timedelta(minutes=10), key, "handover")

    async def _do_no_show(self, key: str, at: datetime, visit: str) -> None:
        family = self._by_key[key]
        found = self._active_visit(family, visit)
        if found is None or _parse(found.starts_at) > at:
            return
        again = self.families[key].visit_outcome == "no_show_then_completed"
        follow_up = "new_appointment_offered" if again else "no_further_attempt"
        answer = await self._call(
            "POST",
            f"{self.endpoints.visits}/visits/{visit}/no-show",
            self._office(family),
            {"follow_up": follow_up},
        )
        found.status, found.closed_at = "missed", answer["closed_at"]
        next_id = answer.get("follow_up_visit_id")
        if next_id:
            details = await self._call(
                "GET", f"{self.endpoints.visits}/visits/{next_id}", self._office(family)
            )
            self._record_visit(family, details["visit"])
            self._plan_visit_outcome(family)

    async def _do_decline(self, key: str, at: datetime, visit: str) -> None:
        family = self._by_key[key]
        found = self._active_visit(family, visit)
        if found is None:
            return
        answer = await self._call(
            "POST",
            f"{self.endpoints.visits}/visits/{visit}/decline",
            self._office(family),
            {"declined_via": "phone"},
        )
        found.status, found.closed_at = "declined", answer["closed_at"]

    async def _do_screen(self, key: str, at: datetime) -> None:
        family, plan = self._by_key[key], self.families[key]
        screening = plan.screening
        if screening is None or family.erased_at is not None:
            return
        await self._call(
            "POST",
            f"{self.endpoints.intake}/cases/{family.case_id}/screenings",
            self.tokens.headers("babylotse", clinic=plan.clinic_id),
            {
                "support_need": screening.support_need.value,
                "indicators": [i.value for i in screening.indicators],
                "wished_modules": list(screening.wished_modules),
                "instrument": "kinderstark-screening-2024",
                "assessed_at": _iso(at),
            },
        )

    async def _do_handover(self, key: str, at: datetime) -> None:
        family, plan = self._by_key[key], self.families[key]
        referral = plan.referral
        if referral is None or family.erased_at is not None:
            return
        if referral.by == "babylotse":
            headers = self.tokens.headers("babylotse", clinic=plan.clinic_id)
        else:
            headers = self._office(family)
            await self._give_traeger_consent(family, headers, _traeger_consent(referral, at))
        consent_truth = family.consent("traeger_contact")
        assert consent_truth is not None
        body: dict[str, Any] = {
            "module": referral.module,
            "consent_id": consent_truth.consent_id,
            "urgent": False,
        }
        if referral.traeger_named == "at_consent":
            body["traeger"] = referral.traeger
        handover = await self._call(
            "POST", f"{self.endpoints.intake}/cases/{family.case_id}/handovers", headers, body
        )
        family.referral = ReferralTruth(
            module=referral.module,
            traeger=referral.traeger,
            consent_id=consent_truth.consent_id,
            handover_id=handover["handover_id"],
            traeger_named=referral.traeger_named,
        )
        if referral.traeger_named == "at_consent":
            self._later(key, lambda: self._find_referral(family))
        else:
            self._later(key, lambda: self._find_wish(family, at))

    async def _give_traeger_consent(
        self, family: FamilyTruth, headers: dict[str, str], body: dict[str, Any]
    ) -> ConsentTruth:
        consent = await self._call(
            "POST", f"{self.endpoints.intake}/cases/{family.case_id}/consents", headers, body
        )
        truth = ConsentTruth(
            consent_id=consent["consent_id"],
            scope="traeger_contact",
            traeger=body.get("traeger"),
            purpose=body.get("purpose"),
            given_at=consent["given_at"],
        )
        family.consents.append(truth)
        return truth

    async def _wishes(self, family: FamilyTruth, state: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self._call(
            "GET",
            f"{self.endpoints.referrals}/bezirke/{family.bezirk}/wishes?state={state}",
            self._office(family),
        )
        return [w for w in rows if w["case_id"] == family.case_id]

    async def _find_wish(self, family: FamilyTruth, handed_over: datetime) -> None:
        """A Träger-less handover: it must wait as an open wish, visibly, with its reason."""
        referral = family.referral
        assert referral is not None

        def done(rows: list[dict[str, Any]]) -> bool:
            return any(w["source_id"] == referral.handover_id for w in rows)

        rows = await self._poll(
            f"{self.endpoints.referrals}/bezirke/{family.bezirk}/wishes?state=open",
            self._office(family),
            done,
        )
        if rows is None:
            self._problem(family, "the Träger-less handover is no open wish")
            return
        wish = next(w for w in rows if w["source_id"] == referral.handover_id)
        referral.wish_id = wish["wish_id"]
        plan = self.families[family.key].referral
        assert plan is not None
        if plan.traeger_named == "by_familienbuero" and plan.choose_after_h is not None:
            moment = within_day(handed_over + timedelta(hours=plan.choose_after_h), self.zone)
            self._push(moment, family.key, "choose")

    async def _do_choose(self, key: str, at: datetime) -> None:
        """The Familienbüro chooses the Träger: the family's consent naming it first (the
        consent gate), then the wish is placed with it."""
        family = self._by_key[key]
        referral = family.referral
        await self._settle(key)
        if referral is None or referral.wish_id is None or family.erased_at is not None:
            return
        consent = await self._give_traeger_consent(
            family,
            self._office(family),
            {
                "scope": "traeger_contact",
                "traeger": referral.traeger,
                "purpose": referral.module,
                "given_at": _iso(at),
            },
        )
        referral.consent_id = consent.consent_id
        self._later(key, lambda: self._place_wish(family))

    async def _place_wish(self, family: FamilyTruth) -> None:
        """Place the wish with the chosen Träger. The consent reaches referrals as an event,
        which may place the wish by itself first: either way it ends as a referral."""
        referral = family.referral
        assert referral is not None
        assert referral.wish_id is not None
        assert self._http is not None
        deadline = time.monotonic() + LOOKUP_TIMEOUT_S
        pause, longest = POLL_S
        while time.monotonic() < deadline:
            placed = [w for w in await self._wishes(family, "placed") if w["referral_id"]]
            found = next((w for w in placed if w["wish_id"] == referral.wish_id), None)
            if found is not None:
                row = await self._call(
                    "GET",
                    f"{self.endpoints.referrals}/referrals/{found['referral_id']}",
                    self._office(family),
                )
                self._follow(family, row)
                return
            answer = await self._http.post(
                f"{self.endpoints.referrals}/wishes/{referral.wish_id}/placement",
                headers=self._office(family),
                json={"traeger": referral.traeger},
            )
            self.last_seen = f"{answer.status_code} {answer.text[:200]}"
            if answer.status_code not in (201, 409):
                break
            if answer.status_code == 409:  # the consent is not there yet, or placed meanwhile
                await asyncio.sleep(pause)
                pause = min(pause * 2, longest)
        self._problem(family, f"the wish was not placed: {self.last_seen}")

    async def _find_referral(self, family: FamilyTruth) -> None:
        referral = family.referral
        assert referral is not None

        def done(rows: list[dict[str, Any]]) -> bool:
            return any(r["handover_id"] == referral.handover_id for r in rows)

        rows = await self._poll(
            f"{self.endpoints.referrals}/cases/{family.case_id}/referrals",
            self._office(family),
            done,
        )
        if rows is None:
            self._problem(family, "the handover did not become a referral")
            return
        self._follow(family, next(r for r in rows if r["handover_id"] == referral.handover_id))

    def _follow(self, family: FamilyTruth, row: dict[str, Any]) -> None:
        """The referral exists: record it and plan the Träger's answers and a withdrawal."""
        referral = family.referral
        assert referral is not None
        referral.referral_id = row["referral_id"]
        referral.requested_at = row["requested_at"]
        requested = _parse(row["requested_at"])
        plan = self.families[family.key].referral
        assert plan is not None
        for step in plan.answers:
            moment = within_day(requested + timedelta(hours=step.after_h), self.zone)
            reason = step.reason.value if step.reason else None
            self._push(moment, family.key, "answer", answer=step.answer.value, reason=reason)
        if plan.withdraw_after_h is not None:
            moment = within_day(requested + timedelta(hours=plan.withdraw_after_h), self.zone)
            self._push(moment, family.key, "withdraw", scope="traeger_contact")

    async def _do_answer(self, key: str, at: datetime, answer: str, reason: str | None) -> None:
        family = self._by_key[key]
        referral = family.referral
        if referral is None or referral.referral_id is None or family.erased_at is not None:
            return
        if referral.expected_status not in ("requested", "received", "accepted", "in-progress"):
            return  # cancelled (or closed): the Träger stops working with the family
        model = PartnerReferralAnswer(
            referral_id=referral.referral_id,
            case_id=family.case_id,
            traeger=referral.traeger,
            answer=PartnerAnswer(answer),
            reason=RejectionReason(reason) if reason else None,
            occurred_at=at,
        )
        event = model.to_cloudevent(
            event_id=str(uuid.uuid5(ANSWER_NAMESPACE, f"{referral.referral_id}/{answer}"))
        )
        record = to_kafka_binary(event)
        assert self._producer is not None
        await self._producer.send_and_wait(
            self.endpoints.topic_prefix + topics.partner_responses(referral.traeger),
            value=record.value,
            key=record.key,
            headers=record.headers,
        )
        referral.apply_answer(AnswerTruth(answer=answer, at=_iso(at), reason=reason))
        self._later(key, lambda: self._await_referral(family))

    async def _await_referral(self, family: FamilyTruth) -> None:
        """Wait until the referral is as the truth says now: answers sent since this lookup
        was queued (first contact and start on one day) count, not only the one queuing it."""
        referral = family.referral
        assert referral is not None
        assert referral.referral_id is not None
        status, contact = referral.expected_status, referral.first_contact

        def done(body: dict[str, Any]) -> bool:
            return bool(
                body["status"] == status and (not contact or body["first_contact_at"] is not None)
            )

        found = await self._poll(
            f"{self.endpoints.referrals}/referrals/{referral.referral_id}",
            self._office(family),
            done,
        )
        if found is None:
            self._problem(family, f"referral did not reach {status}: {self.last_seen}")

    async def _do_withdraw(self, key: str, at: datetime, scope: str) -> None:
        family = self._by_key[key]
        await self._settle(key)  # earlier answers first: they race the withdrawal otherwise
        consent = family.consent(scope)
        if consent is None or consent.withdrawn_at is not None or family.erased_at is not None:
            return
        await self._call(
            "POST",
            f"{self.endpoints.intake}/cases/{family.case_id}/consents/{consent.consent_id}/withdraw",
            self._office(family),
            {"withdrawn_at": _iso(at)},
        )
        consent.withdrawn_at = _iso(at)
        if scope == "welcome_visit":
            for visit in family.visits:
                if visit.status == "scheduled":
                    visit.status, visit.closed_at = "cancelled", _iso(at)
        elif family.referral is not None and family.referral.consent_id == consent.consent_id:
            family.referral.cancel(_iso(at))
            self._later(key, lambda: self._await_cancelled(family))

    async def _do_erase(self, key: str, at: datetime) -> None:
        family = self._by_key[key]
        await self._settle(key)
        if family.erased_at is not None:
            return
        # Four eyes: one data-protection officer records the family's request, a second
        # one confirms it, and only then is the family erased.
        requested = await self._call(
            "POST",
            f"{self.endpoints.intake}/cases/{family.case_id}/erasure",
            self.tokens.headers("dpo"),
            {"reason": "request", "note": f"Antrag der Familie vom {at:%d.%m.%Y}"},
            ok=(202,),
        )
        await self._call(
            "POST",
            f"{self.endpoints.intake}/cases/{family.case_id}/erasure/"
            f"{requested['request_id']}/confirm",
            self.tokens.headers("dpo", subject="sim-dpo-2"),
        )
        family.erased_at = _iso(at)
        for visit in family.visits:
            if visit.status == "scheduled":
                visit.status, visit.closed_at = "cancelled", _iso(at)
        if family.referral is not None:
            family.referral.cancel(_iso(at))
        self._later(key, lambda: self._await_cancelled(family))

    async def _await_cancelled(self, family: FamilyTruth) -> None:
        """Wait until withdrawal or erasure reached visits and referrals (same sim day)."""

        def no_open_visit(body: dict[str, Any]) -> bool:
            return not any(v["status"] == "scheduled" for v in body["visits"])

        if not family.expects_open_visit():
            await self._poll(
                f"{self.endpoints.visits}/cases/{family.case_id}",
                self._office(family),
                no_open_visit,
            )
        referral = family.referral
        if referral is not None and referral.referral_id is not None:
            await self._await_referral(family)
