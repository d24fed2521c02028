"""A detect-secrets plugin for what its stock plugins miss in Lotse's kind of files.

The stock plugins look at quoted strings and a few assignment forms; they let through the
shapes deployment files use: a base64url key after ``key-encryption-key=`` in a kustomize
list, a password after ``password=`` in an env file or after SQL's PASSWORD keyword, and
database URLs with a password inside a longer value. This plugin looks for exactly those,
and ignores references (``${VAR}``, ``$(VAR)``, ``<placeholder>``, ``:'psql variable'``,
paths), so that a hit is almost always a value someone pasted. The baseline
(``.secrets.baseline``) names it by path; ``scripts/check_secrets.py`` runs it together with
the stock plugins.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Generator
from pathlib import PurePosixPath
from typing import Any

from detect_secrets.core.potential_secret import PotentialSecret
from detect_secrets.plugins.base import BasePlugin
from detect_secrets.util.code_snippet import CodeSnippet

# A name that announces a secret, as a whole word of a key (`match-key-secret`, `api_token`).
_NAME = r"(?<![\w.$-])(?<!\$\{)[\w.-]*(?:key|secret|token|password|passwd|pwd|credential)[\w.-]*"
# Random-looking: 32+ base64/base64url characters with upper case, lower case and a digit
# (identifiers and hex digests, which are no secrets, rarely have all three).
_RANDOM = r"(?=[\w+/-]*[0-9])(?=[\w+/-]*[a-z])(?=[\w+/-]*[A-Z])[\w+/-]{32,}={0,2}"
KEY_ASSIGNMENT = re.compile(
    rf"(?i:{_NAME})[\"']?\s*[:=]\s*[\"']?({_RANDOM})(?![\w+/-])",
)
# `password=postgres`, `POSTGRES_PASSWORD: postgres` (config files only, where there is no
# code that passes a variable called password around).
PASSWORD_ASSIGNMENT = re.compile(
    r"(?i)(?<![\w.$-])(?<!\$\{)[\w.-]*(?:password|passwd|pwd)[\w.-]*[\"']?(?:\s*=|:)\s*[\"']?"
    r"([^\s\"'$<>{}()\[\]:?/.*|&][^\s\"',;)}\]]{2,})"
)
# SQL: a quoted literal after the PASSWORD keyword (not a psql variable, :'name').
SQL_PASSWORD = re.compile(r"(?i)\bPASSWORD\s+'(?=[^'\s]*\w)([^'\s]{3,})'")
# scheme://user:password@host, with a literal password.
URL_PASSWORD = re.compile(r"\b[a-zA-Z][\w+.-]*://[^\s:/@'\"<>{}$]+:([^\s:/@'\"<>{}$()]+)@")

# Values that are no password (YAML/JSON/TOML words, typical "see elsewhere" markers).
_NOT_A_VALUE = {"null", "none", "true", "false", "required", "optional", "file", "secret"}
_CONFIG_SUFFIXES = {
    ".env",
    ".yaml",
    ".yml",
    ".sql",
    ".sh",
    ".toml",
    ".ini",
    ".cfg",
    ".conf",
    ".properties",
    ".json",
}
_CONFIG_NAMES = {"Dockerfile", ".env", "lotse"}


@functools.cache
def is_config_file(filename: str) -> bool:
    """Files where a `password = value` line is configuration, not code."""
    path = PurePosixPath(filename.replace("\\", "/"))
    name = path.name
    return (
        name in _CONFIG_NAMES
        or name.startswith(".env")
        or path.suffix in _CONFIG_SUFFIXES
        or name.endswith(".env")
    )


class LotseCredentialDetector(BasePlugin):
    """Key-like values, config passwords, SQL passwords and URL credentials."""

    secret_type = "Lotse Credential"

    def analyze_line(
        self,
        filename: str,
        line: str,
        line_number: int = 0,
        context: CodeSnippet | None = None,
        **kwargs: Any,
    ) -> set[PotentialSecret]:
        found: set[PotentialSecret] = set()
        for value in self.values_in(filename, line):
            found.add(
                PotentialSecret(
                    type=self.secret_type,
                    filename=filename,
                    secret=value,
                    line_number=line_number,
                )
            )
        return found

    def analyze_string(self, string: str) -> Generator[str, None, None]:
        # detect-secrets calls this for ad-hoc strings (`detect-secrets scan --string`).
        yield from self.values_in("", string)

    @staticmethod
    def values_in(filename: str, line: str) -> Generator[str, None, None]:
        yield from KEY_ASSIGNMENT.findall(line)
        yield from URL_PASSWORD.findall(line)
        yield from SQL_PASSWORD.findall(line)
        if is_config_file(filename):
            for value in PASSWORD_ASSIGNMENT.findall(line):
                if value.lower() not in _NOT_A_VALUE:
                    yield value
