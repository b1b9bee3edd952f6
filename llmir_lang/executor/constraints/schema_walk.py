"""Walking the subschemas of a JSON schema (only schema positions, never data or names).

A property called ``"not"`` under ``properties`` is a name, not the keyword; ``const`` and
``enum`` values are data. Paths are JSON pointers from the root (``#/properties/a/items``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urldefrag, urljoin

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


class ResourceIndex:
    """Where the ``$ref``s of one document point, read as the ``jsonschema`` validator reads them:
    a subschema with an ``$id`` (``starts_resource``) starts a resource, and a ref inside it is a
    URI relative to that ``$id`` (``#/$defs/a`` points into the resource, ``other.json#/x`` or an
    absolute URI into the resource so named, ``#name`` at its ``$anchor``). The JSON pointer is
    then followed from the resource with ``resolve_local_ref``. Drafts 3 to 7 ignore an ``$id``
    beside a ``$ref`` (``ref_ignores_siblings``)."""

    __slots__ = ("_base", "_resources", "_anchors")

    def __init__(self, root: Any) -> None:
        self._base: dict[int, str] = {}  # id(subschema) -> URI of the resource holding it
        self._resources: dict[str, dict[str, Any]] = {}  # resource URI (no fragment) -> its subschema
        self._anchors: dict[str, dict[str, Any]] = {}  # "URI#name" -> subschema
        id_beside_ref_counts = not ref_ignores_siblings(root)
        around: list[tuple[str, str]] = []  # (path, base URI) of the subschemas holding this one
        for path, node in iter_subschemas(root):  # parents first: a resource before its members
            while around and not path.startswith(around[-1][0] + "/"):
                around.pop()
            base = around[-1][1] if around else ""
            names = [node[k] for k in ("$anchor", "$dynamicAnchor") if isinstance(node.get(k), str)]
            ident = next((node[k] for k in ("$id", "id") if isinstance(node.get(k), str)), None)
            if ident is not None and (id_beside_ref_counts or "$ref" not in node):
                uri, name = _join(base, ident)
                base = base if ident.startswith("#") or uri is None else uri
                names += [name] if name else []  # drafts 4-7: "$id": "#name" is an anchor
            self._resources.setdefault(base, node)
            for name in names:
                self._anchors.setdefault(f"{base}#{name}", node)
            self._base.setdefault(id(node), base)
            around.append((path, base))

    def target(self, node: dict[str, Any], ref: str) -> Any:
        """The subschema the ``$ref`` ``ref`` of ``node`` (a subschema of the document) points at,
        or None: a schema outside the document (never fetched), or nothing."""
        base = self._base.get(id(node), "")
        uri, fragment = (base, ref[1:]) if ref.startswith("#") else _join(base, ref)
        resource = self._resources.get(uri) if uri is not None else None
        if resource is None or not fragment:
            return resource
        if not fragment.startswith("/"):
            return self._anchors.get(f"{uri}#{fragment}")
        return resolve_local_ref(resource, "#" + unquote(fragment))


def _join(base: str, ref: str) -> tuple[str | None, str]:
    """(URI, fragment) of ``ref`` read relative to ``base``; (None, "") if it is no URI."""
    try:
        joined = urldefrag(urljoin(base, ref))
    except ValueError:  # "http://[x" and the like
        return None, ""
    return joined.url, joined.fragment
