"""Appending to a ``ProgramState``: ``s += ...`` (text, ``gen``, ``select``, roles, lists and
concatenations of them, ``separate_reasoning``), the role methods (``s.user(...)``, ``with
s.user():``) and ``var_scope``. Each append records IR ops and a ``Piece`` on the program's run;
nothing runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, overload

from llmir_lang.dsl.errors import (
    DSLError,
    FeatureNotSupportedError,
    InvalidAppendError,
    RoleError,
    SourceLocation,
    VariableRedefinedError,
)
from llmir_lang.dsl.primitive_records import Concat, Gen, RoleBlock, RoleMarker, Select, SeparateReasoning
from llmir_lang.dsl.recorder import Piece, ProgramRun
from llmir_lang.dsl.traced_text import TracedText
from llmir_lang.dsl.vars import PieceSlot, RangeSlot, ReasoningSlot, Slot
from llmir_lang.errors import IRVerifyError
from llmir_lang.executor.tokenizer import lone_surrogate
from llmir_lang.ir.reasoning import reasoning_variable

if TYPE_CHECKING:
    from llmir_lang.dsl.state import ProgramState


class _StateAppending:
    """The appending half of ``ProgramState``. Needs of the state: ``_run``, ``_pieces``,
    ``_vars``, ``_role`` and ``_scopes``."""

    _run: ProgramRun
    _pieces: list[Piece]
    _vars: dict[str, Slot]
    _role: str | None
    _scopes: set[str]

    def __iadd__(self, other: Any) -> ProgramState:
        __tracebackhide__ = True
        where = SourceLocation.here()
        if self._run.finished.is_set():
            raise DSLError(
                "this program has finished; its state is read-only (run the program again to continue)",
                self._run.program,
                where,
            )
        self._append(other, where)
        return self

    def _append(self, x: Any, where: SourceLocation | None, reasoning: str | None = None) -> None:
        """Append ``x``; ``reasoning``: the format of the ``separate_reasoning`` it is inside."""
        __tracebackhide__ = True
        run = self._run
        if isinstance(x, TracedText):
            if x.run_id != id(run):
                raise DSLError("a traced placeholder from another trace was appended", run.program, where)
            if x.value is None:
                raise FeatureNotSupportedError(
                    f"variable {x.name!r} (a var_scope's text or a fork's joined list) is appended while "
                    "the program is traced (trace(), llmir ir, cache()): the IR has no value for it, so "
                    "the trace would record its placeholder as text; run() the program to use it",
                    run.program,
                    where,
                )
            run.extend(
                self, lambda v: run.builder.append(v, x.value), Piece("text", x.placeholder, where=where)
            )
        elif isinstance(x, str):
            if x:
                _check_encodable(x, run.program, where)
                run.extend(self, lambda v: run.builder.text(v, x), Piece("text", x, where=where))
        elif isinstance(x, Concat):
            for item in x.items:
                self._append(item, where, reasoning)
        elif isinstance(x, (list, tuple)):
            for item in x:
                self._append(item, where, reasoning)
        elif isinstance(x, Gen):
            self._append_gen(x, x.where or where, reasoning)
        elif isinstance(x, Select):
            at = x.where or where
            # an unnamed select (SGLang's) is named where it is appended, as an unnamed gen: each
            # append its own variable, and the same name in every trace of the program
            name = x.name if x.name is not None else run.anonymous_name()
            fmt = self._claim_reasoning(name, reasoning, at)
            piece = Piece("select", None, name=name, where=at)
            self._record(lambda v: run.builder.select(v, name, x.choices, x.choices_method, fmt), piece, at)
            self._bind(name, piece, fmt)
        elif isinstance(x, SeparateReasoning):
            if reasoning is not None:  # (``separate_reasoning`` refuses one built inside another)
                raise DSLError("separate_reasoning inside another separate_reasoning", run.program, where)
            self._append(x.expr, x.where or where, x.model_type)
        elif isinstance(x, RoleMarker):
            self._role_marker(x.role, x.begin, x.where or where)
        elif isinstance(x, RoleBlock):
            at = x.where or where
            self._role_marker(x.role, True, at)
            self._append(x.content, at, reasoning)
            self._role_marker(x.role, False, at)
        else:
            # ``s += other(s, ...)``: the composed program has appended to s already, and its body
            # returned None (no hint for other values: a None is what such a call gives)
            hint = (
                "; a program called with the state, `other(s, ...)`, appends to s itself and returns "
                "its body's return value: call it without `s +=`"
                if x is None
                else ""
            )
            raise InvalidAppendError(
                f"cannot append a {type(x).__name__} ({x!r:.60}); append text (use str(...) for "
                f"numbers and objects), gen(...), select(...), a role, or a list of those{hint}",
                run.program,
                where,
            )

    def _append_gen(self, g: Gen, where: SourceLocation | None, reasoning: str | None = None) -> None:
        run = self._run
        name = g.name if g.name is not None else run.anonymous_name()
        fmt = self._claim_reasoning(name, reasoning, where)
        attrs = run.gen_attrs(g.attrs)
        if fmt is not None:
            attrs["reasoning"] = fmt
        piece = Piece("gen", None, name=name, where=where)
        self._record(lambda v: run.builder.gen(v, name, **attrs), piece, where)
        self._bind(name, piece, fmt)
        if g.schema is not None:
            run.schemas[name] = g.schema

    def _claim_reasoning(self, name: str, reasoning: str | None, where: SourceLocation | None) -> str | None:
        """Claim gen / select ``name`` and, inside ``separate_reasoning``, its reasoning variable;
        the format to record (None in a streamed run, where separate_reasoning does nothing)."""
        self._claim(name, where)
        if reasoning is None:
            return None
        if self._run.stream:
            self._run.unseparated.add(reasoning_variable(name))
            return None
        self._claim(reasoning_variable(name), where)
        return reasoning

    def _bind(self, name: str, piece: Piece, reasoning: str | None) -> None:
        self._vars[name] = PieceSlot(piece)
        if reasoning is not None:
            piece.reasoning_var = reasoning_variable(name)
            self._vars[piece.reasoning_var] = ReasoningSlot(piece)

    def _record(self, build: Any, piece: Piece, where: SourceLocation | None) -> None:
        try:
            self._run.extend(self, build, piece)
        except IRVerifyError as e:
            raise DSLError(str(e), self._run.program, where) from None

    def _claim(self, name: str, where: SourceLocation | None) -> None:
        if name in self._vars or name in self._scopes:
            raise VariableRedefinedError(
                f"variable {name!r} is already defined in this state (SGLang would overwrite it; here a "
                "name is produced once per state, so every value stays readable); give each turn its "
                f"own name (in a loop, add the index: f'{name}_{{i}}'), capture the turn with an "
                f"unnamed gen inside s.var_scope(f'{name}_{{i}}'), or fork first so each branch has its own",
                self._run.program,
                where,
            )

    def _role_marker(self, role: str, begin: bool, where: SourceLocation | None) -> None:
        run = self._run
        if begin and self._role is not None:
            raise RoleError(
                f"role {role!r} opened inside role {self._role!r}; roles do not nest: close "
                f"{self._role!r} first",
                run.program,
                where,
            )
        if not begin and self._role != role:
            raise RoleError(
                f"role {role!r} closed but {'no role' if self._role is None else repr(self._role)} is open",
                run.program,
                where,
            )
        text = run.render_role(role, begin, where)
        build = (
            (lambda v: run.builder.role_begin(v, role))
            if begin
            else (lambda v: run.builder.role_end(v, role))
        )
        run.extend(self, build, Piece("role", text, role=role, begin=begin, where=where))
        self._role = role if begin else None

    @contextlib.contextmanager
    def _role_block(self, role: str) -> Iterator[ProgramState]:
        self._role_marker(role, True, SourceLocation.here())
        try:
            yield self
        finally:
            # closed on the way out of an exception too, so a caller that catches it can go on
            if self._role == role:
                self._role_marker(role, False, SourceLocation.here())

    def _role_call(self, role: str, expr: Any) -> contextlib.AbstractContextManager[ProgramState] | None:
        if expr is None:
            return self._role_block(role)
        self.__iadd__(RoleBlock(role, expr, SourceLocation.here()))
        return None

    @overload
    def system(self, expr: None = None) -> contextlib.AbstractContextManager[ProgramState]: ...
    @overload
    def system(self, expr: Any) -> None: ...
    def system(self, expr: Any = None) -> contextlib.AbstractContextManager[ProgramState] | None:
        """``s.system("...")`` appends one system message (``s += system("...")``), as SGLang's
        method does; ``with s.system(): s += "..."`` makes the appended text one system message."""
        return self._role_call("system", expr)

    @overload
    def user(self, expr: None = None) -> contextlib.AbstractContextManager[ProgramState]: ...
    @overload
    def user(self, expr: Any) -> None: ...
    def user(self, expr: Any = None) -> contextlib.AbstractContextManager[ProgramState] | None:
        """``s.user(expr)`` appends a user message; ``with s.user():`` is the block form."""
        return self._role_call("user", expr)

    @overload
    def assistant(self, expr: None = None) -> contextlib.AbstractContextManager[ProgramState]: ...
    @overload
    def assistant(self, expr: Any) -> None: ...
    def assistant(self, expr: Any = None) -> contextlib.AbstractContextManager[ProgramState] | None:
        """``s.assistant(gen("a"))`` appends an assistant message; ``with s.assistant():`` is the
        block form."""
        return self._role_call("assistant", expr)

    @contextlib.contextmanager
    def var_scope(self, name: str) -> Iterator[ProgramState]:
        """``with s.var_scope("x"): s += ...``: variable ``x`` is all the text appended inside."""
        where = SourceLocation.here()
        self._claim(name, where)
        self._scopes.add(name)
        start = len(self._pieces)
        try:
            yield self
        finally:
            self._scopes.discard(name)
        self._vars[name] = RangeSlot(self, start, len(self._pieces))


def _check_encodable(text: str, program: str, where: SourceLocation | None) -> None:
    """Refuse text no tokenizer can encode (a lone surrogate) where it is appended, with the
    position, rather than as the tokenizer's bare ``TypeError`` when the segment runs."""
    if text.isascii():
        return
    bad = lone_surrogate(text)
    if bad is not None:
        raise InvalidAppendError(
            f"the text has a lone surrogate (U+{ord(bad.group()):04X}) at position {bad.start()}, which "
            "is not Unicode text a tokenizer can encode (an unpaired \\ud8xx escape in JSON, or bytes "
            "decoded with errors='surrogateescape'); remove or replace it, e.g. "
            "text.encode('utf-8', 'replace').decode('utf-8')",
            program,
            where,
        )
