"""Fails when a secret is committed: detect-secrets over the repository's files.

    uv run --frozen python scripts/check_secrets.py                   # what `./lotse test` runs
    uv run --frozen python scripts/check_secrets.py FILE ...          # only these files
    uv run --frozen python scripts/check_secrets.py --update-baseline # record false positives
    uv run --frozen python scripts/check_secrets.py --audit           # then audit them

Scans the files git knows or would add (``git ls-files --cached --others --exclude-standard``:
tracked and new, not ignored; so not .venv, .env or the generated dev secrets) with the
plugins the baseline lists: detect-secrets' generic ones (keywords, high-entropy strings,
URL credentials, private keys, JWTs) and those for tokens a developer here might hold (cloud,
code hosting, package index, chat, payment; other providers' detectors cost time and find
nothing Lotse uses), plus Lotse's own (scripts/secrets_plugin.py), also over YAML list items,
which detect-secrets' YAML reader skips. It compares with the committed, audited baseline
``.secrets.baseline`` and fails, naming file and line, when

- a finding is not in the baseline (a new secret, or a new false positive), or
- a baseline entry is not audited as a false positive (``"is_secret": false``).

A false positive is recorded by ``--update-baseline`` and then audited with ``--audit``,
which shows each unaudited entry's line and marks it ``"is_secret": false`` when you answer
"y" (``detect-secrets audit`` cannot load Lotse's plugin type in detect-secrets 1.5).
A real secret is removed from the file (and rotated: it is in the history now), never
baselined. Entries are matched by file, type and hashed value, not line, so edits around a
known false positive do not fail the check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from detect_secrets.core import baseline as ds_baseline
from detect_secrets.core.potential_secret import PotentialSecret
from detect_secrets.core.secrets_collection import SecretsCollection
from detect_secrets.settings import transient_settings
from secrets_plugin import LotseCredentialDetector  # scripts/, next to this file

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ".secrets.baseline"
# detect-secrets' own marker for a line that is known not to hold a secret.
ALLOWLIST_PRAGMA = "pragma: allowlist secret"


def repository_files(root: Path) -> list[str]:
    """Tracked and new (not ignored) files of the repository, relative to ``root``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split("\0")
    # Deleted but still in the index: nothing to scan.
    return sorted(name for name in listed if name and (root / name).is_file())


def _settings(baseline: dict[str, Any], baseline_dir: Path) -> dict[str, Any]:
    """The baseline's plugins and filters, with a relative plugin path made absolute."""
    plugins = []
    for plugin in baseline.get("plugins_used", []):
        plugin = dict(plugin)
        path = str(plugin.get("path", ""))
        if path.startswith("file://") and not os.path.isabs(path[len("file://") :]):
            plugin["path"] = "file://" + str(baseline_dir / path[len("file://") :])
        plugins.append(plugin)
    return {"plugins_used": plugins, "filters_used": baseline.get("filters_used", [])}


@contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def scan(root: Path, files: list[str], baseline: dict[str, Any], baseline_dir: Path) -> Any:
    """Findings in ``files`` (relative to ``root``) with the baseline's plugins and filters."""
    found = SecretsCollection()
    with transient_settings(_settings(baseline, baseline_dir)), _working_directory(root):
        # Relative paths, as the baseline records them; two processes halve the time in CI.
        found.scan_files(*files, num_processors=min(2, os.cpu_count() or 1))
    for secret in _raw_line_findings(root, files):
        found[secret.filename].add(secret)
    return found


def _raw_line_findings(root: Path, files: list[str]) -> Iterator[PotentialSecret]:
    """Lotse's plugin over every line as written.

    detect-secrets reads YAML through a transformer that keeps only mapping values: list
    items (``- key=value``, how kustomize writes literals) never reach any plugin.
    """
    for name in files:
        try:
            lines = (root / name).read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable: nothing a person pasted a secret into
        for number, line in enumerate(lines, start=1):
            if ALLOWLIST_PRAGMA in line:
                continue
            for value in LotseCredentialDetector.values_in(name, line):
                yield PotentialSecret(
                    type=LotseCredentialDetector.secret_type,
                    filename=name,
                    secret=value,
                    line_number=number,
                )


def _findings(collection: Any) -> list[tuple[str, int, str]]:
    return sorted(
        (filename, secret.line_number or 0, secret.type) for filename, secret in collection
    )


def check(root: Path, baseline_path: Path, files: list[str] | None) -> int:
    raw = ds_baseline.load_from_file(str(baseline_path))
    recorded = SecretsCollection.load_from_baseline(raw)
    names = files if files is not None else repository_files(root)
    names = [n for n in names if (root / n).resolve() != baseline_path.resolve()]
    found = scan(root, names, raw, baseline_path.parent)
    problems = []
    for filename, line, kind in _findings(found - recorded):
        problems.append(f"{filename}:{line}: {kind}: looks like a committed secret")
    for filename, secret in recorded:
        if secret.is_secret is not False and (files is None or filename in names):
            problems.append(
                f"{filename}:{secret.line_number}: {secret.type}: in {baseline_path.name} but "
                "not audited as a false positive (is_secret: false)"
            )
    if problems:
        print("Secrets check failed:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print(
            "\nSecrets come from the environment or mounted files, never from the repository "
            "(development ones: ./lotse dev-secrets, git-ignored). A real secret: remove it "
            "and rotate it. A false positive: `python scripts/check_secrets.py "
            "--update-baseline`, then `python scripts/check_secrets.py --audit`.",
            file=sys.stderr,
        )
        return 1
    print(f"secrets check: {len(names)} files, no unaudited secrets")
    return 0


def update_baseline(root: Path, baseline_path: Path) -> int:
    """Rescans everything; keeps the audit of findings that are still there."""
    old = ds_baseline.load_from_file(str(baseline_path))
    names = [n for n in repository_files(root) if n != baseline_path.name]
    found = scan(root, names, old, baseline_path.parent)
    found.merge(SecretsCollection.load_from_baseline(old))
    output = {
        "version": old.get("version", "1.5.0"),
        "plugins_used": old["plugins_used"],
        "filters_used": old.get("filters_used", []),
        "results": found.json(),
    }
    baseline_path.write_text(json.dumps(output, indent=2) + "\n", encoding="utf-8")
    unaudited = [f"{f}:{s.line_number}" for f, s in found if s.is_secret is None]
    print(f"{baseline_path}: {sum(1 for _ in found)} findings, {len(unaudited)} to audit")
    for entry in unaudited:
        print(f"  {entry}")
    return 0


def audit(root: Path, baseline_path: Path) -> int:
    """Asks about each unaudited baseline entry; "y" marks it a false positive."""
    raw = ds_baseline.load_from_file(str(baseline_path))
    changed = False
    for filename, entries in raw["results"].items():
        for entry in entries:
            if entry.get("is_secret") is False:
                continue
            number = int(entry.get("line_number") or 0)
            lines = (root / filename).read_text(encoding="utf-8", errors="replace").splitlines()
            text = lines[number - 1].strip() if 0 < number <= len(lines) else "?"
            print(f"\n{filename}:{number}: {entry['type']}\n    {text[:160]}")
            answer = input("No secret, a false positive that may be committed? [y/N] ")
            if answer.strip().lower() == "y":
                entry["is_secret"] = False
                changed = True
            else:
                print("  then remove it from the file (and rotate it, if it was ever pushed)")
    if changed:
        baseline_path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="only these files (relative to --root)")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root")
    parser.add_argument("--baseline", type=Path, help=f"default: <root>/{BASELINE}")
    parser.add_argument(
        "--update-baseline", action="store_true", help="rescan and rewrite the baseline"
    )
    parser.add_argument(
        "--audit", action="store_true", help="mark unaudited baseline entries, one by one"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    baseline_path = (args.baseline or root / BASELINE).resolve()
    if not baseline_path.is_file():
        print(f"no baseline at {baseline_path}", file=sys.stderr)
        return 2
    if args.update_baseline:
        return update_baseline(root, baseline_path)
    if args.audit:
        return audit(root, baseline_path)
    return check(root, baseline_path, args.files or None)


if __name__ == "__main__":
    raise SystemExit(main())
