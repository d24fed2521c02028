"""``python -m lotse_runtime.migrations``: make, check and apply a service's revisions.

See :mod:`lotse_runtime.migrations` for the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from alembic.script import ScriptDirectory

from lotse_runtime.migrations import (
    RUNTIME_BRANCH,
    MigrationError,
    TableLike,
    alembic_config,
    check_migrations,
    make_revision,
    migrate,
    service_tables,
    versions_dir_of,
)


def _default_versions_dir(service: str) -> Path:
    """Where a service's revisions go: the existing directory, else a new one in its package."""
    found = versions_dir_of(service)
    if found is not None:
        return found
    spec = importlib.util.find_spec(f"lotse_{service}")
    if spec is None or not spec.submodule_search_locations:
        raise MigrationError(f"no package lotse_{service}: give --versions-dir")
    package = Path(next(iter(spec.submodule_search_locations)))
    migrations = package / "migrations"
    for folder in (migrations, migrations / "versions"):
        folder.mkdir(exist_ok=True)
        init = folder / "__init__.py"
        if not init.exists():
            init.write_text(f'"""Schema revisions of the {service} service."""\n')
    return migrations / "versions"


def _versions_dir(args: argparse.Namespace) -> Path | None:
    if args.versions_dir is not None:
        return Path(args.versions_dir)
    return versions_dir_of(args.service)


def _tidy(path: Path) -> None:
    """Sort imports, drop unused ones and format, if ruff is installed."""
    for cmd in (["check", "--fix", "--quiet", "--select", "I,F401"], ["format", "--quiet"]):
        try:
            subprocess.run([sys.executable, "-m", "ruff", *cmd, str(path)], check=False)
        except OSError:
            return


async def _revision(args: argparse.Namespace, tables: Sequence[TableLike]) -> int:
    if args.service == RUNTIME_BRANCH:
        versions_dir = None
    elif args.versions_dir is not None:
        versions_dir = Path(args.versions_dir)
    else:
        versions_dir = _default_versions_dir(args.service)
    path = await make_revision(
        args.service,
        args.message,
        tables=tables,
        versions_dir=versions_dir,
        autogenerate=not args.no_autogenerate,
        allow_empty=args.empty,
        rev_id=args.rev_id,
    )
    _tidy(path)
    print(path)
    return 0


async def _check(args: argparse.Namespace, tables: Sequence[TableLike]) -> int:
    from lotse_runtime.db import Database

    with tempfile.TemporaryDirectory(prefix="lotse-check-") as scratch:
        url = args.database_url or f"sqlite+aiosqlite:///{Path(scratch) / 'scratch.db'}"
        db = Database(url)
        try:
            diffs = await check_migrations(
                db, tables, service=args.service, versions_dir=_versions_dir(args)
            )
        finally:
            await db.dispose()
    for diff in diffs:
        print(diff)
    if diffs:
        print(
            f"{len(diffs)} difference(s) between the models and the revisions of "
            f"{args.service!r}; make a revision: python -m lotse_runtime.migrations "
            f"revision {args.service} -m ...",
            file=sys.stderr,
        )
        return 1
    print(f"{args.service}: revisions match the models")
    return 0


async def _upgrade(args: argparse.Namespace, tables: Sequence[TableLike]) -> int:
    from lotse_runtime.db import Database

    db = Database(args.database_url)
    try:
        result = await migrate(
            db,
            tables,
            service=args.service,
            versions_dir=_versions_dir(args),
            create_unmigrated=args.create_unmigrated,
        )
    finally:
        await db.dispose()
    print(f"{args.service}: {', '.join(result.before) or 'empty'} -> {', '.join(result.heads)}")
    return 0


def _history(args: argparse.Namespace) -> int:
    config = alembic_config(service=args.service, versions_dir=_versions_dir(args))
    for script in ScriptDirectory.from_config(config).walk_revisions():
        print(script.cmd_format(verbose=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lotse_runtime.migrations",
        description="Schema revisions of Lotse services (Alembic, one database per service).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_)
        sub.add_argument("service", help="service name (e.g. intake), or 'runtime'")
        sub.add_argument("--versions-dir", help="default: lotse_<service>/migrations/versions")
        sub.add_argument(
            "--tables",
            metavar="MODULE:ATTR",
            help="sequence of table classes; default: SQLModel tables of lotse_<service>",
        )
        return sub

    revision = command("revision", "write a new revision (autogenerated)")
    revision.add_argument("-m", "--message", required=True)
    revision.add_argument("--empty", action="store_true", help="write it even if nothing changed")
    revision.add_argument("--no-autogenerate", action="store_true", help="an empty template")
    revision.add_argument("--rev-id", help="revision id (default: random)")
    check = command("check", "compare the migrated schema with the models (exit 1 if they differ)")
    check.add_argument("--database-url", help="default: a scratch SQLite database")
    upgrade = command("upgrade", "upgrade a database to the heads")
    upgrade.add_argument("--database-url", required=True)
    upgrade.add_argument(
        "--no-create-unmigrated",
        dest="create_unmigrated",
        action="store_false",
        help="do not create tables no revision creates",
    )
    command("history", "list the revisions, newest first")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lotse_runtime", "alembic.runtime.migration", "alembic.autogenerate.compare"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        if args.command == "history":
            return _history(args)
        tables = service_tables(args.service, args.tables)
        if args.command == "revision":
            return asyncio.run(_revision(args, tables))
        if args.command == "check":
            return asyncio.run(_check(args, tables))
        return asyncio.run(_upgrade(args, tables))
    except MigrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
