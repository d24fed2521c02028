"""Key figures (Kennzahlen) of the prevention chain, per Stadtbezirk and period.

Producer: the reporting service (``/lotse/reporting``), topic ``lotse.reporting.kpis``
(compacted). The events are anonymised aggregates: there is no case id, and a cell
computed from fewer than k families (default 5) is published as ``suppressed`` without a
value. The CloudEvents ``subject`` (and Kafka key) is the cell,
``<bezirk>/<period>/<figure>[/<dimension>]``, so compaction keeps the latest value of
each cell.

The figures themselves (names, units, labels, how they accumulate and are suppressed) are
declared once in :mod:`lotse_contracts.figures`.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from pydantic import AwareDatetime, ConfigDict, Field, model_validator

from lotse_contracts import topics
from lotse_contracts.cloudevents import CloudEvent
from lotse_contracts.events.base import CATALOGUE, EventModel
from lotse_contracts.events.common import DOCUMENTED, Slug, utc
from lotse_contracts.figures import CITY_TOTAL, FIGURE_UNITS, KpiFigure, KpiUnit

SOURCE = "/lotse/reporting"

__all__ = ["CITY_TOTAL", "FIGURE_UNITS", "SOURCE", "KpiFigure", "KpiUnit", "KpiUpdated"]


@CATALOGUE.register
class KpiUpdated(EventModel):
    """The current value of one key figure for one Stadtbezirk (or the city) and period.

    A later event for the same cell replaces the earlier one; a replay of all domain events
    rebuilds the same values.
    """

    model_config = ConfigDict(
        **DOCUMENTED,
        json_schema_extra={
            "if": {"properties": {"suppressed": {"const": True}}},
            "then": {"not": {"required": ["value"]}},
            "else": {"required": ["value"]},
        },
    )

    event_type: ClassVar[str] = "de.lotse.reporting.kpi-updated.v1"
    topic: ClassVar[str] = topics.REPORTING_KPIS
    source: ClassVar[str] = SOURCE

    bezirk: Slug
    """Stadtbezirk (city district) slug, or ``stadt`` for the whole city."""
    period: str = Field(pattern=r"^[0-9]{4}(-(0[1-9]|1[0-2]))?$")
    """Calendar month ``YYYY-MM`` or year ``YYYY``."""
    figure: KpiFigure
    """Which key figure."""
    dimension: str | None = Field(default=None, pattern=r"^[a-z_]+:[a-z0-9_-]+$")
    """Optional breakdown as ``<kind>:<value>``, e.g. ``module:familienhebamme``,
    ``status:accepted``, ``channel:clinic``."""
    value: float | None = Field(default=None, ge=0)
    """The value in ``unit``; absent when ``suppressed``."""
    suppressed: bool
    """True when fewer than k families are behind the cell, so no value is published."""
    unit: KpiUnit
    """Unit of ``value``; fixed per figure."""
    computed_at: AwareDatetime
    """When the value was computed."""

    @model_validator(mode="after")
    def _consistent(self) -> KpiUpdated:
        if self.suppressed != (self.value is None):
            raise ValueError("value must be absent exactly when suppressed is true")
        if self.unit is not FIGURE_UNITS[self.figure]:
            raise ValueError(f"{self.figure.value} is published in {FIGURE_UNITS[self.figure]}")
        return self

    def cell(self) -> str:
        """``<bezirk>/<period>/<figure>[/<dimension>]``: the subject and the Kafka key."""
        parts = [self.bezirk, self.period, self.figure.value]
        if self.dimension is not None:
            parts.append(self.dimension)
        return "/".join(parts)

    def to_cloudevent(
        self,
        *,
        event_id: str | None = None,
        time: datetime | None = None,
        source: str | None = None,
        schema_base: str | None = None,
    ) -> CloudEvent:
        """As the base, but the subject is the cell: a key figure has no case id."""
        event = super().to_cloudevent(
            event_id=event_id, time=time, source=source, schema_base=schema_base
        )
        return event.model_copy(update={"subject": self.cell()})

    @classmethod
    def example(cls) -> KpiUpdated:
        return cls(
            bezirk="hoerde",
            period="2025-03",
            figure=KpiFigure.REACH_RATE,
            value=87.5,
            suppressed=False,
            unit=KpiUnit.PERCENT,
            computed_at=utc(2025, 4, 1, 2, 0),
        )
