"""The offer catalogue's use cases: which Träger offers which module in which Stadtbezirk,
with capacity and this month's load; seeding it from the city configuration, reading,
changing and suggesting entries, and locking a Träger's places while a referral is made.

Each use case works in a transaction of its own (``ctx.db``) and knows nothing of HTTP: a
refusal is a :class:`~lotse_runtime.refusal.Refusal`, a caller without the right an
:class:`~lotse_runtime.identity.AccessDenied`.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from lotse_contracts.city import Municipality
from lotse_contracts.events.referrals import ReferralStatus
from lotse_runtime.identity import AccessDenied, Caller, Role
from lotse_runtime.refusal import Conflict, Refusal
from sqlalchemy import func, select
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


def offer_of(row: CatalogueTraeger, used: int) -> Offer:
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
    rows = (
        await session.execute(select(CatalogueTraeger).execution_options(populate_existing=True))
    ).scalars()
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
    try:
        return await _seed_catalogue(ctx, now)
    except IntegrityError:
        # Another replica seeded the same rows at the same moment; its rows are as good.
        return await _seed_catalogue(ctx, now)


async def _seed_catalogue(ctx: Context, now: datetime) -> int:
    changed = 0
    async with ctx.db.transaction() as session:
        rows = {r.slug: r for r in (await session.execute(select(CatalogueTraeger))).scalars()}
        await _same_city(session, ctx, rows, now)
        configured = {t.slug for t in ctx.city.traeger}
        # In slug order, the order in which new referrals lock Träger rows (no deadlock).
        for traeger in sorted(ctx.city.traeger, key=lambda t: t.slug):
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
            elif _reconcile(row, wanted, ctx.city):
                row.updated_at = now
                changed += 1
        for slug in sorted(set(rows) - configured):
            row = rows[slug]
            if not row.retired:
                row.retired = True
                row.updated_at = now
                changed += 1
                _log.warning(
                    "Träger retired: no longer in the city configuration",
                    extra={"traeger": slug, "city": ctx.city.slug},
                )
    return changed


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
    if traeger is not None:
        slugs = [traeger]
    else:
        rows = (await session.execute(select(CatalogueTraeger))).scalars()
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
