"""The key figures are declared once (lotse_contracts.figures) and everything reads that
declaration: the domain's figure groups, the report's labels and the simulator's ground truth."""

from __future__ import annotations

from lotse_contracts.events.reporting import FIGURE_UNITS as WIRE_UNITS
from lotse_contracts.figures import (
    DEFINITIONS,
    FIGURES,
    Accumulation,
    KpiFigure,
    Suppression,
    figures_accumulating,
)
from lotse_reporting import domain, report
from lotse_simulator.truth import CHECKED_FIGURES


def test_every_figure_is_declared_exactly_once() -> None:
    declared = [d.figure for d in FIGURES]
    assert sorted(declared) == sorted(KpiFigure)
    assert len(set(declared)) == len(declared)
    assert {d.figure: d.unit for d in FIGURES} == WIRE_UNITS


def test_suppression_follows_accumulation() -> None:
    for definition in FIGURES:
        counted = definition.accumulates in (Accumulation.COUNT, Accumulation.STOCK)
        assert (definition.suppression is Suppression.COUNT) == counted, definition.figure


def test_readers_take_the_declaration() -> None:
    assert figures_accumulating(Accumulation.COUNT) == CHECKED_FIGURES
    assert tuple(d.figure for d in FIGURES) == report.SUMMARY
    assert report.label(KpiFigure.REACH_RATE) == DEFINITIONS[KpiFigure.REACH_RATE].label
    requested = domain.figure_dimensions(KpiFigure.REFERRALS_REQUESTED, ("elternschule",))
    assert requested[:2] == [None, "module:elternschule"]
    assert "status:accepted" in requested
    assert domain.figure_dimensions(KpiFigure.CONSENT_RATE, ()) == list(domain.CONSENT_DIMENSIONS)
