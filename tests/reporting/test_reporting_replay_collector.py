"""A rebuild runs without the collector's own passes, and leaves the collector as it was."""

from __future__ import annotations

import gc

from lotse_reporting.replay_rebuild import collector_off


def test_the_collector_is_off_inside_and_back_on_after() -> None:
    assert gc.isenabled()
    with collector_off():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with collector_off():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_error_inside_turns_it_back_on() -> None:
    try:
        with collector_off():
            raise RuntimeError("replay failed")
    except RuntimeError:
        pass
    assert gc.isenabled()
