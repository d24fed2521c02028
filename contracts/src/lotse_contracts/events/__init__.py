"""Versioned event models of the whole chain. Importing this package registers them all."""

from lotse_contracts.events import intake, partner, referrals, reporting, visits
from lotse_contracts.events.base import (
    CATALOGUE,
    EventCatalogue,
    EventDataInvalid,
    EventModel,
    UnknownEventType,
    UnknownEventVersion,
    split_type,
)

__all__ = [
    "CATALOGUE",
    "EventCatalogue",
    "EventDataInvalid",
    "EventModel",
    "UnknownEventType",
    "UnknownEventVersion",
    "intake",
    "partner",
    "referrals",
    "reporting",
    "split_type",
    "visits",
]
