"""Compare the ground truth of a run with the platform's final state, over its APIs.

* Welcome visits (visits service, token of the family's Familienbüro): the family's visits
  are exactly those the truth records, each in the recorded status; a family with its
  welcome-visit consent in force has at most one completed and at most one scheduled
  visit; an erased family or one that withdrew the consent has none scheduled.
* Referrals (referrals service, token of the family's Familienbüro): exactly the truth's
  referral, in the status the Träger's answers, withdrawals and erasures imply, first
  contact as confirmed.
* Every wish ends somewhere (referrals, token of the family's Familienbüro): each handover
  the simulator made is a wish that became the truth's referral, or is still an open wish
  listed for the Familienbüro with what it waits for and why (escalated to the Bezirksteam
  or not yet), or was dropped because the family withdrew its consent or was erased.
  Anything else fails, naming the family, its wish and its handover.
* Consents and erasure (intake, ``dpo`` token): each consent given or withdrawn as recorded,
  the family erased exactly when the truth says so.
* Key figures (reporting, ``analyst`` token): every published count of
  :data:`~lotse_simulator.truth.CHECKED_FIGURES` per Stadtbezirk (and city) and month (and
  year) equals the count computed from the truth; suppressed cells (k-anonymity) are skipped.

The platform settles asynchronously, so :func:`check` repeats the comparison until it holds
or ``timeout_s`` has passed, and reports the last differences.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from lotse_simulator.endpoints import Endpoints, Tokens
from lotse_simulator.truth import CHECKED_FIGURES, FamilyTruth, Truth, expected_kpis


@dataclass
class CheckReport:
    families: int = 0
    referrals: int = 0
    wishes: dict[str, int] = field(default_factory=dict)
    """Handovers by where they ended: placed, open, escalated, dropped."""
    kpi_cells_compared: int = 0
    kpi_cells_suppressed: int = 0
    family_mismatches: dict[str, list[str]] = field(default_factory=dict)
    kpi_mismatches: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def mismatches(self) -> list[str]:
        found = [
            f"{key}: {what}" for key, items in self.family_mismatches.items() for what in items
        ]
        return found + self.kpi_mismatches

    @property
    def ok(self) -> bool:
        return not self.family_mismatches and not self.kpi_mismatches

    def summary(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        ends = ", ".join(f"{n} {where}" for where, n in sorted(self.wishes.items()))
        lines = [
            f"{verdict}: {self.families} families, {self.referrals} referrals, "
            f"wishes: {ends or 'none'}, "
            f"{self.kpi_cells_compared} key-figure cells compared "
            f"({self.kpi_cells_suppressed} suppressed, skipped) in {self.elapsed_s:.1f} s",
        ]
        mismatches = self.mismatches
        lines += [f"  - {m}" for m in mismatches[:40]]
        if len(mismatches) > 40:
            lines.append(f"  ... and {len(mismatches) - 40} more")
        return "\n".join(lines)


class _Api:
    def __init__(self, http: httpx.AsyncClient, endpoints: Endpoints, tokens: Tokens) -> None:
        self.http = http
        self.endpoints = endpoints
        self.tokens = tokens

    async def get(self, url: str, role: str, *, bezirk: str | None = None) -> Any:
        answer = await self.http.get(url, headers=self.tokens.headers(role, bezirk=bezirk))
        if answer.status_code != 200:
            raise LookupError(f"GET {url}: {answer.status_code} {answer.text[:200]}")
        return answer.json()


async def _check_family(api: _Api, family: FamilyTruth) -> list[str]:
    problems: list[str] = []
    ends = api.endpoints
    try:
        office = {"bezirk": family.bezirk}
        case = await api.get(f"{ends.visits}/cases/{family.case_id}", "familienbuero", **office)
        referrals = await api.get(
            f"{ends.referrals}/cases/{family.case_id}/referrals", "familienbuero", **office
        )
        consents = await api.get(f"{ends.intake}/cases/{family.case_id}/consents", "dpo")
        erasure = await api.get(f"{ends.intake}/cases/{family.case_id}/erasure", "dpo")
    except (LookupError, httpx.HTTPError) as exc:
        return [str(exc)]

    # Welcome visits.
    seen = {v["visit_id"]: v["status"] for v in case["visits"]}
    wanted = {v.visit_id: v.status for v in family.visits}
    if seen != wanted:
        problems.append(f"visits {seen} != expected {wanted}")
    statuses = list(seen.values())
    if family.expects_open_visit():
        if statuses.count("completed") > 1 or statuses.count("scheduled") > 1:
            problems.append(f"more than one welcome visit: {statuses}")
    elif "scheduled" in statuses:
        problems.append("a visit is still scheduled for an erased or withdrawn family")

    # Referral.
    referral = family.referral
    expected_ids = {referral.referral_id} if referral and referral.referral_id else set()
    if {r["referral_id"] for r in referrals} != expected_ids:
        problems.append(f"referrals {[r['referral_id'] for r in referrals]} != {expected_ids}")
    elif referral is not None and referral.referral_id is not None:
        row = referrals[0]
        if row["status"] != referral.expected_status:
            problems.append(
                f"referral {referral.referral_id} is {row['status']}, "
                f"expected {referral.expected_status}"
            )
        if (row["first_contact_at"] is not None) != referral.first_contact:
            problems.append(f"referral first contact {row['first_contact_at']!r}")

    # Consents and erasure.
    states = {c["consent_id"]: c["state"] for c in consents}
    for consent in family.consents:
        if states.get(consent.consent_id) != consent.state:
            problems.append(
                f"consent {consent.scope} is {states.get(consent.consent_id)}, "
                f"expected {consent.state}"
            )
    if bool(erasure["erased"]) != (family.erased_at is not None):
        problems.append(f"erased={erasure['erased']}, expected {family.erased_at is not None}")
    return problems


#: A wish as listed for its Familienbüro, by the handover it came from.
Wishes = dict[str, dict[str, Any]]


async def _wishes(api: _Api, truth: Truth) -> Wishes:
    """Every wish of the Bezirke the truth's handovers are in, in each state."""
    found: Wishes = {}
    bezirke = sorted({f.bezirk for f in truth.families if f.referral is not None})
    for bezirk in bezirke:
        for state in ("open", "placed", "dropped"):
            rows = await api.get(
                f"{api.endpoints.referrals}/bezirke/{bezirk}/wishes?state={state}",
                "familienbuero",
                bezirk=bezirk,
            )
            found.update({row["source_id"]: row for row in rows})
    return found


def _wish_end(family: FamilyTruth, wishes: Wishes) -> tuple[str | None, str | None]:
    """Where the family's handover ended (placed, open, escalated, dropped), or why it
    did not end anywhere acceptable."""
    referral = family.referral
    assert referral is not None
    wish = wishes.get(referral.handover_id)
    named = f"wish {referral.wish_id or '?'} of handover {referral.handover_id}"
    if wish is None:
        return None, f"{named}: no referral, no open-wish entry, no escalation"
    named = f"wish {wish['wish_id']} of handover {referral.handover_id}"
    if wish["state"] == "placed":
        if referral.referral_id is not None and wish["referral_id"] == referral.referral_id:
            return "placed", None
        return None, (
            f"{named}: placed as referral {wish['referral_id']}, expected "
            f"{referral.referral_id or 'an open wish'}"
        )
    if referral.referral_id is not None:
        return None, f"{named} is {wish['state']}, expected referral {referral.referral_id}"
    if wish["state"] == "open":
        if not wish.get("waiting_for") or not wish.get("problem"):
            return None, f"{named} is open without saying what it waits for"
        return ("escalated" if wish.get("escalated_at") else "open"), None
    consent = family.consent("traeger_contact")
    gone = family.erased_at is not None or (consent is not None and consent.withdrawn_at)
    if wish["state"] == "dropped" and gone:
        return "dropped", None
    return None, f"{named} is {wish['state']} although the family neither withdrew nor was erased"


async def _check_kpis(api: _Api, truth: Truth, zone: ZoneInfo, report: CheckReport) -> None:
    expected = expected_kpis(truth, zone)
    figures = {f.value for f in CHECKED_FIGURES}
    years = sorted({period[:4] for (_, period, _) in expected})
    published: dict[tuple[str, str, str], dict[str, Any]] = {}
    for year in years:
        offset = 0
        while True:
            rows = await api.get(
                f"{api.endpoints.reporting}/kpis?year={year}&breakdowns=false"
                f"&limit=10000&offset={offset}",
                "analyst",
            )
            for row in rows:
                if row["dimension"] is None and row["figure"] in figures:
                    published[(row["bezirk"], row["period"], row["figure"])] = row
            if len(rows) < 10000:
                break
            offset += len(rows)
    report.kpi_cells_compared = report.kpi_cells_suppressed = 0
    report.kpi_mismatches = []
    for key in sorted(set(published) | {k for k, v in expected.items() if v}):
        row = published.get(key)
        want = expected.get(key, 0)
        if row is None:
            report.kpi_mismatches.append(f"{'/'.join(key)}: not published, expected {want:g}")
            continue
        if row["suppressed"] or row["value"] is None:
            report.kpi_cells_suppressed += 1
            continue
        report.kpi_cells_compared += 1
        if abs(float(row["value"]) - want) > 1e-9:
            report.kpi_mismatches.append(
                f"{'/'.join(key)}: published {row['value']:g}, expected {want:g}"
            )


async def check(
    truth: Truth,
    endpoints: Endpoints,
    tokens: Tokens,
    *,
    zone: ZoneInfo,
    timeout_s: float = 60.0,
    concurrency: int = 16,
    kpis: bool = True,
) -> CheckReport:
    """Compare until everything matches or ``timeout_s`` passed; the last comparison's report.

    The key figures count every family on the platform, so ``kpis=False`` is for a platform
    that held families before this run."""
    started = time.monotonic()
    report = CheckReport(
        families=len(truth.families),
        referrals=sum(1 for f in truth.families if f.referral and f.referral.referral_id),
    )
    limit = asyncio.Semaphore(concurrency)
    todo = list(truth.families)
    async with httpx.AsyncClient(timeout=30.0) as http:
        api = _Api(http, endpoints, tokens)

        async def one(family: FamilyTruth) -> tuple[str, list[str]]:
            async with limit:
                return family.key, await _check_family(api, family)

        while True:
            results = await asyncio.gather(*(one(f) for f in todo))
            report.family_mismatches = {key: found for key, found in results if found}
            try:
                wishes = await _wishes(api, truth)
            except (LookupError, httpx.HTTPError) as exc:
                report.family_mismatches["wishes"] = [str(exc)]
            else:
                report.wishes = {}
                for family in truth.families:
                    if family.referral is None:
                        continue
                    end, problem = _wish_end(family, wishes)
                    if problem is not None:
                        report.family_mismatches.setdefault(family.key, []).append(problem)
                    elif end is not None:
                        report.wishes[end] = report.wishes.get(end, 0) + 1
            try:
                if kpis:
                    await _check_kpis(api, truth, zone, report)
            except (LookupError, httpx.HTTPError) as exc:
                report.kpi_mismatches = [f"reporting: {exc}"]
            if report.ok or time.monotonic() - started > timeout_s:
                break
            # Only families still differing are asked again; wishes and figures in full.
            todo = [f for f in todo if f.key in report.family_mismatches]
            await asyncio.sleep(1.0)
    report.elapsed_s = time.monotonic() - started
    return report
