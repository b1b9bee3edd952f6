"""Walking the subschemas of a JSON schema (only schema positions, never data or names).

A property called ``"not"`` under ``properties`` is a name, not the keyword; ``const`` and
``enum`` values are data. Paths are JSON pointers from the root (``#/properties/a/items``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
SCHEMA_SINGLE = (
    "items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains",
    "propertyNames", "unevaluatedItems", "unevaluatedProperties",
)  # fmt: skip
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def iter_subschemas(schema: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, node) for every object subschema, parents before children."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key, val in schema.items():
        if key in SCHEMA_MAPS and isinstance(val, dict):
            for name, sub in val.items():
                yield from iter_subschemas(sub, f"{path}/{_escape(key)}/{_escape(name)}")
        elif key in SCHEMA_LISTS and isinstance(val, list):
            for i, sub in enumerate(val):
                yield from iter_subschemas(sub, f"{path}/{key}/{i}")
        elif key in SCHEMA_SINGLE and isinstance(val, dict):
            yield from iter_subschemas(val, f"{path}/{key}")


def find_keyword(schema: Any, keyword: str) -> str | None:
    """Path of the first subschema that uses ``keyword``, or None."""
    for path, node in iter_subschemas(schema):
        if keyword in node:
            return path
    return None


def resolve_local_ref(root: Any, ref: str) -> Any:
    """The subschema a local ``$ref`` (``#`` or ``#/a/b``) points at, or None."""
    if ref == "#":
        return root
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return None
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node
