"""The city file is the truth for the catalogue (issue 18): at every start the catalogue
tables are reconciled with the configured city. A Träger the file no longer names is
retired (kept while referrals point at it, no new ones), API edits survive a restart
unless the file changed the same field, and another city's configuration over the same
database is refused with a clear message instead of mixing two cities."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lotse_contracts.city import load_city
from lotse_referrals.catalogue import CityMismatch
from lotse_referrals.tables import Referral

from tests.referrals.helpers import FAMILIENBUERO, KOORDINATION, TRAEGER, Family
from tests.referrals.test_referrals_handlers import handover
from tests.referrals.test_referrals_wishes import service

DORTMUND = Path(load_city.__code__.co_filename).parent / "cities" / "dortmund.toml"
GONE = "familienhilfe-ruhrbogen"
FOLLOWS = "elternberatung-unterwegs"


def _city_file(
    tmp_path: Path, name: str, *, drop: str | None = None, subs: tuple[tuple[str, str], ...] = ()
) -> str:
    text = DORTMUND.read_text(encoding="utf-8")
    if drop is not None:
        text, dropped = re.subn(
            rf'\[\[traeger\]\]\nslug = "{drop}"\n(?:(?!\[\[).*\n)*', "", text, count=1
        )
        assert dropped == 1
    for old, new in subs:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


async def test_the_catalogue_follows_its_city_file_across_restarts(
    database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    first = _city_file(tmp_path, "v1.toml")
    family = Family(bezirk="brackel", traeger=GONE, purpose="aufsuchende-elternberatung")
    async with service(database_url, topic_prefix, city=first) as svc:
        await svc.register(family)
        sent = handover(family, module="aufsuchende-elternberatung", traeger=GONE)
        assert await svc.main.send(sent) == "ok"
        [referral] = await svc.rows(Referral, case_id=family.case_id)
        edited = await svc.http.patch(
            f"/catalogue/traeger/{TRAEGER}",
            json={"capacity_per_month": 7, "contact": "neu@hebammen.example"},
            headers=KOORDINATION,
        )
        assert edited.json()["edited_fields"] == ["capacity_per_month", "contact"]

    # The file drops one Träger, renames another and changes the edited Träger's capacity.
    second = _city_file(
        tmp_path,
        "v2.toml",
        drop=GONE,
        subs=(
            ('name = "Elternberatung unterwegs', 'name = "Elternberatung mobil'),
            (
                'capacity_per_month = 30\ncontact = "vermittlung@hebammen',
                'capacity_per_month = 33\ncontact = "vermittlung@hebammen',
            ),
        ),
    )
    async with service(database_url, topic_prefix, city=second) as svc:
        listed = {
            t["slug"]: t
            for t in (await svc.http.get("/catalogue/traeger", headers=FAMILIENBUERO)).json()
        }
        # Retired, not deleted: its referral still points at it and can be followed.
        assert listed[GONE]["retired"] is True
        assert listed[GONE]["active"] is False
        kept = await svc.http.get(f"/referrals/{referral.referral_id}", headers=_brackel())
        assert kept.status_code == 200
        assert kept.json()["traeger"] == GONE
        # No new referral goes to it, and it cannot be edited back into service.
        suggested = await svc.http.get(
            "/catalogue/suggestions",
            params={"bezirk": "brackel", "module": "aufsuchende-elternberatung"},
            headers=FAMILIENBUERO,
        )
        assert GONE not in [t["slug"] for t in suggested.json()]
        revived = await svc.http.patch(
            f"/catalogue/traeger/{GONE}", json={"active": True}, headers=KOORDINATION
        )
        assert revived.status_code == 409
        assert revived.json()["errors"][0]["field"] == "slug"
        # An unedited Träger follows the file.
        assert listed[FOLLOWS]["name"].startswith("Elternberatung mobil")
        # The edited one: the file changed the capacity (file wins), not the contact (edit kept).
        hebammen = listed[TRAEGER]
        assert (hebammen["capacity_per_month"], hebammen["contact"]) == (33, "neu@hebammen.example")
        assert hebammen["edited_fields"] == ["contact"]

    # The file names the Träger again: it comes back.
    async with service(database_url, topic_prefix, city=first) as svc:
        back = (await svc.http.get(f"/catalogue/traeger/{GONE}", headers=FAMILIENBUERO)).json()
        assert (back["retired"], back["active"]) == (False, True)


def _brackel() -> dict[str, str]:
    from tests.support import bearer

    return bearer("familienbuero", subject="fb-brackel", bezirk="brackel")


async def test_another_citys_configuration_is_refused_over_the_same_database(
    database_url: str, topic_prefix: str
) -> None:
    async with service(database_url, topic_prefix, city="dortmund"):
        pass
    with pytest.raises(CityMismatch, match=r"Dortmund \(dortmund.*configured city is Hamm"):
        async with service(database_url, topic_prefix, city="hamm"):
            pass
    # Nothing was changed: Dortmund starts as before.
    async with service(database_url, topic_prefix, city="dortmund") as svc:
        listed = (await svc.http.get("/catalogue/traeger", headers=FAMILIENBUERO)).json()
        assert TRAEGER in [t["slug"] for t in listed]
