"""The offer catalogue's use cases: which Träger offers which module in which Stadtbezirk,
with capacity and this month's load; seeding it from the city configuration, reading,
changing and suggesting entries, and locking a Träger's places while a referral is made.

Each use case works in a transaction of its own (``ctx.db``) and knows nothing of HTTP: a
refusal is a :class:`~lotse_runtime.refusal.Refusal`, a caller without the right an
:class:`~lotse_runtime.identity.AccessDenied`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol

from lotse_contracts.city import CityConfigError, Municipality, Traeger, parse_city
from lotse_contracts.events.referrals import ReferralStatus
from lotse_runtime.identity import AccessDenied, Caller, Role
from lotse_runtime.refusal import Conflict, Refusal
from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_referrals import domain
from lotse_referrals.context import Context
from lotse_referrals.domain import Offer
from lotse_referrals.tables import CatalogueCity, CatalogueTraeger, Referral

_log = logging.getLogger(__name__)

#: A catalogue entry with the places it holds this month.
Listing = tuple[CatalogueTraeger, int]


# --- reading the catalogue ----------------------------------------------------------------


async def usage_this_month(session: AsyncSession, ctx: Context, now: datetime) -> dict[str, int]:
    """Referrals per Träger requested this month (city time) that hold a place: all but the
    rejected and the cancelled ones."""
    query = (
        select(col(Referral.traeger), func.count())
        .where(col(Referral.requested_at) >= ctx.month_start_utc(now))
        .where(
            col(Referral.status).not_in(
                [ReferralStatus.REJECTED.value, ReferralStatus.CANCELLED.value]
            )
        )
        .group_by(Referral.traeger)
    )
    return {slug: int(n) for slug, n in (await session.execute(query)).all()}


class OfferFields(Protocol):
    """What an offer is made of: a catalogue row, or just its columns read with Core."""

    slug: str
    name: str
    modules: list[str]
    bezirke: list[str]
    capacity_per_month: int
    active: bool
    retired: bool


def _offer_columns() -> Select[str, str, list[str], list[str], int, bool, bool]:
    """The columns of the catalogue an offer needs, read as plain rows: creating a referral
    reads every Träger, and ORM objects (refreshed in place) cost more than the rows."""
    return select(
        col(CatalogueTraeger.slug),
        col(CatalogueTraeger.name),
        col(CatalogueTraeger.modules),
        col(CatalogueTraeger.bezirke),
        col(CatalogueTraeger.capacity_per_month),
        col(CatalogueTraeger.active),
        col(CatalogueTraeger.retired),
    )


def offer_of(row: OfferFields, used: int) -> Offer:
    return Offer(
        traeger=row.slug,
        name=row.name,
        modules=tuple(row.modules),
        bezirke=tuple(row.bezirke),
        capacity_per_month=row.capacity_per_month,
        used_this_month=used,
        # A Träger the city file no longer names takes no new referrals, whatever its flag.
        active=row.active and not row.retired,
    )


async def load_offers(session: AsyncSession, ctx: Context, now: datetime) -> dict[str, Offer]:
    used = await usage_this_month(session, ctx, now)
    rows: Sequence[OfferFields] = (await session.execute(_offer_columns())).all()
    return {r.slug: offer_of(r, used.get(r.slug, 0)) for r in rows}


async def _listings(session: AsyncSession, ctx: Context, now: datetime) -> list[Listing]:
    used = await usage_this_month(session, ctx, now)
    rows = (
        await session.execute(select(CatalogueTraeger).order_by(col(CatalogueTraeger.slug)))
    ).scalars()
    return [(row, used.get(row.slug, 0)) for row in rows]


async def list_traeger(ctx: Context, *, module: str | None, bezirk: str | None) -> list[Listing]:
    """Every Träger of the catalogue (offering ``module``, serving ``bezirk``), by slug."""
    async with ctx.db.transaction() as session:
        listings = await _listings(session, ctx, ctx.clock())
    return [
        (row, used)
        for row, used in listings
        if (module is None or offer_of(row, used).offers(module))
        and (bezirk is None or offer_of(row, used).serves(bezirk))
    ]


async def _entry(session: AsyncSession, slug: str) -> CatalogueTraeger:
    row = await session.get(CatalogueTraeger, slug)
    if row is None:
        raise Refusal("slug", f"no Träger {slug} in the catalogue", status=404)
    return row


async def get_traeger(ctx: Context, slug: str) -> Listing:
    async with ctx.db.transaction() as session:
        row = await _entry(session, slug)
        used = await usage_this_month(session, ctx, ctx.clock())
    return row, used.get(slug, 0)


async def suggest_traeger(ctx: Context, *, bezirk: str, module: str) -> list[Listing]:
    """Träger offering ``module`` in ``bezirk``, free capacity first (domain.suggest)."""
    if bezirk not in ctx.city.bezirk_slugs:
        raise Refusal("bezirk", f"unknown Stadtbezirk {bezirk}")
    if module not in ctx.city.module_slugs:
        raise Refusal("module", f"unknown module {module}")
    async with ctx.db.transaction() as session:
        rows = {row.slug: (row, used) for row, used in await _listings(session, ctx, ctx.clock())}
    offers = [offer_of(row, used) for row, used in rows.values()]
    return [rows[o.traeger] for o in domain.suggest(offers, bezirk=bezirk, module=module)]


# --- changing the catalogue ---------------------------------------------------------------


def _check_change(caller: Caller, slug: str, changes: dict[str, Any], city: Municipality) -> None:
    """Who may change what (a Träger its own entry's contact, capacity and activity;
    coordination everything), and that named modules and Bezirke exist."""
    if caller.role is not Role.koordination:
        # The policy admits Träger and coordination only; a Träger edits its own entry.
        if caller.role is not Role.traeger or caller.traeger != slug:
            raise AccessDenied("a Träger may change only its own entry")
        if {"modules", "bezirke", "name"} & {k for k, v in changes.items() if v is not None}:
            raise AccessDenied("a Träger may change only contact, capacity and activity")
    modules = changes.get("modules")
    if modules is not None:
        unknown = [m for m in modules if m not in city.module_slugs]
        if unknown:
            raise Refusal("modules", f"unknown module(s) {', '.join(unknown)}")
    bezirke = changes.get("bezirke")
    if bezirke is not None and bezirke != ["*"]:
        unknown = [b for b in bezirke if b not in city.bezirk_slugs]
        if unknown:
            raise Refusal(
                "bezirke", f'unknown Stadtbezirk(e) {", ".join(unknown)}; use ["*"] for all'
            )


async def update_traeger(
    ctx: Context, caller: Caller, slug: str, changes: dict[str, Any]
) -> Listing:
    """Change a catalogue entry (fields given and not None); it is kept over restarts."""
    _check_change(caller, slug, changes, ctx.city)
    now = ctx.clock()
    async with ctx.db.transaction() as session:
        row = await _entry(session, slug)
        if row.retired:
            raise Conflict(
                "slug",
                f"Träger {slug} is no longer in the configuration of {ctx.city.name} (retired); "
                "add it to the city file to change it",
            )
        changed = [k for k, v in changes.items() if v is not None]
        for key in changed:
            setattr(row, key, changes[key])
        row.edited_fields = sorted(set(row.edited_fields or []) | set(changed))
        row.edited = bool(row.edited_fields)
        row.updated_at = now
        session.add(row)
        used = await usage_this_month(session, ctx, now)
    return row, used.get(slug, 0)


class CityMismatch(RuntimeError):
    """The database holds another city's catalogue: starting would mix two cities."""


#: The fields of a catalogue entry the city file sets (``active`` is the API's only).
FILE_FIELDS = ("name", "contact", "modules", "bezirke", "capacity_per_month")


async def seed_catalogue(ctx: Context, now: datetime) -> int:
    """Reconcile the catalogue tables with the city configuration (at every start).

    * The database remembers its city; another city's configuration is refused
      (:class:`CityMismatch`) instead of mixing two cities' Träger.
    * A new Träger of the file is added. For a known one, each field the file sets follows
      the file, except one changed through the API (``edited_fields``), which keeps its
      edit until the file changes that same field (the file's values as last applied are
      in ``seeded``); ``active`` is set through the API only.
    * A Träger the file no longer names is retired, never deleted: its referrals keep
      pointing at it and can be followed and answered, no new referral goes to it, and it
      comes back if the file names it again. Modules and Bezirke the city no longer has
      are dropped from every entry."""
    return (await _seed_with_retry(ctx, now, list(ctx.city.traeger))).changed


@dataclass(frozen=True)
class Applied:
    """What one reconciliation changed: entries touched, Träger retired and restored."""

    changed: int = 0
    retired: tuple[str, ...] = ()
    restored: tuple[str, ...] = ()


async def _seed_with_retry(ctx: Context, now: datetime, configured: list[Traeger]) -> Applied:
    try:
        return await _seed_catalogue(ctx, now, configured)
    except IntegrityError:
        # Another replica seeded the same rows at the same moment; its rows are as good.
        return await _seed_catalogue(ctx, now, configured)


async def _seed_catalogue(ctx: Context, now: datetime, configured: list[Traeger]) -> Applied:
    changed = 0
    retired: list[str] = []
    restored: list[str] = []
    async with ctx.db.transaction() as session:
        rows = {r.slug: r for r in (await session.execute(select(CatalogueTraeger))).scalars()}
        await _same_city(session, ctx, rows, now)
        slugs = {t.slug for t in configured}
        # In slug order, the order in which new referrals lock Träger rows (no deadlock).
        for traeger in sorted(configured, key=lambda t: t.slug):
            row = rows.get(traeger.slug)
            wanted: dict[str, Any] = {
                "name": traeger.name,
                "contact": traeger.contact,
                "modules": list(traeger.modules),
                "bezirke": list(traeger.bezirke),
                "capacity_per_month": traeger.capacity_per_month,
            }
            if row is None:
                session.add(
                    CatalogueTraeger(slug=traeger.slug, **wanted, seeded=wanted, updated_at=now)
                )
                changed += 1
                continue
            was_retired = row.retired
            if _reconcile(row, wanted, ctx.city):
                row.updated_at = now
                changed += 1
            if was_retired:
                restored.append(row.slug)
        for slug in sorted(set(rows) - slugs):
            row = rows[slug]
            if not row.retired:
                row.retired = True
                row.updated_at = now
                changed += 1
                retired.append(slug)
                _log.warning(
                    "Träger retired: no longer in the city configuration",
                    extra={"traeger": slug, "city": ctx.city.slug},
                )
    return Applied(changed, tuple(retired), tuple(restored))


def _reconcile(row: CatalogueTraeger, wanted: dict[str, Any], city: Municipality) -> bool:
    """Apply the file's values to a known entry, field by field (see seed_catalogue)."""
    before = {k: getattr(row, k) for k in (*FILE_FIELDS, "retired", "edited_fields", "seeded")}
    previous = row.seeded or {}
    edited = set(row.edited_fields or [])
    for key, value in wanted.items():
        file_changed = key in previous and previous[key] != value
        if file_changed:
            edited.discard(key)
        if key not in edited:
            setattr(row, key, value)
    # What the city no longer has cannot stay in an edited entry either.
    row.modules = [m for m in row.modules if m in city.module_slugs] or list(wanted["modules"])
    row.bezirke = [b for b in row.bezirke if b == "*" or b in city.bezirk_slugs] or list(
        wanted["bezirke"]
    )
    row.edited_fields = sorted(edited)
    row.edited = bool(edited)
    row.seeded = dict(wanted)
    row.retired = False
    after = {k: getattr(row, k) for k in before}
    return after != before


async def _same_city(
    session: AsyncSession, ctx: Context, rows: dict[str, CatalogueTraeger], now: datetime
) -> None:
    """Refuse another city's catalogue; remember this city on the first start."""
    city = ctx.city
    recorded = list((await session.execute(select(CatalogueCity))).scalars())
    other = [r for r in recorded if r.slug != city.slug]
    if other:
        raise CityMismatch(
            f"the referrals database holds the offer catalogue of {other[0].name} "
            f"({other[0].slug}, seeded {other[0].seeded_at:%Y-%m-%d}), but the configured city "
            f"is {city.name} ({city.slug}): start {city.name} with its own data directory "
            "or database (e.g. another var/ or LOTSE_REFERRALS_DATABASE_URL), or configure "
            f"{other[0].slug} again; two cities' catalogues are never mixed"
        )
    if recorded:
        return
    known = set(city.traeger_slugs)
    if rows and not known & set(rows):
        raise CityMismatch(
            f"the referrals database holds Träger of another city ({', '.join(sorted(rows)[:5])}"
            f"{', …' if len(rows) > 5 else ''}) and none of {city.name} ({city.slug}): start "
            f"{city.name} with its own data directory or database; two cities' catalogues are "
            "never mixed"
        )
    session.add(CatalogueCity(slug=city.slug, name=city.name, seeded_at=now))


# --- the places of a new referral ---------------------------------------------------------


async def lock_places(
    session: AsyncSession, *, traeger: str | None, module: str, bezirk: str
) -> list[str]:
    """Lock the catalogue rows of the Träger a new referral may go to (``traeger``, or every
    Träger offering ``module`` in ``bezirk``), in slug order, until the transaction ends.

    Whoever creates a referral holds these locks while it counts the places taken and
    inserts, so two requests for the last place of a Träger run one after the other and the
    second counts the first's referral (PostgreSQL, ``SELECT ... FOR UPDATE``; a statement
    after the lock sees everything committed before it). SQLite's transactions hold the
    database's write lock from their start, so nothing is needed there."""
    if session.get_bind().dialect.name == "sqlite":
        return []  # a statement that locks nothing: the transaction holds the write lock
    if traeger is not None:
        slugs = [traeger]
    else:
        rows: Sequence[OfferFields] = (await session.execute(_offer_columns())).all()
        slugs = sorted(
            r.slug for r in rows if offer_of(r, 0).offers(module) and offer_of(r, 0).serves(bezirk)
        )
    if not slugs:
        return []
    locked = await session.execute(
        select(col(CatalogueTraeger.slug))
        .where(col(CatalogueTraeger.slug).in_(slugs))
        .order_by(col(CatalogueTraeger.slug))
        .with_for_update()
    )
    return list(locked.scalars())


# --- the city file changed while the service runs -----------------------------------------


def city_file_text(name_or_path: str) -> tuple[str, str]:
    """The city file's text and how to name it: a path, or a city packaged with the
    contracts (``lotse_contracts/cities/<name>.toml``), as ``load_city`` reads it."""
    if "/" in name_or_path or "\\" in name_or_path or name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise Refusal("city", f"cannot read the city file {path}: {exc.strerror}") from exc
    resource = files("lotse_contracts").joinpath("cities", f"{name_or_path}.toml")
    try:
        return resource.read_text(encoding="utf-8"), f"{name_or_path} (packaged)"
    except OSError as exc:
        raise Refusal("city", f"cannot read the packaged city {name_or_path}: {exc}") from exc


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Reconciled:
    """The outcome of reconciling the catalogue with the city file while running."""

    source: str
    file_changed: bool
    """Whether the file differs from the one the catalogue was last reconciled with."""
    applied: Applied = field(default_factory=Applied)
    needs_restart: list[str] = field(default_factory=list)
    """File changes the running service cannot take over (they change topics, ACLs or the
    city's modules and Bezirke): they apply at the next start."""
    open_of_retired: dict[str, int] = field(default_factory=dict)
    """Open referrals per retired Träger, city-wide (each Bezirk lists its own)."""


def _restart_changes(running: Municipality, new: Municipality) -> list[str]:
    problems = []
    added = sorted(set(new.traeger_slugs) - set(running.traeger_slugs))
    if added:
        problems.append(
            f"new Träger {', '.join(added)}: their Kafka topics and ACLs come with the next start"
        )
    for what, before, after in (
        ("modules", running.module_slugs, new.module_slugs),
        ("Stadtbezirke", running.bezirk_slugs, new.bezirk_slugs),
    ):
        if set(before) != set(after):
            problems.append(f"the city's {what} changed: they apply at the next start")
    return problems


async def reconcile_with_file(ctx: Context, now: datetime, *, force: bool) -> Reconciled:
    """Reconcile the catalogue with the city file as it is now, as at start
    (:func:`seed_catalogue`), when the file changed since the last look (or ``force``).

    The file is read and validated first: a file that does not parse (``Refusal`` on
    ``city``, 422) or names another city (``Conflict``, 409) changes nothing. Träger the
    file no longer names are retired; field changes of the others apply at once. What the
    running service cannot take over (new Träger, other modules or Bezirke) is reported in
    ``needs_restart`` and left for the next start."""
    text, source = city_file_text(ctx.settings.city)
    seen = fingerprint(text)
    changed = seen != ctx.city_fingerprint
    if not force and not changed:
        return Reconciled(source=source, file_changed=False)
    try:
        new = parse_city(text, source=source)
    except CityConfigError as exc:
        raise Refusal("city", f"{exc}; nothing was changed") from exc
    if new.slug != ctx.city.slug:
        raise Conflict(
            "city",
            f"{source} now configures {new.name} ({new.slug}), but this service runs "
            f"{ctx.city.name} ({ctx.city.slug}); two cities' catalogues are never mixed, "
            "nothing was changed",
        )
    known = set(ctx.city.traeger_slugs)
    applied = await _seed_with_retry(ctx, now, [t for t in new.traeger if t.slug in known])
    ctx.city_fingerprint = seen
    async with ctx.db.transaction() as session:
        open_of_retired = await _open_of_retired(session)
    return Reconciled(
        source=source,
        file_changed=changed,
        applied=applied,
        needs_restart=_restart_changes(ctx.city, new),
        open_of_retired=open_of_retired,
    )


async def _open_of_retired(session: AsyncSession) -> dict[str, int]:
    query = (
        select(col(Referral.traeger), func.count())
        .join(CatalogueTraeger, col(CatalogueTraeger.slug) == col(Referral.traeger))
        .where(col(CatalogueTraeger.retired).is_(True))
        .where(col(Referral.status).in_([s.value for s in domain.OPEN_STATUSES]))
        .group_by(col(Referral.traeger))
    )
    return {slug: int(n) for slug, n in (await session.execute(query)).all()}


def retired_traeger_query(bezirk: str) -> Any:
    """A Stadtbezirk's open referrals addressed to a retired Träger, oldest first: they need
    a person (no new referral goes to that Träger; its Kafka answers are no longer read)."""
    return (
        select(Referral)
        .join(CatalogueTraeger, col(CatalogueTraeger.slug) == col(Referral.traeger))
        .where(col(CatalogueTraeger.retired).is_(True))
        .where(col(Referral.bezirk) == bezirk)
        .where(col(Referral.status).in_([s.value for s in domain.OPEN_STATUSES]))
        .order_by(col(Referral.requested_at))
    )
