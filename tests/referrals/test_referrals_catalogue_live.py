"""The catalogue follows its city file while the service runs, not only at start (issue 18):
the periodic check (the ``catalogue`` job) or coordination's ``POST /catalogue/reconcile``
reconciles as at start; a Träger the file no longer names is retired (kept, no new
referrals), its open referrals are listed for their Bezirk only; a file that cannot be
applied is refused with the reason and changes nothing.

In process: the real database, the HTTP API through ASGI, no broker."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from lotse_referrals.tables import CatalogueTraeger, Referral
from lotse_runtime.app import PeriodicJob

from tests.referrals.helpers import FAMILIENBUERO, KOORDINATION, TRAEGER, Family
from tests.referrals.test_referrals_catalogue_city import DORTMUND, FOLLOWS, GONE, _city_file
from tests.referrals.test_referrals_handlers import handover
from tests.referrals.test_referrals_wishes import Service, service
from tests.support import bearer

BRACKEL = bearer("familienbuero", subject="fb-brackel", bezirk="brackel")
BEZIRKSTEAM_BRACKEL = bearer("bezirksteam", subject="bt-brackel", bezirk="brackel")
BEZIRKSTEAM_HOERDE = bearer("bezirksteam", subject="bt-hoerde", bezirk="hoerde")
RETIRED_LIST = "/bezirke/{}/retired-traeger/referrals"


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _job(svc: Service) -> PeriodicJob:
    [job] = [j for j in svc.runtime.jobs if j.name == "catalogue"]
    return job


async def _catalogue(svc: Service) -> dict[str, dict[str, Any]]:
    rows = await svc.rows(CatalogueTraeger)
    return {r.slug: r.model_dump(exclude={"updated_at"}) for r in rows}


async def _referred_to_gone(svc: Service) -> Referral:
    family = Family(bezirk="brackel", traeger=GONE, purpose="aufsuchende-elternberatung")
    await svc.register(family)
    sent = handover(family, module="aufsuchende-elternberatung", traeger=GONE)
    assert await svc.main.send(sent) == "ok"
    [referral] = await svc.rows(Referral, case_id=family.case_id)
    assert isinstance(referral, Referral)
    return referral


async def test_a_changed_city_file_retires_traeger_while_running(
    database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    path = Path(_city_file(tmp_path, "city.toml"))
    async with service(database_url, topic_prefix, city=str(path)) as svc:
        referral = await _referred_to_gone(svc)
        # Unchanged file: the periodic check does nothing.
        before = await _catalogue(svc)
        await _job(svc).run_once(svc.runtime)
        assert _job(svc).last_error is None
        assert await _catalogue(svc) == before

        # The file drops one Träger and renames another; the check takes it over at once.
        changed = _city_file(
            tmp_path,
            "city.toml",
            drop=GONE,
            subs=(('name = "Elternberatung unterwegs', 'name = "Elternberatung mobil'),),
        )
        assert changed == str(path)
        await _job(svc).run_once(svc.runtime)
        assert _job(svc).last_error is None
        listed = {
            t["slug"]: t
            for t in (await svc.http.get("/catalogue/traeger", headers=FAMILIENBUERO)).json()
        }
        assert (listed[GONE]["retired"], listed[GONE]["active"]) == (True, False)
        assert listed[FOLLOWS]["name"].startswith("Elternberatung mobil")
        # Never deleted while its referral points at it; no new referral goes to it.
        assert (await svc.http.get(f"/referrals/{referral.referral_id}", headers=BRACKEL)).json()[
            "traeger"
        ] == GONE
        suggested = await svc.http.get(
            "/catalogue/suggestions",
            params={"bezirk": "brackel", "module": "aufsuchende-elternberatung"},
            headers=FAMILIENBUERO,
        )
        assert GONE not in [t["slug"] for t in suggested.json()]

        # Its open referral is listed for Brackel, and only there.
        for headers in (BRACKEL, BEZIRKSTEAM_BRACKEL):
            answer = await svc.http.get(RETIRED_LIST.format("brackel"), headers=headers)
            assert answer.status_code == 200, answer.text
            assert [r["referral_id"] for r in answer.json()] == [referral.referral_id]
        other = await svc.http.get(RETIRED_LIST.format("brackel"), headers=BEZIRKSTEAM_HOERDE)
        assert other.status_code == 403
        own = await svc.http.get(RETIRED_LIST.format("hoerde"), headers=BEZIRKSTEAM_HOERDE)
        assert (own.status_code, own.json()) == (200, [])
        koordination = await svc.http.get(RETIRED_LIST.format("brackel"), headers=KOORDINATION)
        assert koordination.status_code == 403
        bad = await svc.http.get(
            RETIRED_LIST.format("brackel"), params={"limit": 0}, headers=BRACKEL
        )
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["field"] == "query.limit"

        # Coordination reconciles on demand: nothing more to do, and says so.
        done = await svc.http.post("/catalogue/reconcile", headers=KOORDINATION)
        assert done.status_code == 200, done.text
        body = done.json()
        assert (body["file_changed"], body["changed"], body["retired"]) == (False, 0, [])
        assert body["open_of_retired"] == {GONE: 1}
        refused = await svc.http.post("/catalogue/reconcile", headers=FAMILIENBUERO)
        assert refused.status_code == 403

        # The file names it again: it comes back, with nothing left to list.
        _city_file(tmp_path, "city.toml")
        back = (await svc.http.post("/catalogue/reconcile", headers=KOORDINATION)).json()
        assert (back["file_changed"], back["restored"]) == (True, [GONE])
        answer = await svc.http.get(RETIRED_LIST.format("brackel"), headers=BRACKEL)
        assert answer.json() == []


async def test_an_api_edit_survives_a_live_reconcile_unless_the_file_changed_that_field(
    database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    _city_file(tmp_path, "city.toml")
    async with service(database_url, topic_prefix, city=str(tmp_path / "city.toml")) as svc:
        edited = await svc.http.patch(
            f"/catalogue/traeger/{TRAEGER}",
            json={"capacity_per_month": 7, "contact": "neu@hebammen.example"},
            headers=KOORDINATION,
        )
        assert edited.status_code == 200
        _city_file(
            tmp_path,
            "city.toml",
            subs=(
                (
                    'capacity_per_month = 30\ncontact = "vermittlung@hebammen',
                    'capacity_per_month = 33\ncontact = "vermittlung@hebammen',
                ),
            ),
        )
        body = (await svc.http.post("/catalogue/reconcile", headers=KOORDINATION)).json()
        assert body["changed"] == 1
        entry = (await svc.http.get(f"/catalogue/traeger/{TRAEGER}", headers=KOORDINATION)).json()
        assert (entry["capacity_per_month"], entry["contact"]) == (33, "neu@hebammen.example")
        assert entry["edited_fields"] == ["contact"]


@pytest.mark.parametrize(
    ("content", "status", "reason"),
    [
        ("this is = = not toml", 422, "not valid TOML"),
        (None, 409, "now configures Hamm"),
    ],
    ids=["broken", "another-city"],
)
async def test_a_city_file_that_cannot_be_applied_changes_nothing(
    database_url: str,
    topic_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    content: str | None,
    status: int,
    reason: str,
) -> None:
    path = Path(_city_file(tmp_path, "city.toml"))
    async with service(database_url, topic_prefix, city=str(path)) as svc:
        referral = await _referred_to_gone(svc)
        before = await _catalogue(svc)
        # Hamm's file in place of Dortmund's, or a broken one.
        _write(path, _read(DORTMUND.with_name("hamm.toml")) if content is None else content)
        answer = await svc.http.post("/catalogue/reconcile", headers=KOORDINATION)
        assert answer.status_code == status, answer.text
        [error] = answer.json()["errors"]
        assert error["field"] == "city"
        assert reason in error["reason"]
        assert "nothing was changed" in error["reason"]
        assert await _catalogue(svc) == before
        # The periodic check refuses it too, says why once, and keeps running.
        with caplog.at_level(logging.ERROR):
            await _job(svc).run_once(svc.runtime)
            await _job(svc).run_once(svc.runtime)
        assert _job(svc).last_error is None
        said = [r for r in caplog.records if "city file not applied" in r.getMessage()]
        assert len(said) == 1
        assert reason in said[0].getMessage()
        assert await _catalogue(svc) == before
        assert [r.status for r in await svc.rows(Referral, case_id=referral.case_id)] == [
            "requested"
        ]


async def test_what_needs_a_restart_is_reported_and_left_for_the_next_start(
    database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    path = Path(_city_file(tmp_path, "city.toml"))
    async with service(database_url, topic_prefix, city=str(path)) as svc:
        _write(
            path,
            _read(path)
            + '\n[[traeger]]\nslug = "neuer-traeger"\nname = "Neuer Träger"\n'
            + 'contact = "info@neu.example"\nmodules = ["elternschule"]\nbezirke = ["*"]\n'
            + "capacity_per_month = 5\n",
        )
        body = (await svc.http.post("/catalogue/reconcile", headers=KOORDINATION)).json()
        assert any("neuer-traeger" in line for line in body["needs_restart"]), body
        assert "neuer-traeger" not in await _catalogue(svc)
