"""``$ref`` cycles that never reach a constraint.

A cycle of ``$ref`` through schemas that hold nothing but ``$ref`` / ``allOf`` / ``anyOf`` /
``oneOf`` (and annotations), with no other constraint reachable from them that way, such as
``{"allOf": [{"$ref": "#"}]}`` or ``$defs`` ``a -> b -> a``, applies only itself to a value:
checking a value against it never ends. JSON Schema leaves such a schema undefined (the
``jsonschema`` validator recurses until Python's limit on every instance), and llguidance called
it unsatisfiable, which it is not. ``pure_ref_cycle`` names the ``$ref`` that closes the first
such cycle reachable from the root, for an ``UnsupportedSchemaError`` that says what to write.
A recursive schema whose cycle passes through a constraint (``items``, ``properties``, a
``type`` next to the ``$ref``) is left to the engine, as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llmir_lang.executor.constraints.errors import UnsupportedSchemaError
from llmir_lang.executor.constraints.schema_support import ANNOTATIONS
from llmir_lang.executor.constraints.schema_walk import (
    SCHEMA_LISTS,
    SCHEMA_MAPS,
    SCHEMA_SINGLE,
    find_keyword,
    iter_subschemas,
    resolve_local_ref,
)

_IN_PLACE = ("allOf", "anyOf", "oneOf")  # apply their subschemas to the value itself, as $ref does


def _applied(node: dict[str, Any]) -> Iterator[Any]:
    """The direct subschemas of ``node`` that apply to a value (``$defs`` only when referenced)."""
    for key, val in node.items():
        if key in SCHEMA_MAPS and key not in ("$defs", "definitions") and isinstance(val, dict):
            yield from val.values()
        elif key in SCHEMA_LISTS and isinstance(val, list):
            yield from val
        elif key in SCHEMA_SINGLE and isinstance(val, dict):
            yield val


def pure_ref_cycle(schema: Any) -> UnsupportedSchemaError | None:
    """An error naming the ``$ref`` that closes a reference cycle, reachable from the root, whose
    schemas hold only ``$ref`` / ``allOf`` / ``anyOf`` / ``oneOf`` (and annotations) and from which
    no other constraint is reachable through them; None when there is none."""
    if not isinstance(schema, dict) or find_keyword(schema, "$ref") is None:
        return None
    paths: dict[int, str] = {}
    for path, node in iter_subschemas(schema):
        paths.setdefault(id(node), path)
    # the schemas a value is checked against, and for each those applied to the value itself
    edges: dict[int, list[tuple[int, bool]]] = {}  # (target, through a $ref)
    constrains: set[int] = set()
    todo = [schema]
    while todo:
        node = todo.pop()
        key = id(node)
        if key in edges:
            continue
        edges[key] = []
        if set(node) - ANNOTATIONS - {"$ref", *_IN_PLACE}:
            constrains.add(key)
        if "$ref" in node:
            ref = node["$ref"]
            target = resolve_local_ref(schema, ref) if isinstance(ref, str) else None
            if isinstance(target, dict) and id(target) in paths:
                edges[key].append((id(target), True))
                todo.append(target)
            else:  # another document, nothing, a boolean: left to the engine
                constrains.add(key)
        for kw in _IN_PLACE:
            subs = node.get(kw)
            for sub in subs if isinstance(subs, list) else ():
                if isinstance(sub, dict):
                    edges[key].append((id(sub), False))
                elif sub is not True:
                    constrains.add(key)
        todo += [sub for sub in _applied(node) if isinstance(sub, dict)]
    users: dict[int, list[int]] = {k: [] for k in edges}
    for key, out in edges.items():
        for target, _ in out:
            users[target].append(key)
    reaching, frontier = set(constrains), list(constrains)
    while frontier:
        for user in users[frontier.pop()]:
            if user not in reaching:
                reaching.add(user)
                frontier.append(user)
    # a depth-first walk of the rest (whose in-place subschemas are all in the rest) finds a cycle
    order = {key: i for i, key in enumerate(paths)}
    done: set[int] = set()
    for start in sorted(set(edges) - reaching, key=order.__getitem__):
        if start in done:
            continue
        trail, via_ref, pending = [start], [], [iter(edges[start])]
        while pending:
            step = next(pending[-1], None)
            if step is None:
                done.add(trail.pop())
                pending.pop()
                if via_ref:
                    via_ref.pop()
            elif step[0] in trail:
                at = trail.index(step[0])
                cycle, refs = trail[at:], [*via_ref[at:], step[1]]
                closing = cycle[max((i for i, r in enumerate(refs) if r), default=len(cycle) - 1)]
                return _cycle_error(paths[closing], [paths[k] for k in [*cycle, step[0]]])
            elif step[0] not in done:
                trail.append(step[0])
                via_ref.append(step[1])
                pending.append(iter(edges[step[0]]))
    return None


def _cycle_error(path: str, cycle: list[str]) -> UnsupportedSchemaError:
    return UnsupportedSchemaError(
        f"'$ref' at {path} closes a reference cycle that never reaches a constraint "
        f"({' -> '.join(cycle)}): the schemas on it hold only $ref / allOf / anyOf / oneOf, so "
        "checking a value against them never ends (JSON Schema leaves such a schema undefined, and "
        "a validator recurses forever on it); replace this $ref with the schema meant: {} (or "
        "true) for any JSON value, or a definition with a type or other constraint",
        keyword="$ref",
        path=path,
    )
