"""``oneOf`` as an ``anyOf`` llguidance can enforce, where that is exact.

``oneOf`` asks for exactly one matching branch; llguidance implements ``anyOf`` only. Three exact
forms, tried in order:

1. No value the subschema admits can match two branches (``schema_disjoint.disjoint``, on the
   types the ``oneOf``'s siblings admit): the ``oneOf`` is ``anyOf`` of the same branches.
2. At least two branches hold object keywords alone (the discriminator union written without
   ``type: object``: ``{"required": ["kind"], "properties": {"kind": {"const": "a"}}}``), so every
   value that is not an object matches two branches and is invalid, and the branches are
   disjoint on objects: ``type: object`` with ``anyOf`` of the branches.
3. Otherwise, branch ``i`` becomes ``B_i`` and the complement (``negation.negate``) of every
   branch it is not proved disjoint from: ``{"allOf": [B_i, not B_j, ...]}``, which a value
   matches exactly when ``B_i`` is its only matching branch (``{"required": ["a"]}`` /
   ``{"required": ["b"]}``: a but not b, or b but not a). Only with at most
   ``MAX_EXCLUSIVE_BRANCHES`` branches, every complement expressible, and the result within
   ``MAX_EXCLUSIVE_CHARS`` of JSON text, since it grows with the square of the branches.

``root`` is the document the ``#/...`` refs point into, or None inside a subschema with an
``$id`` of its own (nothing is then proved or negated through a ref).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from llmir_lang.executor.constraints.negation import negate
from llmir_lang.executor.constraints.schema_disjoint import (
    admits_every_non_object,
    disjoint,
    type_set,
)
from llmir_lang.executor.constraints.schema_walk import holds_resource

MAX_EXCLUSIVE_BRANCHES = 8
MAX_EXCLUSIVE_CHARS = 64_000
_OBJECTS = frozenset({"object"})


class AnyOf(NamedTuple):
    """The ``anyOf`` that replaces a ``oneOf``: its branches, whether ``type: object`` goes beside
    it, and which form (module doc) it came from, for the rewrite notes."""

    branches: list[Any]
    objects_only: bool
    form: str


def one_of_as_any_of(node: dict[str, Any], root: Any) -> AnyOf | None:
    """The exact ``anyOf`` form of the ``oneOf`` of ``node`` (module doc), or None."""
    branches = node.get("oneOf")
    if not isinstance(branches, list) or not branches or any(holds_resource(b) for b in branches):
        return None  # a branch's refs point into its own $id, not into root
    domain = type_set({k: v for k, v in node.items() if k != "oneOf"}, root)
    apart = [
        [i == j or disjoint(a, b, root, domain) for j, b in enumerate(branches)]
        for i, a in enumerate(branches)
    ]
    if all(all(row) for row in apart):
        return AnyOf(branches, False, "no value matches two branches")
    if (
        "object" in domain
        and domain != _OBJECTS
        and sum(admits_every_non_object(b, root) for b in branches) >= 2
        and all(disjoint(a, b, root, _OBJECTS) for i, a in enumerate(branches) for b in branches[i + 1 :])
    ):
        return AnyOf(branches, True, "objects only, no object matches two branches")
    return _exclusive(branches, apart, root)


def _exclusive(branches: list[Any], apart: list[list[bool]], root: Any) -> AnyOf | None:
    if len(branches) > MAX_EXCLUSIVE_BRANCHES:
        return None
    overlapping = {j for row in apart for j, ok in enumerate(row) if not ok}
    complements = {j: negate(branches[j], root) for j in sorted(overlapping)}
    if any(c is None for c in complements.values()):
        return None
    out: list[Any] = []
    for i, branch in enumerate(branches):
        others = [complements[j] for j, ok in enumerate(apart[i]) if not ok]
        if any(c is False for c in others):
            continue  # a branch that matches every value: this one is never the only match
        others = [c for c in others if c is not True]
        out.append({"allOf": [branch, *others]} if others else branch)
    if not out:
        out = [False]
    if len(json.dumps(out)) > MAX_EXCLUSIVE_CHARS:
        return None
    return AnyOf(out, False, "each branch without the branches it overlaps")
