"""The key figures are declared once (lotse_contracts.figures) and everything reads that
declaration: the domain's figure groups, the report's labels and the simulator's ground truth."""

from __future__ import annotations

import asyncio

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
from lotse_reporting.operations import PublishTrigger
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


def test_the_publisher_runs_soon_after_a_change_and_not_at_all_in_between() -> None:
    now = [100.0]
    trigger = PublishTrigger(interval_s=1.0, debounce_s=0.15, clock=lambda: now[0])
    started = trigger.due()  # the first tick after start looks once
    assert started is not None
    trigger.passed(started)
    now[0] += 0.5
    assert trigger.due() is None  # nothing changed: no pass
    trigger.changed()
    now[0] += 0.1
    assert trigger.due() is None  # still within the debounce
    now[0] += 0.06
    started = trigger.due()
    assert started is not None
    trigger.passed(started)
    now[0] += 0.2
    assert trigger.due() is None
    now[0] += 1.0
    assert trigger.due() is not None  # the safety net: a look every interval


def test_a_change_committed_during_a_pass_gets_a_pass_of_its_own() -> None:
    now = [10.0]
    trigger = PublishTrigger(interval_s=3600.0, debounce_s=0.15, clock=lambda: now[0])
    trigger.passed(10.0)
    trigger.changed()
    now[0] += 0.2
    started = trigger.due()
    assert started is not None
    now[0] += 0.05
    trigger.changed()  # committed after the pass began: the pass may have missed it
    trigger.passed(started)
    assert trigger.due() is None  # its own debounce first
    now[0] += 0.15
    assert trigger.due() is not None


def test_an_idle_publisher_sleeps_until_told() -> None:
    async def scenario() -> None:
        trigger = PublishTrigger(interval_s=3600.0, debounce_s=0.01)
        trigger.passed(await trigger.wait())  # the pass at start
        waiting = asyncio.create_task(trigger.wait())
        await asyncio.sleep(0.05)
        assert not waiting.done()  # nothing changed: nothing due for an hour
        trigger.changed()
        started = await asyncio.wait_for(waiting, 30)
        trigger.passed(started)
        assert trigger.due() is None

    asyncio.run(scenario())
