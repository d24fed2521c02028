"""The key figures (Kennzahlen) of the prevention chain, each declared once.

Everything that names, labels, counts, checks or suppresses a key figure reads this module:
the reporting service (its projections, publisher, API, dashboard and annual report), the
simulator's ground truth, and partners who want to label ``kpi-updated`` events. It needs
nothing but pydantic.

A declaration says what the figure is (``figure``, ``unit``, German ``label`` and
``description``), which breakdowns it is published with (``dimensions``), how it is
attributed to a month (``attribution``), how it accumulates from the events
(``accumulates``) and how anonymity rules treat it (``suppression``).
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict

#: The ``bezirk`` value of figures for the whole city.
CITY_TOTAL = "stadt"


class KpiFigure(StrEnum):
    """The key figures Lotse publishes.

    Counts: ``families_registered`` (all channels), ``families_registered_clinic``,
    ``families_registered_move_in``, ``visits_offered``, ``visits_completed``,
    ``visits_declined``, ``visits_missed``, ``referrals_requested``, ``referrals_accepted``,
    ``open_escalations``. Percentages: ``consent_rate`` (families with a welcome-visit
    consent), ``reach_rate`` (registered families with a completed visit),
    ``acceptance_rate`` (accepted of answered referrals). Medians in days:
    ``median_days_birth_to_visit``, ``median_days_to_warm_handover`` (request to confirmed
    first contact). ``contacts_per_family``: visits and referral contacts per family.
    """

    FAMILIES_REGISTERED = "families_registered"
    FAMILIES_REGISTERED_CLINIC = "families_registered_clinic"
    FAMILIES_REGISTERED_MOVE_IN = "families_registered_move_in"
    CONSENT_RATE = "consent_rate"
    VISITS_OFFERED = "visits_offered"
    VISITS_COMPLETED = "visits_completed"
    VISITS_DECLINED = "visits_declined"
    VISITS_MISSED = "visits_missed"
    REACH_RATE = "reach_rate"
    MEDIAN_DAYS_BIRTH_TO_VISIT = "median_days_birth_to_visit"
    REFERRALS_REQUESTED = "referrals_requested"
    REFERRALS_ACCEPTED = "referrals_accepted"
    ACCEPTANCE_RATE = "acceptance_rate"
    MEDIAN_DAYS_TO_WARM_HANDOVER = "median_days_to_warm_handover"
    OPEN_ESCALATIONS = "open_escalations"
    CONTACTS_PER_FAMILY = "contacts_per_family"


class KpiUnit(StrEnum):
    """Unit of a figure's value."""

    COUNT = "count"
    PERCENT = "percent"
    DAYS = "days"
    PER_FAMILY = "per_family"


class Accumulation(StrEnum):
    """How a figure's value follows from what happened."""

    COUNT = "count"
    """Number of things in the month (a flow); a year is the sum of its months."""
    STOCK = "stock"
    """Number of things open at the end of the month; a year is its last month."""
    RATE = "rate"
    """100 × numerator / denominator, both counts of the cell."""
    PER_FAMILY = "per_family"
    """A sum over the cell's families divided by their number."""
    MEDIAN = "median"
    """Median of one value per family (or referral) of the cell, kept as a histogram."""


class Attribution(StrEnum):
    """Which month a family's contribution counts in."""

    EVENT = "event"
    """The month the thing happened (city time)."""
    COHORT = "cohort"
    """The month the family was registered, whenever the thing happened."""


class Suppression(StrEnum):
    """How the anonymity rules (k families) treat a figure."""

    COUNT = "count"
    """Suppressed behind 1 … k-1 families (zero describes nobody); part of additive groups,
    so complementary suppression applies."""
    RATIO = "ratio"
    """Suppressed behind fewer than k families, and when its numerator or denominator is a
    count below k (a small count would give single families away)."""
    COHORT_RATIO = "cohort_ratio"
    """As ``ratio``, and also hidden wherever its base, the families registered in the cell,
    is hidden."""


class DimensionKind(StrEnum):
    """Breakdowns, published as ``<kind>:<value>``."""

    MODULE = "module"
    """Offer module of the city (slug)."""
    STATUS = "status"
    """Today's referral status."""
    SCOPE = "scope"
    """Consent scope (the undivided figure is the welcome-visit consent)."""


class FigureDefinition(BaseModel):
    """One key figure, as everyone reads it."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    figure: KpiFigure
    """The figure's name on the wire."""
    unit: KpiUnit
    """Unit of ``value`` in ``kpi-updated``."""
    label: str
    """German label (dashboard, report)."""
    description: str
    """German explanation (dashboard tooltip, report glossary)."""
    accumulates: Accumulation
    """How the value follows from what happened."""
    attribution: Attribution
    """Which month a contribution counts in."""
    suppression: Suppression
    """How anonymity rules treat it."""
    dimensions: tuple[DimensionKind, ...] = ()
    """Breakdowns published next to the undivided figure."""
    part_of: KpiFigure | None = None
    """The count this one is an additive part of (a channel of all registrations)."""


def _define(
    figure: KpiFigure,
    unit: KpiUnit,
    accumulates: Accumulation,
    label: str,
    description: str,
    *,
    attribution: Attribution = Attribution.EVENT,
    dimensions: tuple[DimensionKind, ...] = (),
    part_of: KpiFigure | None = None,
) -> FigureDefinition:
    suppression = {
        Accumulation.COUNT: Suppression.COUNT,
        Accumulation.STOCK: Suppression.COUNT,
    }.get(
        accumulates,
        Suppression.COHORT_RATIO if attribution is Attribution.COHORT else Suppression.RATIO,
    )
    return FigureDefinition(
        figure=figure,
        unit=unit,
        label=label,
        description=description,
        accumulates=accumulates,
        attribution=attribution,
        suppression=suppression,
        dimensions=dimensions,
        part_of=part_of,
    )


_F, _U, _A, _C = KpiFigure, KpiUnit, Accumulation, Attribution.COHORT

#: Every key figure, in the order reports list them.
FIGURES: tuple[FigureDefinition, ...] = (
    _define(
        _F.FAMILIES_REGISTERED,
        _U.COUNT,
        _A.COUNT,
        "Registrierte Familien",
        "Neu registrierte Familien, im Monat ihrer Registrierung.",
        attribution=_C,
    ),
    _define(
        _F.FAMILIES_REGISTERED_CLINIC,
        _U.COUNT,
        _A.COUNT,
        "davon über Geburtskliniken",
        "Registriert von Babylotsen in den Geburtskliniken.",
        attribution=_C,
        part_of=_F.FAMILIES_REGISTERED,
    ),
    _define(
        _F.FAMILIES_REGISTERED_MOVE_IN,
        _U.COUNT,
        _A.COUNT,
        "davon Zuzüge",
        "Zugezogene Familien mit Kindern unter sechs Jahren (Meldung des Bürgerdienstes).",
        attribution=_C,
        part_of=_F.FAMILIES_REGISTERED,
    ),
    _define(
        _F.CONSENT_RATE,
        _U.PERCENT,
        _A.RATE,
        "Einwilligungsquote",
        "Anteil der registrierten Familien mit Einwilligung in den Willkommensbesuch.",
        attribution=_C,
        dimensions=(DimensionKind.SCOPE,),
    ),
    _define(
        _F.VISITS_OFFERED,
        _U.COUNT,
        _A.COUNT,
        "Willkommensbesuche angeboten",
        "Vereinbarte Willkommensbesuche, im Monat der Terminvereinbarung.",
    ),
    _define(
        _F.VISITS_COMPLETED,
        _U.COUNT,
        _A.COUNT,
        "Willkommensbesuche durchgeführt",
        "Durchgeführte Willkommensbesuche, im Monat des Besuchs.",
    ),
    _define(
        _F.VISITS_DECLINED,
        _U.COUNT,
        _A.COUNT,
        "Willkommensbesuche abgelehnt",
        "Familien, die den Besuch abgelehnt haben (ohne Angabe von Gründen).",
    ),
    _define(
        _F.VISITS_MISSED,
        _U.COUNT,
        _A.COUNT,
        "Nicht angetroffen",
        "Termine, zu denen die Familie nicht angetroffen wurde.",
    ),
    _define(
        _F.REACH_RATE,
        _U.PERCENT,
        _A.RATE,
        "Erreichungsquote",
        "Anteil der im Monat registrierten Familien, die bis heute besucht wurden.",
        attribution=_C,
    ),
    _define(
        _F.MEDIAN_DAYS_BIRTH_TO_VISIT,
        _U.DAYS,
        _A.MEDIAN,
        "Median Tage Geburt bis Besuch",
        "Median der Tage von der Geburt bis zum Willkommensbesuch (Familien aus Geburtskliniken).",
    ),
    _define(
        _F.REFERRALS_REQUESTED,
        _U.COUNT,
        _A.COUNT,
        "Vermittlungen",
        "Vermittlungen an Träger, im Monat der Anfrage; nach Modul und heutigem Status.",
        dimensions=(DimensionKind.MODULE, DimensionKind.STATUS),
    ),
    _define(
        _F.REFERRALS_ACCEPTED,
        _U.COUNT,
        _A.COUNT,
        "Vermittlungen angenommen",
        "Von Trägern angenommene Vermittlungen, im Monat der Annahme.",
    ),
    _define(
        _F.ACCEPTANCE_RATE,
        _U.PERCENT,
        _A.RATE,
        "Annahmequote",
        "Angenommene Vermittlungen unter allen beantworteten (angenommen oder abgelehnt).",
    ),
    _define(
        _F.MEDIAN_DAYS_TO_WARM_HANDOVER,
        _U.DAYS,
        _A.MEDIAN,
        "Median Tage bis zur warmen Übergabe",
        "Median der Tage von der Vermittlung bis zum bestätigten Erstkontakt des Trägers.",
    ),
    _define(
        _F.OPEN_ESCALATIONS,
        _U.COUNT,
        _A.STOCK,
        "Offene Eskalationen",
        "An das Bezirksteam eskalierte, noch unbeantwortete Vermittlungen am Monatsende.",
    ),
    _define(
        _F.CONTACTS_PER_FAMILY,
        _U.PER_FAMILY,
        _A.PER_FAMILY,
        "Kontakte je Familie",
        "Willkommensbesuche und Erstkontakte von Trägern je registrierter Familie.",
        attribution=_C,
    ),
)

DEFINITIONS: dict[KpiFigure, FigureDefinition] = {d.figure: d for d in FIGURES}
"""The declaration of each figure."""

#: The unit each figure is published in.
FIGURE_UNITS: dict[KpiFigure, KpiUnit] = {d.figure: d.unit for d in FIGURES}


def figures_accumulating(*kinds: Accumulation) -> tuple[KpiFigure, ...]:
    """The figures that accumulate in one of these ways, in declaration order."""
    return tuple(d.figure for d in FIGURES if d.accumulates in kinds)


def figures_suppressed_as(*kinds: Suppression) -> tuple[KpiFigure, ...]:
    """The figures the anonymity rules treat in one of these ways, in declaration order."""
    return tuple(d.figure for d in FIGURES if d.suppression in kinds)
