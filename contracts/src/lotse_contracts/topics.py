"""Kafka topic names. Domain topics carry every event of a service; audience topics carry
the subset (and fields) a Bezirksteam or a Träger may see, per the subscription registry."""

from __future__ import annotations

INTAKE = "lotse.intake"
VISITS = "lotse.visits"
REFERRALS = "lotse.referrals"
REPORTING_KPIS = "lotse.reporting.kpis"
DOMAIN_TOPICS = (INTAKE, VISITS, REFERRALS)
SERVICES = ("intake", "visits", "referrals", "reporting", "delivery")
#: Services that write the Träger response topics besides the Träger themselves: delivery
#: takes answers over HTTP from Träger without Kafka and writes them there on their behalf,
#: and reads the Träger referral feeds for the refusal notices that exist only there.
RESPONSE_WRITERS = ("delivery",)


def dead_letter(service: str) -> str:
    """The dead-letter topic of one service."""
    return f"lotse.dlq.{service}"


def bezirk_feed(bezirk_slug: str) -> str:
    """A Bezirksteam's (district team's) feed."""
    return f"lotse.bezirk.{bezirk_slug}"


def partner_referrals(traeger_slug: str) -> str:
    """Referrals addressed to one Träger (we write, the Träger reads)."""
    return f"lotse.partner.{traeger_slug}.referrals"


def partner_responses(traeger_slug: str) -> str:
    """A Träger's answers to its referrals (the Träger writes, we read)."""
    return f"lotse.partner.{traeger_slug}.responses"
