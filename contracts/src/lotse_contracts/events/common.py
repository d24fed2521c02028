"""Field types and vocabularies shared by the event modules.

German domain terms, explained once:

- *Stadtbezirk* (short *Bezirk*): a city district; Dortmund has twelve.
- *Familienbüro*: the family office of one Stadtbezirk; it does the welcome visits.
- *Babylotse*: a "baby pilot" in a birth clinic who registers families and screens needs.
- *Träger*: an independent provider agency (Elternschule, Familienhebammen, ...) that
  runs support modules and receives referrals.
- *Willkommensbesuch*: the welcome visit every family with a newborn or newly moved in
  with young children is offered.
- *Bezirksteam*: the coordination team of a Stadtbezirk; it receives escalations.

Identifiers are pseudonymous: a case id is a random UUID that means nothing outside Lotse.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from enum import StrEnum
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

_UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_SLUG = r"^[a-z0-9]+(-[a-z0-9]+)*$"

CaseId = Annotated[str, Field(pattern=_UUID)]
"""Pseudonymous case id of a family: a lower-case UUID string."""
Uuid = Annotated[str, Field(pattern=_UUID)]
"""Any other Lotse identifier (visit, referral, consent, handover): a lower-case UUID."""
Slug = Annotated[str, Field(pattern=_SLUG, min_length=1, max_length=64)]
"""Lower-case ASCII slug, words joined by hyphens, e.g. ``innenstadt-west``."""
StaffId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{4,64}$")]
"""Pseudonymous id of a staff member; resolvable only inside the owning service."""

#: Attribute docstrings become JSON Schema descriptions, which partners read.
DOCUMENTED = ConfigDict(use_attribute_docstrings=True)


class Role(StrEnum):
    """The role in which a person acted (never who it was)."""

    BABYLOTSE = "babylotse"
    CITIZENS_OFFICE = "citizens_office"
    FAMILIENBUERO = "familienbuero"
    BEZIRKSTEAM = "bezirksteam"
    TRAEGER = "traeger"
    FAMILY = "family"
    SYSTEM = "system"


class ConsentScope(StrEnum):
    """What a consent covers.

    ``welcome_visit``: contact by the Familienbüro for a Willkommensbesuch;
    ``traeger_contact``: passing contact data to one Träger for one purpose (§ 65 SGB VIII);
    ``screening_data_use``: using the screening result for referrals.
    """

    WELCOME_VISIT = "welcome_visit"
    TRAEGER_CONTACT = "traeger_contact"
    SCREENING_DATA_USE = "screening_data_use"


class ConsentState(StrEnum):
    """Whether a consent is in force."""

    GIVEN = "given"
    WITHDRAWN = "withdrawn"


class Consent(BaseModel):
    """One consent of the family, as recorded at intake or changed later."""

    model_config = DOCUMENTED

    consent_id: Uuid
    """Id of this consent; referrals cite it as their ``consent_ref``."""
    scope: ConsentScope
    """What the consent covers."""
    traeger: Slug | None = None
    """The Träger the consent is limited to (``traeger_contact`` only)."""
    purpose: Slug | None = None
    """The purpose it is limited to, a module slug such as ``familienhebamme``."""
    state: ConsentState
    """Given or withdrawn."""
    at: AwareDatetime
    """When the family gave or withdrew it."""


# --- shared example values (one fictitious family in Hörde) ---------------------------------

BERLIN_WINTER = timezone(timedelta(hours=1))
EXAMPLE_CASE_ID = "3f6c1a9e-8b2d-4c71-9e55-2a7d0f4b8c13"
EXAMPLE_BEZIRK = "hoerde"
EXAMPLE_FAMILIENBUERO = "familienbuero-hoerde"
#: A Träger of the Dortmund city configuration that offers EXAMPLE_MODULE in EXAMPLE_BEZIRK.
EXAMPLE_TRAEGER = "hebammenzentrum-dortmund"
EXAMPLE_MODULE = "familienhebamme"
EXAMPLE_VISIT_ID = "9a1d4e6b-2c3f-4b8a-a7d1-5e0c2b9f4a36"
EXAMPLE_REFERRAL_ID = "c4e8b2a1-7d3f-4e69-8b15-0f2a6d9c3e71"
EXAMPLE_HANDOVER_ID = "5b7e2d90-1a4c-4f38-9d62-8c3e0a1f7b54"
EXAMPLE_CONSENT_VISIT_ID = "e2a9c7d4-6b1f-4a35-8e02-9d4c1b7a5f68"
EXAMPLE_CONSENT_TRAEGER_ID = "7d3b1f5a-9c2e-4d86-b4a0-3e6f8c2d1b97"
EXAMPLE_STAFF_ID = "st-4k9q2x"
EXAMPLE_BIRTH = date(2025, 3, 1)
EXAMPLE_REGISTERED_AT = datetime(2025, 3, 3, 9, 15, tzinfo=BERLIN_WINTER)
EXAMPLE_VISIT_START = datetime(2025, 3, 12, 10, 0, tzinfo=BERLIN_WINTER)
EXAMPLE_VISIT_TARGET = date(2025, 3, 17)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    """An aware UTC datetime, for examples."""
    return datetime(year, month, day, hour, minute, tzinfo=UTC)
