"""Which SQL statements each service runs per family, and from where in its code.

Runs ``pipeline.py`` (N families end to end, real broker, each service on its own
database) with a probe in every service process (``bench/statement_probe``) that counts the
statements SQLAlchemy sends and the innermost Lotse frames they come from. Prints, per
service, statements per family and the statements with their call sites, most frequent
first (the migrations run at start left out); writes bench/results/statements.json.

Counted, not timed: with the probe listening, the runtime sends every statement through
SQLAlchemy (as it does when tracing exports), so this run's CPU figures are not the
pipeline's. What it is for: the services' CPU per family is mostly the ORM's work per
statement (docs/performance.md), so the count per family and where each comes from name
the next statement worth removing or building once.

Usage:  uv run --frozen python bench/statements.py [--families 400] [--database postgresql]
                                                   [--top 15]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "statements.json"
SERVICE = re.compile(r"lotse_(\w+)\.app")


def count(families: int, database: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pipeline's result and, per service, the statements its processes counted."""
    with tempfile.TemporaryDirectory(prefix="lotse-statements-") as scratch:
        probes = Path(scratch) / "probes"
        probes.mkdir()
        env = {
            **os.environ,
            "BENCH_STATEMENT_PROBE": str(probes),
            "PYTHONPATH": os.pathsep.join(
                [str(HERE / "statement_probe"), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        output = Path(scratch) / "pipeline.json"
        command = [sys.executable, str(HERE / "pipeline.py"), "--families", str(families)]
        command += ["--output", str(output)] + (["--database", database] if database else [])
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        pipeline = json.loads(output.read_text())
        by_service: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)
        for dump in probes.glob("*.json"):
            document = json.loads(dump.read_text())
            found = SERVICE.search(" ".join(document["argv"]))
            if found is None:
                continue  # the benchmark's own process
            rows = by_service[found.group(1)]
            for row in document["statements"]:
                if "migrations/" in row["sites"]:
                    continue  # the schema's set-up at start, not a family's work
                key = (row["statement"], row["sites"])
                rows[key] = rows.get(key, 0) + row["count"]
    services = {
        name: [
            {"statement": statement, "sites": sites, "per_family": round(n / families, 3)}
            for (statement, sites), n in sorted(rows.items(), key=lambda item: -item[1])
        ]
        for name, rows in sorted(by_service.items())
    }
    return pipeline, services


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", type=int, default=400)
    parser.add_argument("--database", default=None, help="postgresql, or a PostgreSQL URL")
    parser.add_argument("--top", type=int, default=15, help="statements shown per service")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    pipeline, services = count(args.families, args.database)
    result = {
        "benchmark": "statements",
        "when": pipeline["when"],
        "machine": pipeline["machine"],
        "database": pipeline["database"],
        "families": args.families,
        "complete": pipeline["complete"],
        "statements_per_family": {
            name: round(sum(row["per_family"] for row in rows), 2)
            for name, rows in services.items()
        },
        "services": services,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"statements per family ({result['database']}, {args.families} families):")
    for name, rows in services.items():
        print(f"\n{name}: {result['statements_per_family'][name]} per family")
        for row in rows[: args.top]:
            print(f"  {row['per_family']:6.2f}  {row['statement'][:60]:60}  @ {row['sites']}")
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
