"""Pure rules of webhook delivery: who owns a subscription, the registry's ceiling, which
sinks are acceptable, filters, the HTTP rendering of a CloudEvent and the retry schedule.
No I/O here: operations.py loads, resolves host names and posts; this decides."""

from __future__ import annotations

import ipaddress
import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from lotse_contracts.cloudevents import CloudEvent, to_structured
from lotse_contracts.subscriptions import SubscriptionRegistry
from lotse_runtime.identity import AccessDenied, Caller, Role
from lotse_runtime.refusal import Refusal

from lotse_delivery.tables import AnyFilter, SubscriptionCreate

OwnerKind = Literal["traeger", "bezirksteam"]
SinkPolicy = Literal["production", "development"]

#: The topic prefixes of the audience feeds, and the audience kind each belongs to.
_FEED_KINDS: tuple[tuple[str, str, OwnerKind], ...] = (
    ("lotse.bezirk.", "", "bezirksteam"),
    ("lotse.partner.", ".referrals", "traeger"),
)


@dataclass(frozen=True)
class Owner:
    """The audience a subscription belongs to: a Träger or a Bezirksteam, by slug."""

    kind: OwnerKind
    member: str

    @property
    def audience(self) -> str:
        """The registry's name of this audience, e.g. ``traeger-hebammenzentrum-dortmund``."""
        return f"{self.kind}-{self.member}"


def owner_of(caller: Caller) -> Owner:
    """The audience a caller subscribes for: its own Träger or its own Stadtbezirk."""
    if caller.role is Role.traeger and caller.traeger:
        return Owner("traeger", caller.traeger)
    if caller.role is Role.bezirksteam and caller.bezirk:
        return Owner("bezirksteam", caller.bezirk)
    raise AccessDenied(f"role {caller.role} holds no subscriptions")


def feed_owner(topic: str) -> Owner | None:
    """The audience of a feed topic the registry routed an event to (unprefixed)."""
    for prefix, suffix, kind in _FEED_KINDS:
        if topic.startswith(prefix) and topic.endswith(suffix):
            member = topic[len(prefix) : len(topic) - len(suffix)]
            if member and "." not in member:
                return Owner(kind, member)
    return None


# -- the registry's ceiling ----------------------------------------------------------------------


def check_within_ceiling(
    registry: SubscriptionRegistry, owner: Owner, body: SubscriptionCreate
) -> None:
    """Refuse (422, field and reason) anything the registry does not give ``owner``'s
    audience: event types, data fields, and filters on a Bezirk, Träger or module that the
    audience cannot receive or the city does not have."""
    try:
        allowed = registry.audience(owner.audience).event_types
    except LookupError:
        raise Refusal(
            "owner", f"the subscription registry has no audience {owner.audience}"
        ) from None
    for i, event_type in enumerate(body.types):
        if event_type not in allowed:
            raise Refusal(
                f"types.{i}",
                f"{event_type} is not an event type the subscription registry gives "
                f"{owner.audience} (allowed: {', '.join(allowed) or 'none'})",
            )
    if len(set(body.types)) != len(body.types):
        raise Refusal("types", "an event type is listed twice")
    if body.fields is not None:
        ceiling: set[str] = set()
        for event_type in body.types:
            ceiling |= set(registry.fields_for(owner.kind, event_type) or ())
        for i, name in enumerate(body.fields):
            if name not in ceiling:
                raise Refusal(
                    f"fields.{i}",
                    f"field {name!r} is not among the fields the registry gives "
                    f"{owner.audience} for these types ({', '.join(sorted(ceiling))})",
                )
    city = registry.city
    known: dict[str, list[str]] = {
        "bezirk": city.bezirk_slugs,
        "traeger": city.traeger_slugs,
        "module": [m.slug for m in city.modules],
    }
    for i, flt in enumerate(body.filters):
        exacts = flt.any if isinstance(flt, AnyFilter) else [flt]
        for j, exact in enumerate(exacts):
            where = f"filters.{i}" + (f".any.{j}" if isinstance(flt, AnyFilter) else "")
            for attribute, value in exact.exact.items():
                if value not in known[attribute]:
                    raise Refusal(
                        f"{where}.exact.{attribute}",
                        f"{city.name} has no {attribute} {value!r}",
                    )
                if owner.kind == "bezirksteam" and attribute == "bezirk" and value != owner.member:
                    raise Refusal(
                        f"{where}.exact.bezirk",
                        f"a Bezirksteam receives events of its own Bezirk {owner.member} only",
                    )
                if owner.kind == "traeger" and attribute == "traeger" and value != owner.member:
                    raise Refusal(
                        f"{where}.exact.traeger",
                        f"a Träger receives the referrals addressed to itself "
                        f"({owner.member}) only",
                    )


def matches(filters: Sequence[dict[str, Any]], event: CloudEvent) -> bool:
    """Whether an event (the projected copy) passes a subscription's filters (all of them)."""
    return all(_matches(f, event) for f in filters)


def _matches(flt: dict[str, Any], event: CloudEvent) -> bool:
    if "any" in flt:
        return any(_matches(sub, event) for sub in flt["any"])
    return all(_attribute(event, name) == value for name, value in flt.get("exact", {}).items())


def _attribute(event: CloudEvent, name: str) -> str | None:
    if name == "bezirk":
        return event.bezirk
    if name == "traeger":
        return event.traeger
    data = event.data if isinstance(event.data, dict) else {}
    value = data.get(name)
    return value if isinstance(value, str) else None


def limit_fields(event: CloudEvent, fields: Iterable[str] | None) -> CloudEvent:
    """The subscriber's own further minimisation of the registry's projection."""
    if fields is None or not isinstance(event.data, dict):
        return event
    wanted = set(fields)
    data = {k: v for k, v in event.data.items() if k in wanted}
    return event.model_copy(update={"data": data, "dataschema": None})


# -- sinks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sink:
    url: str
    scheme: str
    host: str
    port: int


def parse_sink(url: str) -> Sink:
    """The sink URL's parts; refuses what is not an absolute http(s) URL without user info."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refusal("sink", f"not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise Refusal("sink", "must be an absolute https:// URL")
    if parts.username or parts.password:
        raise Refusal("sink", "must not carry user or password; use the signature instead")
    if parts.fragment:
        raise Refusal("sink", "must not have a fragment")
    default = 443 if parts.scheme == "https" else 80
    return Sink(url=url, scheme=parts.scheme, host=parts.hostname.lower(), port=port or default)


def ip_literal(host: str) -> str | None:
    """The address if the sink's host is an IP literal (nothing to resolve), else None."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def is_loopback_host(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def forbidden_address(address: str) -> str | None:
    """Why a resolved address may not be a sink in production (SSRF), or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for flag, what in (
        (ip.is_loopback, "a loopback"),
        (ip.is_link_local, "a link-local"),
        (ip.is_private, "a private"),
        (ip.is_multicast, "a multicast"),
        (ip.is_reserved, "a reserved"),
        (ip.is_unspecified, "an unspecified"),
    ):
        if flag:
            return f"{what} address ({ip})"
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("100.64.0.0/10"):
        return f"a shared (carrier-grade NAT) address ({ip})"
    return None


def check_sink(sink: Sink, policy: SinkPolicy, addresses: Sequence[str]) -> None:
    """Refuse a sink by the deployment's sink policy, given the addresses its host resolves
    to (resolved by the caller; empty: it did not resolve)."""
    loopback = is_loopback_host(sink.host)
    if policy == "development" and loopback:
        return  # http:// or https:// to this machine, for a receiver under development
    if sink.scheme != "https":
        raise Refusal(
            "sink",
            "must be https://"
            + (" (http:// only to a loopback address in development)" if loopback else ""),
        )
    if not addresses:
        raise Refusal("sink", f"host {sink.host} does not resolve")
    if policy == "production":
        for address in addresses:
            reason = forbidden_address(address)
            if reason is not None:
                raise Refusal(
                    "sink", f"host {sink.host} resolves to {reason}, which is not allowed"
                )


def webhook_origin_allowed(answer: str | None, origin: str) -> bool:
    """Whether the CloudEvents validation answer (WebHook-Allowed-Origin) admits ``origin``."""
    if answer is None:
        return False
    allowed = {part.strip() for part in answer.split(",")}
    return "*" in allowed or origin in allowed


# -- HTTP rendering ------------------------------------------------------------------------------


def render_http(event: CloudEvent, mode: str) -> tuple[dict[str, str], bytes]:
    """The CloudEvents HTTP protocol binding: headers and body of one delivery.

    binary: every context attribute as a ``ce-<name>`` header, ``content-type:
    application/json`` and the data as the body; structured: the whole event as one
    ``application/cloudevents+json`` document. (The Standard Webhooks signature covers the
    body and ``webhook-id``, which is the CloudEvent id; structured mode signs every attribute.)
    """
    if mode == "structured":
        return {"content-type": "application/cloudevents+json"}, to_structured(event)
    attributes = event.attributes()
    content_type = attributes.pop("datacontenttype", "application/json")
    headers = {f"ce-{name}": value for name, value in attributes.items()}
    headers["content-type"] = content_type
    body = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False).encode()
    return headers, body


# -- retries and the failure budget --------------------------------------------------------------


def retryable(status: int | None) -> bool:
    """Timeouts and connection errors (None), 408, 429 and 5xx are tried again; so is every
    other non-2xx answer (a receiver in trouble must not lose events): only 2xx delivers."""
    return status is None or not 200 <= status < 300


def retry_after(header: str | None, now: datetime) -> float | None:
    """Seconds asked for by a Retry-After header (seconds or an HTTP date), or None."""
    if not header:
        return None
    header = header.strip()
    if header.isdigit():
        return float(header)
    try:
        when = parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def backoff_s(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    asked_s: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before the next attempt: exponential (base · 2^(attempt-1), capped) with "equal
    jitter" (half fixed, half random), and never shorter than a Retry-After (capped too)."""
    exp = min(max_s, base_s * math.pow(2, min(attempt - 1, 30)))
    delay = exp / 2 + rand() * exp / 2
    if asked_s is not None:
        delay = max(delay, min(asked_s, max_s))
    return delay


def budget_spent(
    *,
    consecutive_failures: int,
    failing_since: datetime | None,
    now: datetime,
    max_attempts: int,
    max_s: float,
) -> str | None:
    """Why a failing subscription must be paused now, or None while its budget lasts."""
    if consecutive_failures >= max_attempts:
        return f"paused after {consecutive_failures} failed attempts without a success"
    if failing_since is not None and now - failing_since >= timedelta(seconds=max_s):
        hours = (now - failing_since).total_seconds() / 3600
        return f"paused after {hours:.1f} h of failed deliveries without a success"
    return None
