"""Functions and modules of the program IR, and the small helpers passes share.

A ``Module`` is an ordered set of ``Function``s. Each function is one program instance to run:
``run`` builds a module of one function, ``run_batch`` one function per program of the batch
(``@f.0``, ``@f.1``, ...), so that passes see every program at once (prefix sharing across a batch).

A ``Function`` has named ``text`` parameters (bound when it runs) and a straight-line body of ops
in definition order; the last op is its ``return``. Both are immutable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from llmir_lang.ir.ops import FORK, Op
from llmir_lang.ir.values import Value


@dataclass(frozen=True, slots=True)
class Function:
    """One program: ``name`` (printed ``@name``), text ``params``, and its body ``ops``."""

    name: str
    params: tuple[Value, ...] = ()
    ops: tuple[Op, ...] = ()
    line: int | None = field(default=None, compare=False, repr=False)

    def definitions(self) -> dict[str, Op]:
        """Value name -> the op that defines it (parameters are not included)."""
        return {v.name: op for op in self.ops for v in op.results}

    def users(self) -> dict[str, list[tuple[int, int]]]:
        """Value name -> ``(op index, operand index)`` of every use, in body order."""
        out: dict[str, list[tuple[int, int]]] = {}
        for i, op in enumerate(self.ops):
            for j, v in enumerate(op.operands):
                out.setdefault(v.name, []).append((i, j))
        return out

    def value_names(self) -> set[str]:
        return {p.name for p in self.params} | {v.name for op in self.ops for v in op.results}

    def __str__(self) -> str:
        from llmir_lang.ir.printer import format_function

        return format_function(self, indent="")

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))


@dataclass(frozen=True, slots=True)
class Module:
    """An ordered set of functions, each one program instance."""

    functions: tuple[Function, ...] = ()

    def __str__(self) -> str:
        """The printed form (``print_ir``), so that ``print(f.trace())`` shows the IR text."""
        from llmir_lang.ir.printer import print_ir

        return print_ir(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """IPython shows a module (``f.trace()`` as a cell's last line) in its printed form."""
        p.text(str(self))

    def function(self, name: str) -> Function:
        for fn in self.functions:
            if fn.name == name:
                return fn
        known = ", ".join("@" + f.name for f in self.functions) or "none"
        raise KeyError(f"no function @{name} in this module; functions: {known}")


def substitute(ops: Iterable[Op], mapping: dict[str, Value]) -> list[Op]:
    """Rewrite the operands of ``ops``: every value named in ``mapping`` is replaced by its image."""
    out: list[Op] = []
    for op in ops:
        if any(v.name in mapping for v in op.operands):
            op = replace(op, operands=tuple(mapping.get(v.name, v) for v in op.operands))
        out.append(op)
    return out


def fresh_namer(taken: Iterable[str], prefix: str = "t") -> FreshNames:
    """A generator of value names not in ``taken`` (for values a pass creates)."""
    return FreshNames(set(taken), prefix)


class FreshNames:
    """Hands out ``<prefix><n>`` names that collide with nothing taken so far."""

    def __init__(self, taken: set[str], prefix: str) -> None:
        self._taken = taken
        self._prefix = prefix
        self._next = 0

    def __call__(self) -> str:
        while True:
            name = f"{self._prefix}{self._next}"
            self._next += 1
            if name not in self._taken:
                self._taken.add(name)
                return name


def renumber(module: Module) -> Module:
    """Rename every op result to ``0, 1, 2, ...`` in definition order; parameters keep their names.

    Value names carry no meaning, so this is the canonical form the pass manager prints after a
    pass (passes that add or drop values leave gaps and temporary names). Numbers equal to a
    parameter name are skipped.
    """
    return Module(tuple(_renumber_function(fn) for fn in module.functions))


def _canonical_names(fn: Function, params: set[str]) -> bool:
    counter = 0
    for op in fn.ops:
        for v in op.results:
            while str(counter) in params:
                counter += 1
            if v.name != str(counter):
                return False
            counter += 1
    return True


def _renumber_function(fn: Function) -> Function:
    params = {p.name for p in fn.params}
    if _canonical_names(fn, params):  # most functions after most passes: nothing to rebuild
        return fn
    mapping: dict[str, Value] = {}
    counter = 0
    for op in fn.ops:
        for v in op.results:
            while str(counter) in params:
                counter += 1
            mapping[v.name] = Value(str(counter), v.type)
            counter += 1
    # Op(...) directly: dataclasses.replace costs several times more, for every op of a batch
    ops = tuple(
        Op(
            op.kind,
            tuple(mapping[v.name] for v in op.results),
            tuple(mapping.get(v.name, v) for v in op.operands),
            op.label,
            op.attrs,
            op.line,
        )
        for op in fn.ops
    )
    return replace(fn, ops=ops)


def fork_transparent_users(fn: Function) -> dict[str, list[Op]]:
    """State name -> the ops that consume it as operand 0, looking through ``fork`` ops.

    A fork result is the same text as the forked state, so the users of a fork's results are
    users of the forked state. Fork ops themselves are not listed.
    """
    direct: dict[str, list[Op]] = {}
    for op in fn.ops:
        if op.operands:
            direct.setdefault(op.operands[0].name, []).append(op)

    # Each state's users from the last op back, so that the users of a fork's results are known
    # when the fork is reached: no recursion (forks of forks may nest thousands deep, in a program
    # that forks in a loop) and no walk of the same fork results twice.
    memo: dict[str, list[Op]] = {}

    def users_of(name: str) -> list[Op]:
        out: list[Op] = []
        for op in direct[name]:
            if op.kind == FORK:
                for r in op.results:
                    out.extend(memo.get(r.name, ()))
            else:
                out.append(op)
        return out

    for op in reversed(fn.ops):
        for r in op.results:
            if r.name in direct:
                memo[r.name] = users_of(r.name)
    return {name: memo[name] if name in memo else users_of(name) for name in direct}
