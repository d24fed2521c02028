"""``lotse-simulator``: a seeded city year driven through a Lotse platform, and its check.

  lotse-simulator plan  --seed 7 [--families N | --scale S]   print the plan's fingerprint
  lotse-simulator run   --truth truth.json [...]              drive a running platform
  lotse-simulator check --truth truth.json [...]              compare it with the platform
  lotse-simulator demo  [--scale 0.1 | --families N]          start a platform on the
                                                              simulated clock and fill it

``run`` and ``check`` talk to the platform at --intake-url ... --reporting-url and Kafka at
--bootstrap (or LOTSE_KAFKA_BOOTSTRAP); left out, where ``lotse up`` says it started them
(<data-dir>/platform.json), else 127.0.0.1:8001-8004 and 127.0.0.1:9092. They sign their
tokens with the development issuer's key in --data-dir (default var/, as ``lotse up``
writes it) or with --jwks-key.
With --clock-file (a platform started by ``demo`` or :mod:`lotse_simulator.platform`) the
platform's clock follows the simulated calendar; without it the platform keeps the wall
clock and visits whose appointment lies in the future stay scheduled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path

from lotse_contracts.city import Municipality, load_city
from lotse_tooling import platform_file
from lotse_tooling.platform_file import DEFAULT_BOOTSTRAP
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from lotse_simulator import truth as truth_file
from lotse_simulator.checker import CheckReport, check
from lotse_simulator.driver import Driver
from lotse_simulator.endpoints import Endpoints, Tokens
from lotse_simulator.plan import CityPlan, make_plan, plan_digest
from lotse_simulator.platform import SimulatedPlatform
from lotse_simulator.truth import Truth

NO_KPIS = "skip the key figures (they count every family, also those of earlier runs)"


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--city", default="dortmund", help="city name or TOML path")
    parser.add_argument("--seed", type=int, default=2025)
    parser.add_argument("--year", type=int, default=date.today().year - 1)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--families", type=int, help="families in total (births and move-ins)")
    size.add_argument(
        "--scale", type=float, default=1.0, help="share of the city's yearly figures (default 1)"
    )


def _platform_arguments(parser: argparse.ArgumentParser) -> None:
    found = "default: as <data-dir>/platform.json of `lotse up` says, else "
    defaults = Endpoints()
    for name in SERVICE_NAMES:
        default = getattr(defaults, name)
        parser.add_argument(f"--{name}-url", default=None, help=found + default)
    parser.add_argument(
        "--bootstrap",
        default=None,
        help="Kafka bootstrap (default: LOTSE_KAFKA_BOOTSTRAP, else as <data-dir>/platform.json "
        f"of `lotse up` says, else {DEFAULT_BOOTSTRAP})",
    )
    parser.add_argument("--topic-prefix", default=None)
    parser.add_argument("--data-dir", type=Path, default=Path("var"))
    parser.add_argument("--jwks-key", type=Path, help="issuer private key (PEM) to sign with")


#: The services the simulator talks to, by their --<name>-url flags.
SERVICE_NAMES = ("intake", "visits", "referrals", "reporting")


def _endpoints(args: argparse.Namespace) -> Endpoints:
    """Explicit flags win; then (bootstrap) LOTSE_KAFKA_BOOTSTRAP; then the platform file
    ``lotse up`` wrote into --data-dir; then the usual local addresses."""
    data_dir: Path = args.data_dir
    defaults = Endpoints()
    try:
        bootstrap, _ = platform_file.resolve_bootstrap(args.bootstrap, data_dir)
        urls = {
            name: platform_file.service_url(
                getattr(args, f"{name}_url"), name, data_dir, getattr(defaults, name)
            )
            for name in SERVICE_NAMES
        }
        running = platform_file.read(data_dir)
    except platform_file.PlatformFileError as exc:
        raise SystemExit(f"lotse-simulator: {exc}") from exc
    prefix = args.topic_prefix
    if prefix is None:
        prefix = running.topic_prefix if running is not None else ""
    return Endpoints(**urls, bootstrap=bootstrap, topic_prefix=prefix)


def _tokens(args: argparse.Namespace) -> Tokens:
    return Tokens(args.jwks_key or args.data_dir / "dev-issuer-key.pem")


def _plan(args: argparse.Namespace, city: Municipality) -> CityPlan:
    return make_plan(
        city,
        seed=args.seed,
        year=args.year,
        families=args.families,
        scale=args.scale,
    )


def drive(
    plan: CityPlan,
    city: Municipality,
    endpoints: Endpoints,
    tokens: Tokens,
    *,
    clock_file: Path | None,
    rate: float | None = None,
    settle_days: int = 1,
    console: Console | None = None,
) -> Truth:
    """Run ``plan`` with a progress bar; returns the ground truth."""
    console = console or Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("families · simulated {task.fields[day]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(city.name, total=len(plan.families), day="-")

        def show(day: str, done: int, total: int) -> None:
            progress.update(task, completed=done, day=day)

        driver = Driver(
            plan,
            city,
            endpoints,
            tokens,
            clock_file=clock_file,
            rate=rate,
            progress=show,
            settle_days=settle_days,
        )
        return asyncio.run(driver.run())


def _summary(truth: Truth) -> str:
    referrals = [f.referral for f in truth.families if f.referral and f.referral.referral_id]
    visits = [v for f in truth.families for v in f.visits]
    return (
        f"{len(truth.families)} families, {len(visits)} visits "
        f"({sum(v.status == 'completed' for v in visits)} completed), "
        f"{len(referrals)} referrals, "
        f"{sum(1 for f in truth.families for c in f.consents if c.withdrawn_at)} withdrawals, "
        f"{sum(1 for f in truth.families if f.erased_at)} erasures; "
        f"simulated {truth.sim_started_at[:10]} .. {truth.sim_finished_at[:10]}"
    )


def run_check(
    truth: Truth,
    city: Municipality,
    endpoints: Endpoints,
    tokens: Tokens,
    timeout_s: float,
    *,
    kpis: bool = True,
) -> CheckReport:
    return asyncio.run(
        check(truth, endpoints, tokens, zone=city.zone(), timeout_s=timeout_s, kpis=kpis)
    )


def _cmd_plan(args: argparse.Namespace) -> int:
    city = load_city(args.city)
    plan = _plan(args, city)
    referrals = sum(1 for f in plan.families if f.referral)
    print(
        json.dumps(
            {
                "city": plan.city,
                "seed": plan.seed,
                "year": plan.year,
                "families": len(plan.families),
                "referrals": referrals,
                "digest": plan_digest(plan),
            }
        )
    )
    if args.output:
        args.output.write_text(json.dumps(plan.to_json(), indent=1, ensure_ascii=False))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    city = load_city(args.city)
    plan = _plan(args, city)
    endpoints, tokens = _endpoints(args), _tokens(args)
    truth = drive(plan, city, endpoints, tokens, clock_file=args.clock_file, rate=args.rate)
    truth_file.save(truth, args.truth, city.zone())
    print(f"ground truth: {args.truth} ({_summary(truth)})")
    for problem in truth.problems[:20]:
        print(f"  problem: {problem}")
    if args.check:
        report = run_check(truth, city, endpoints, tokens, args.timeout, kpis=not args.no_kpis)
        print(report.summary())
        return 0 if report.ok else 1
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    city = load_city(args.city)
    truth = truth_file.load(args.truth)
    report = run_check(
        truth, city, _endpoints(args), _tokens(args), args.timeout, kpis=not args.no_kpis
    )
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    city = load_city(args.city)
    plan = _plan(args, city)
    data_dir: Path = args.data_dir
    # The embedded broker forgets everything on exit: the demo's databases must start empty too.
    if data_dir.exists():
        shutil.rmtree(data_dir)
    start = min(f.registered_at for f in plan.families)
    platform = SimulatedPlatform(
        data_dir=data_dir,
        start_at=datetime(start.year, start.month, start.day, tzinfo=UTC),
        city=args.city,
    )
    console = Console(stderr=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        console.print(f"starting Lotse on the simulated clock ({data_dir}) ...")
        endpoints = platform.start()
        tokens = Tokens(platform.issuer_key)
        console.print(
            f"intake {endpoints.intake}  visits {endpoints.visits}  "
            f"referrals {endpoints.referrals}  reporting {endpoints.reporting}"
        )
        console.print(f"dashboard: {endpoints.reporting}/dashboard  (Ctrl-C stops everything)")
        truth = drive(
            plan,
            city,
            endpoints,
            tokens,
            clock_file=platform.clock_file,
            rate=args.rate,
            console=console,
        )
        truth_path = data_dir / "truth.json"
        truth_file.save(truth, truth_path, city.zone())
        console.print(f"ground truth: {truth_path} ({_summary(truth)})")
        report = run_check(truth, city, endpoints, tokens, args.timeout)
        console.print(report.summary())
        console.print(
            f"dashboard: {endpoints.reporting}/dashboard?year={plan.year} — Ctrl-C stops it"
        )
        while all(p.poll() is None for p in platform.processes.values()):
            time.sleep(1.0)
        console.print("a service stopped; see its log in " + str(data_dir))
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        console.print("stopping ...")
        platform.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lotse-simulator", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="print the fingerprint of a seeded plan")
    _plan_arguments(plan)
    plan.add_argument("--output", type=Path, help="also write the plan as JSON")
    plan.set_defaults(handler=_cmd_plan)

    run = commands.add_parser("run", help="drive a running platform through the plan")
    _plan_arguments(run)
    _platform_arguments(run)
    run.add_argument("--truth", type=Path, default=Path("truth.json"))
    run.add_argument("--clock-file", type=Path, help="the platform's simulated clock")
    run.add_argument("--rate", type=float, help="at most this many actions a second")
    run.add_argument("--check", action="store_true", help="check the truth afterwards")
    run.add_argument(
        "--settle-days", type=int, default=1, help="look up the platform's replies this often"
    )
    run.add_argument("--timeout", type=float, default=120.0, help="check: settling bound (s)")
    run.add_argument("--no-kpis", action="store_true", help=NO_KPIS)
    run.set_defaults(handler=_cmd_run)

    check_parser = commands.add_parser("check", help="compare a ground truth with the platform")
    check_parser.add_argument("--city", default="dortmund")
    _platform_arguments(check_parser)
    check_parser.add_argument("--truth", type=Path, required=True)
    check_parser.add_argument("--timeout", type=float, default=120.0)
    check_parser.add_argument("--no-kpis", action="store_true", help=NO_KPIS)
    check_parser.set_defaults(handler=_cmd_check)

    demo = commands.add_parser("demo", help="start a platform on the simulated clock, fill it")
    _plan_arguments(demo)
    demo.add_argument("--data-dir", type=Path, default=Path("var/demo"))
    demo.add_argument("--rate", type=float)
    demo.add_argument("--settle-days", type=int, default=7)
    demo.add_argument("--timeout", type=float, default=300.0)
    # A tenth of Dortmund's year (600 families) fills every month in minutes; --scale 1 is all.
    demo.set_defaults(handler=_cmd_demo, scale=0.1)

    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
