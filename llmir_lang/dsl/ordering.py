"""Call order inside one function: which model calls may be in flight at the same time.

The evaluator runs the calls (gen, gen.chain, select) of one function in body order, one at a
time, as a plain client library would, except where the IR says calls are independent: the
branches of a fork that the ``fork-join`` pass grouped (``group = "gN"``). Each call gets a
*branch path*, the ``(group, branch index)`` pairs of the grouped forks on its chain; two calls
may overlap when their paths take different branches of the same fork. So a program run call by
call (``passes=""``, no groups) makes one call at a time, and the passes' fork groups are what let
branches run together. Calls of different functions (programs of a batch) never wait for each
other.
"""

from __future__ import annotations

from llmir_lang.ir import Function
from llmir_lang.ir import ops as K

Path = tuple[tuple[str, int], ...]
CALL_KINDS = (K.GEN, K.GEN_CHAIN, K.SELECT)


def branch_paths(fn: Function) -> dict[int, Path]:
    """Op index -> branch path, for every call op of ``fn``."""
    of_value: dict[str, Path] = {}
    out: dict[int, Path] = {}
    for i, op in enumerate(fn.ops):
        base = of_value.get(op.operands[0].name, ()) if op.operands else ()
        if op.kind == K.FORK:
            group = op.attrs.get("group")
            for k, r in enumerate(op.results):
                of_value[r.name] = (*base, (group, k)) if isinstance(group, str) else base
            continue
        for r in op.results:
            of_value[r.name] = base
        if op.kind in CALL_KINDS:
            out[i] = base
    return out


def independent(a: Path, b: Path) -> bool:
    """True when the two paths take different branches of one grouped fork."""
    for x, y in zip(a, b):
        if x != y:
            return x[0] == y[0]
    return False


class CallOrder:
    """Tracks one function's unfinished calls; ``may_start(i)`` says whether call ``i`` may be
    submitted now (every earlier unfinished call is on an independent branch)."""

    def __init__(self, fn: Function) -> None:
        self.paths = branch_paths(fn)
        self.unfinished = sorted(self.paths)

    def may_start(self, i: int) -> bool:
        path = self.paths[i]
        for j in self.unfinished:
            if j >= i:
                return True
            if not independent(path, self.paths[j]):
                return False
        return True

    def finish(self, i: int) -> None:
        if i in self.paths:
            self.unfinished.remove(i)
