"""FULL_TRANSITIVE compatibility of JSON Schemas within one major version.

Within a major version readers and writers of every published revision must understand
each other in both directions. The only change that keeps that true is adding an
*optional* property (to an object that does not forbid additional properties), plus
pure documentation changes (title, description, examples). Everything else is reported:
a property removed, a required property added, a property becoming required or no longer
required, a type changed, an enum value added or removed, a changed format, pattern,
bound or default, ``additionalProperties`` set to false, and any other keyword changed.
``$ref`` is followed into ``$defs``, so a renamed definition with the same content is fine.

Anything else is a new major version (``….v2``), published alongside the old one, with an
upcaster from the old to the new data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

#: Keywords that document but do not constrain; changing them is always compatible.
ANNOTATIONS = frozenset(
    {"title", "description", "examples", "$comment", "deprecated", "readOnly", "writeOnly"}
)
#: Keywords that only identify the document; a new revision may change them.
_IDENTITY = frozenset({"$schema", "$id", "$defs", "definitions"})
#: Scalar constraints: any change (including adding or removing one) is a violation.
_CONSTRAINTS = (
    "format",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "minContains",
    "maxContains",
    "contentEncoding",
    "contentMediaType",
    "const",
    "default",
)
_SUBSCHEMA = ("not", "if", "then", "else", "contains", "propertyNames", "unevaluatedProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_HANDLED = frozenset(
    {"type", "enum", "properties", "required", "additionalProperties", "items"}
    | set(_CONSTRAINTS)
    | set(_SUBSCHEMA)
    | set(_SUBSCHEMA_LISTS)
)


def check_compatible(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Violations of FULL compatibility between two revisions; empty means compatible."""
    comparer = _Comparer(old, new)
    comparer.compare(old, new, "$")
    return comparer.violations


def check_full_transitive(
    history: Sequence[Mapping[str, Any]],
    new: Mapping[str, Any],
    *,
    labels: Sequence[str] | None = None,
) -> list[str]:
    """Violations of ``new`` against every published revision in ``history`` (oldest first).

    Each violation is prefixed with the revision it breaks: ``labels[i]`` if given,
    otherwise ``version <i+1>``.
    """
    if labels is not None and len(labels) != len(history):
        raise ValueError("labels must name every history entry")
    violations: list[str] = []
    for index, old in enumerate(history):
        label = labels[index] if labels is not None else f"version {index + 1}"
        violations.extend(f"against {label}: {v}" for v in check_compatible(old, new))
    return violations


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _types(node: Mapping[str, Any]) -> frozenset[str] | None:
    raw = node.get("type")
    if raw is None:
        return None
    return frozenset([raw] if isinstance(raw, str) else raw)


class _Comparer:
    def __init__(self, old_root: Mapping[str, Any], new_root: Mapping[str, Any]) -> None:
        self.old_root = old_root
        self.new_root = new_root
        self.violations: list[str] = []
        # Pairs of definitions already compared: stops recursion and repeated reports.
        self._seen: set[tuple[str, str]] = set()

    def _add(self, path: str, what: str) -> None:
        self.violations.append(f"{path}: {what}")

    def compare(self, old: Any, new: Any, path: str) -> None:
        if isinstance(old, bool) or isinstance(new, bool):
            if old != new:
                self._add(path, f"schema changed from {_show(old)} to {_show(new)}")
            return
        if not isinstance(old, Mapping) or not isinstance(new, Mapping):
            if old != new:
                self._add(path, "schema changed")
            return
        old_node, old_ref = _resolve(self.old_root, old)
        new_node, new_ref = _resolve(self.new_root, new)
        if old_ref is not None and new_ref is not None:
            if (old_ref, new_ref) in self._seen:
                return
            self._seen.add((old_ref, new_ref))
        self._compare_nodes(old_node, new_node, path)

    def _compare_nodes(self, old: Mapping[str, Any], new: Mapping[str, Any], path: str) -> None:
        self._compare_type(old, new, path)
        self._compare_enum(old, new, path)
        for keyword in _CONSTRAINTS:
            if old.get(keyword) != new.get(keyword) or (keyword in old) != (keyword in new):
                self._add(
                    path,
                    f"{keyword} changed from {_describe(old, keyword)} "
                    f"to {_describe(new, keyword)}",
                )
        self._compare_properties(old, new, path)
        self._compare_additional(old, new, path)
        for keyword in ("items", *_SUBSCHEMA):
            self._compare_optional_subschema(old, new, keyword, path)
        for keyword in _SUBSCHEMA_LISTS:
            self._compare_schema_list(old, new, keyword, path)
        for keyword in sorted((set(old) | set(new)) - _HANDLED - ANNOTATIONS - _IDENTITY):
            if keyword.startswith("x-"):
                continue
            if old.get(keyword) != new.get(keyword):
                self._add(
                    path,
                    f"keyword {keyword!r} changed from {_describe(old, keyword)} "
                    f"to {_describe(new, keyword)}",
                )

    def _compare_type(self, old: Mapping[str, Any], new: Mapping[str, Any], path: str) -> None:
        old_types, new_types = _types(old), _types(new)
        if old_types != new_types:
            self._add(
                path,
                f"type changed from {_show(sorted(old_types or []))} "
                f"to {_show(sorted(new_types or []))}",
            )

    def _compare_enum(self, old: Mapping[str, Any], new: Mapping[str, Any], path: str) -> None:
        if "enum" not in old and "enum" not in new:
            return
        if "enum" not in old:
            self._add(path, f"enum constraint added: {_show(new['enum'])}")
            return
        if "enum" not in new:
            self._add(path, "enum constraint removed")
            return
        old_values = {_show(v) for v in old["enum"]}
        new_values = {_show(v) for v in new["enum"]}
        if added := sorted(new_values - old_values):
            self._add(path, f"enum value(s) added: {', '.join(added)}")
        if removed := sorted(old_values - new_values):
            self._add(path, f"enum value(s) removed: {', '.join(removed)}")

    def _compare_properties(
        self, old: Mapping[str, Any], new: Mapping[str, Any], path: str
    ) -> None:
        old_props: Mapping[str, Any] = old.get("properties", {})
        new_props: Mapping[str, Any] = new.get("properties", {})
        old_req = set(old.get("required", []))
        new_req = set(new.get("required", []))
        closed = old.get("additionalProperties") is False
        for name, old_schema in old_props.items():
            if name not in new_props:
                self._add(f"{path}.{name}", "property removed")
            else:
                self.compare(old_schema, new_props[name], f"{path}.{name}")
        for name in new_props:
            if name in old_props:
                continue
            if name in new_req:
                self._add(f"{path}.{name}", "required property added")
            elif closed:
                self._add(
                    f"{path}.{name}",
                    "property added to an object with additionalProperties false",
                )
        for name in sorted(new_req - old_req):
            if name in old_props:
                self._add(f"{path}.{name}", "property became required")
            elif name not in new_props:
                self._add(f"{path}.{name}", "required (without a property schema) added")
        for name in sorted(old_req - new_req):
            if name in new_props or name not in old_props:
                self._add(f"{path}.{name}", "property no longer required")

    def _compare_additional(
        self, old: Mapping[str, Any], new: Mapping[str, Any], path: str
    ) -> None:
        old_ap = old.get("additionalProperties", True)
        new_ap = new.get("additionalProperties", True)
        if new_ap is False and old_ap is not False:
            self._add(path, "additionalProperties set to false")
        elif old_ap is False and new_ap is not False:
            self._add(path, "additionalProperties no longer false")
        elif isinstance(old_ap, Mapping) and isinstance(new_ap, Mapping):
            self.compare(old_ap, new_ap, f"{path}{{*}}")
        elif old_ap != new_ap:
            self._add(
                path,
                f"additionalProperties changed from {_show(old_ap)} to {_show(new_ap)}",
            )

    def _compare_optional_subschema(
        self, old: Mapping[str, Any], new: Mapping[str, Any], keyword: str, path: str
    ) -> None:
        where = f"{path}[]" if keyword == "items" else f"{path}<{keyword}>"
        if keyword in old and keyword in new:
            self.compare(old[keyword], new[keyword], where)
        elif keyword in old:
            self._add(path, f"{keyword} removed")
        elif keyword in new:
            self._add(path, f"{keyword} added")

    def _compare_schema_list(
        self, old: Mapping[str, Any], new: Mapping[str, Any], keyword: str, path: str
    ) -> None:
        if keyword not in old and keyword not in new:
            return
        old_list: Sequence[Any] = old.get(keyword, [])
        new_list: Sequence[Any] = new.get(keyword, [])
        if len(old_list) != len(new_list):
            self._add(
                path,
                f"{keyword} changed from {len(old_list)} to {len(new_list)} alternative(s)",
            )
            return
        for index, (old_item, new_item) in enumerate(zip(old_list, new_list, strict=True)):
            self.compare(old_item, new_item, f"{path}<{keyword}[{index}]>")


def _describe(node: Mapping[str, Any], keyword: str) -> str:
    return _show(node[keyword]) if keyword in node else "(absent)"


def _resolve(
    root: Mapping[str, Any], node: Mapping[str, Any]
) -> tuple[Mapping[str, Any], str | None]:
    """Follow local ``$ref`` chains; siblings of ``$ref`` override the target's keywords."""
    ref: str | None = None
    seen: set[str] = set()
    while isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"):
        ref = node["$ref"]
        if ref in seen:
            break
        seen.add(ref)
        target = _pointer(root, ref[1:])
        if target is None:
            break
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        node = {**target, **siblings}
    return node, ref


def _pointer(root: Mapping[str, Any], pointer: str) -> Mapping[str, Any] | None:
    current: Any = root
    for raw in pointer.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if not isinstance(current, Mapping) or part not in current:
            return None
        current = current[part]
    return current if isinstance(current, Mapping) else None
