"""Walking the subschemas of a JSON schema (only schema positions, never data or names).

A property called ``"not"`` under ``properties`` is a name, not the keyword; ``const`` and
``enum`` values are data. Paths are JSON pointers from the root (``#/properties/a/items``).
"""

from __future__ import annotations

import re
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


def _pointer_path(root: Any, ref: str) -> list[Any] | None:
    """The nodes a local ``$ref`` (``#`` or ``#/a/b``) passes through from ``root`` (root first,
    the target last), or None where it points at nothing."""
    if ref == "#":
        return [root]
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return None
    nodes = [root]
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = nodes[-1]
        if isinstance(node, dict) and part in node:
            nodes.append(node[part])
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            nodes.append(node[int(part)])
        else:
            return None
    return nodes


def resolve_local_ref(root: Any, ref: str) -> Any:
    """The subschema a local ``$ref`` (``#`` or ``#/a/b``) points at, or None."""
    nodes = _pointer_path(root, ref)
    return None if nodes is None else nodes[-1]


def starts_resource(node: Any) -> bool:
    """True if ``node`` is a schema resource of its own: its ``$id`` (``id`` in draft 4) names a
    URI, not a plain-name fragment (``"#foo"``), so a ``#/...`` ref inside it points into it, not
    into the document root."""
    if not isinstance(node, dict):
        return False
    return any(isinstance(node.get(k), str) and not node[k].startswith("#") for k in ("$id", "id"))


def holds_resource(schema: Any) -> bool:
    """True if ``schema`` or a subschema of it starts a resource of its own (``starts_resource``)."""
    return any(starts_resource(node) for _, node in iter_subschemas(schema))


def resolve_in_root_resource(root: Any, ref: str) -> Any:
    """``resolve_local_ref``, or None where that would be wrong or cannot be told: ``root`` is
    None, the pointer passes into a subschema that starts a resource of its own, or the target
    holds one (the ``#/...`` refs in there point into that resource, not into ``root``)."""
    nodes = _pointer_path(root, ref) if root is not None else None
    if nodes is None or any(starts_resource(n) and n is not root for n in nodes[1:]):
        return None
    node = nodes[-1]
    return None if node is not root and holds_resource(node) else node


# Drafts 3 to 7: "All other properties in a "$ref" object MUST be ignored" (draft 7, 8.3).
_REF_ALONE_DRAFT = re.compile(r"^https?://json-schema\.org/draft-0[34567]/schema#?$")


def ref_ignores_siblings(root: Any) -> bool:
    """True if ``root`` declares a draft (3 to 7) where a validator ignores every keyword beside a
    ``$ref``; from 2019-09 on, they apply together with it."""
    declared = root.get("$schema") if isinstance(root, dict) else None
    return isinstance(declared, str) and _REF_ALONE_DRAFT.match(declared) is not None
