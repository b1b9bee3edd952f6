"""Reference loops: a ``$ref`` that leads back to its own subschema on the same value.

``$ref``, ``allOf`` / ``anyOf`` / ``oneOf``, ``not``, ``if`` / ``then`` / ``else`` and
``dependentSchemas`` apply their subschemas to the value itself; ``properties``, ``items`` and
the like apply theirs to a part of it. A cycle made only of the first kind never reaches a
smaller part of the value, so checking any value that gets to it never ends: ``{"$ref": "#"}``,
``{"allOf": [{"$ref": "#"}]}``, ``$defs`` ``a -> b -> a``, and also a loop next to a constraint
(``{"anyOf": [{"$ref": "#"}, {"type": "integer"}]}``, ``{"$ref": "#", "type": "string"}``).

What such a schema accepts is not defined: JSON Schema (Core, "Guarding Against Infinite
Recursion") says schemas should not loop like this and leaves the behaviour undefined, and the
``jsonschema`` validator recurses until ``RecursionError`` on every value that reaches the loop,
accepting none and rejecting none. So the compiler gives no engine a guess ("any value", which a
pure loop would be read as by the greatest fixed point, or the loop's other branches, by the
least) and raises ``ReferenceLoopError`` naming the ``$ref`` that closes the loop, before
llguidance can call it unsatisfiable (it did, for ``{"not": {"$ref": "#"}}`` and the pure
loops), which it is not. A recursive schema whose cycle goes through a part of the value (a tree
of ``items`` / ``properties``) is not a loop and is left to the engine, as is a loop in a
``$defs`` entry that nothing references.

A ``$ref`` is followed as the validator follows it (``schema_walk.ResourceIndex``): inside a
subschema with an ``$id`` of its own, ``#/...`` points into that subschema, and a ref may name a
resource of the document by its URI; in drafts 3 to 7 the keywords beside a ``$ref`` (its ``$id``
too) are ignored. Reading every ref from the root saw loops that were not there, and missed some.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llmir_lang.executor.constraints.errors import ReferenceLoopError
from llmir_lang.executor.constraints.schema_walk import (
    SCHEMA_LISTS,
    SCHEMA_MAPS,
    SCHEMA_SINGLE,
    ResourceIndex,
    find_keyword,
    iter_subschemas,
    ref_ignores_siblings,
)

# keywords whose subschemas apply to the value itself, as ``$ref`` does
_IN_PLACE_LISTS = ("allOf", "anyOf", "oneOf")
_IN_PLACE_SINGLE = ("not", "if", "then", "else")
_IN_PLACE_MAPS = ("dependentSchemas", "dependencies")  # draft 7 ``dependencies``: schema values


def _applied(node: dict[str, Any]) -> Iterator[Any]:
    """The direct subschemas of ``node`` that apply to a value (``$defs`` only when referenced)."""
    for key, val in node.items():
        if key in SCHEMA_MAPS and key not in ("$defs", "definitions") and isinstance(val, dict):
            yield from val.values()
        elif key in SCHEMA_LISTS and isinstance(val, list):
            yield from val
        elif key in SCHEMA_SINGLE and isinstance(val, dict):
            yield val


def _in_place(
    node: dict[str, Any], refs: ResourceIndex, ref_alone: bool
) -> Iterator[tuple[dict[str, Any], bool]]:
    """(subschema, whether through ``$ref``) for each subschema ``node`` applies to the same value
    (only the ``$ref``'s where ``ref_alone``). A ``$ref`` to another document, to nothing or to a
    boolean leads to no subschema here."""
    ref = node.get("$ref")
    target = refs.target(node, ref) if isinstance(ref, str) else None
    if isinstance(target, dict):
        yield target, True
    if ref_alone:
        return
    for kw in _IN_PLACE_LISTS:
        subs = node.get(kw)
        for sub in subs if isinstance(subs, list) else ():
            if isinstance(sub, dict):
                yield sub, False
    for kw in _IN_PLACE_SINGLE:
        if isinstance(node.get(kw), dict):
            yield node[kw], False
    for kw in _IN_PLACE_MAPS:
        subs = node.get(kw)
        for sub in subs.values() if isinstance(subs, dict) else ():
            if isinstance(sub, dict):
                yield sub, False


def reference_loop(schema: Any) -> ReferenceLoopError | None:
    """The error for the first reference loop (module doc) reachable from the root, naming the
    ``$ref`` that closes it and the subschemas around it; None when there is none."""
    if not isinstance(schema, dict) or find_keyword(schema, "$ref") is None:
        return None
    paths: dict[int, str] = {}
    for path, node in iter_subschemas(schema):
        paths.setdefault(id(node), path)
    refs, ref_alone = ResourceIndex(schema), ref_ignores_siblings(schema)
    # every subschema some value (the root or a part of it) is checked against
    edges: dict[int, list[tuple[int, bool]]] = {}
    todo = [schema]
    while todo:
        node = todo.pop()
        if id(node) in edges:
            continue
        alone = ref_alone and "$ref" in node  # drafts 3-7 ignore the keywords beside a $ref
        out = [(sub, via_ref) for sub, via_ref in _in_place(node, refs, alone) if id(sub) in paths]
        edges[id(node)] = [(id(sub), via_ref) for sub, via_ref in out]
        todo += [sub for sub, _ in out]
        todo += [] if alone else [sub for sub in _applied(node) if isinstance(sub, dict)]
    # a depth-first walk over the in-place edges, from each reached subschema in path order
    order = {key: i for i, key in enumerate(paths)}
    done: set[int] = set()
    for start in sorted(edges, key=order.__getitem__):
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
                # a cycle among subschemas of one tree passes through a $ref; name the last one
                closing = cycle[max(i for i, r in enumerate(refs) if r)]
                return _loop_error(paths[closing], tuple(paths[k] for k in [*cycle, step[0]]))
            elif step[0] not in done:
                trail.append(step[0])
                via_ref.append(step[1])
                pending.append(iter(edges[step[0]]))
    return None


def _loop_error(path: str, cycle: tuple[str, ...]) -> ReferenceLoopError:
    return ReferenceLoopError(
        f"'$ref' at {path} makes the schema an infinite reference loop with no instance "
        f"constraint ({' -> '.join(cycle)}): it leads back to the same subschema on the same "
        "value without checking any part of it (no properties / items / ... on the way), so "
        "checking a value never ends; JSON Schema leaves such a schema undefined and the "
        "jsonschema validator fails on it with RecursionError. Remove this $ref, or point it at "
        "a schema that does not lead back here ({} or true for any JSON value)",
        path=path,
        cycle=cycle,
    )
