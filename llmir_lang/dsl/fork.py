"""Fork groups: ``forks = s.fork(n)``, ``forks += ...``, ``forks[i]``, ``forks.join()``.

A fork records one IR ``fork`` op; each branch is a ``ProgramState`` that starts with the parent's
pieces (shared by reference) and variables. ``join`` gathers every variable the branches defined
after the fork into the parent as a list in branch order (SGLang's ``gather_variable``); mode
``concat`` (SGLang's ``concate_and_append``) also appends each branch's new text to the parent.
When parent and branches are still in the segment that forked them, the join is an IR ``join``
op, so the optimizer sees the whole fork/join; otherwise it is done on the recorded values. Such
a gathering join also leaves the parent a ``join`` piece (no text) that waits for the branches'
gens: the parent's text after it has not run until they have, so its stream holds that text back,
and a program stopped while the branches ran ends the parent's text there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from llmir_lang.dsl.errors import ForkError, InvalidJoinModeError, SourceLocation, VariableRedefinedError
from llmir_lang.dsl.primitives import is_anonymous
from llmir_lang.dsl.recorder import Piece
from llmir_lang.dsl.state import ProgramState
from llmir_lang.dsl.vars import GatherSlot, Slot
from llmir_lang.ir import Value

_MODES = {"gather_variable": "gather", "gather": "gather", "concate_and_append": "concat", "concat": "concat"}


class ForkGroup:
    """The branches of one fork, in order."""

    def __init__(
        self, parent: ProgramState, branches: list[ProgramState], source: Value, segment: int
    ) -> None:
        self.parent = parent
        self.branches = branches
        self._source = source
        self._segment = segment
        self._base = len(parent._pieces)
        self._names_at_fork = set(parent._vars)
        self._joined = False

    @classmethod
    def create(
        cls,
        parent: ProgramState,
        n: int,
        where: SourceLocation | None,
        branch_type: type[ProgramState] = ProgramState,
    ) -> ForkGroup:
        """Record the fork; each branch is a ``branch_type`` (``StateCopy`` for ``s.copy()``)."""
        run = parent._run
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ForkError(
                f"fork({n!r}): the number of branches must be an integer >= 1", run.program, where
            )
        source = run.value(parent)
        values = run.builder.fork(source, n)
        branches = []
        for v in values:
            b = branch_type(run, list(parent._pieces), dict(parent._vars), parent._role)
            b._value, b._segment = v, run.segment
            b._dropped = set(parent._dropped)  # the parent's text before the fork is the branch's
            b._joins = dict(parent._joins)
            branches.append(b)
        return cls(parent, branches, source, run.segment)

    def __len__(self) -> int:
        return len(self.branches)

    def __getitem__(self, i: int) -> ProgramState:
        return self.branches[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        # ``forks[i] += x`` appends to branch i in place and then stores the same branch back
        if value is not self.branches[i]:
            raise ForkError(
                "a fork branch cannot be replaced; append to it instead (forks[i] += ...)",
                self.parent._run.program,
                SourceLocation.here(),
            )

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.branches)

    def __iadd__(self, other: Any) -> ForkGroup:
        """Append to every branch: one value, ``lambda i: ...`` (called per branch index), or a
        list or tuple with one value per branch (as in SGLang; append a ``Concat`` or a joined
        string to give every branch the same several items)."""
        where = SourceLocation.here()
        if isinstance(other, (list, tuple)):
            if len(other) != len(self.branches):
                raise ForkError(
                    f"{len(other)} values appended to a group of {len(self.branches)} branches; give one "
                    "value per branch, or one value (or a lambda i: ...) for all",
                    self.parent._run.program,
                    where,
                )
            items = list(other)
        elif callable(other) and not hasattr(other, "__iadd__"):
            fn: Callable[[int], Any] = other
            items = [fn(i) for i in range(len(self.branches))]
        else:
            items = [other] * len(self.branches)
        for branch, item in zip(self.branches, items):
            branch += item
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Gather the branches' new variables into the parent (lists, in branch order); with
        ``mode="concate_and_append"`` also append each branch's new text to the parent."""
        run = self.parent._run
        where = SourceLocation.here()
        if self._joined:
            raise ForkError("this fork group was already joined; join a group once", run.program, where)
        if mode not in _MODES:
            raise InvalidJoinModeError(
                f"unknown join mode {mode!r}; use one of {sorted(_MODES)}", run.program, where
            )
        ir_mode = _MODES[mode]
        names: list[str] = []
        for b in self.branches:
            names += [k for k in b._vars if k not in self._names_at_fork and k not in names]
        clash = [k for k in names if k in self.parent._vars and not is_anonymous(k)]
        if clash:
            raise VariableRedefinedError(
                f"join: the parent already has variable(s) {clash} that the branches also define; rename one",
                run.program,
                where,
            )
        self._joined = True
        parent = self.parent
        in_segment = (
            run.segment == self._segment
            and parent._segment == run.segment
            and parent._value == self._source
            and all(b._segment == run.segment and b._value is not None for b in self.branches)
        )
        if in_segment:
            parent._value = run.builder.join(
                self._source, [b._value for b in self.branches if b._value], ir_mode
            )
            waits = [p for b in self.branches for p in b._pieces[self._base :] if p.text is None]
            if ir_mode == "gather" and waits:  # (a concat join appends the branches' pieces themselves)
                piece = Piece("join", "", where=where, scopes=tuple(parent._scopes))
                parent._joins[id(piece)] = waits
                parent._pieces.append(piece)
                parent._on_piece(piece)
        elif ir_mode == "concat":
            # The parent moved on (or the branches ran in an earlier segment): run what is
            # recorded, then append the branches' known text.
            if run.in_body() and run.has_pending():
                run.flush()
            parent._value = None
        for k in names:
            if is_anonymous(k):
                continue
            slots: list[Slot | None] = [b._vars.get(k) for b in self.branches]
            parent._vars[k] = GatherSlot(slots)
        if ir_mode == "concat":
            for b in self.branches:
                for piece in b._pieces[self._base :]:
                    if id(piece) in b._dropped:  # after the branch stopped: no text here either
                        parent._dropped.add(id(piece))
                    parent._pieces.append(piece)
                    if parent._scopes:  # joined inside the parent's var_scope: part of it
                        piece.scopes = (*piece.scopes, *parent._scopes)
                    parent._borrowed[id(piece)] = b  # its streamed text arrives on the branch
                    parent._on_piece(piece)
