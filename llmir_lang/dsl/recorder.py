"""Recording: one run of a program, the IR segment it is recording, and the sync that runs it.

A ``ProgramRun`` owns every ``ProgramState`` of one program execution (the root, forks, copies)
and one ``FunctionBuilder``: the current *segment*. Appending to a state records IR ops; nothing
runs. At a sync point (the program reads a pending variable, calls ``text()``, or ends) ``flush``
returns every live state from the function, hands it to the ``SegmentRunner`` (which optimizes and
runs it, alone or batched with other programs' segments) and writes the values back.

Invariants:

- A state's text is the concatenation of its ``Piece``s. A piece is known (``text`` set) once
  its segment ran; pieces are shared by reference between a parent and the forks taken from it.
- In a new segment a state is materialized lazily as ``start`` + ``text(<its known text>)``, so
  the already-run part of a program is a constant the optimizer can share across a batch.
- A program that stops (a failed gen, ``cancel``, an interrupt, a segment that never ran) stops
  each state at its first gen / select / join that did not complete: the pieces after it are
  dropped from that state (``ProgramState._stop_at_failure``), so its text, stream, messages and
  any later segment's prompt hold only what ran, never the constant text of a turn not reached.
- Variable names are checked by the DSL over the whole run (the IR only sees one segment).
"""

from __future__ import annotations

import itertools
import threading
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from llmir_lang.dsl.chat_roles import LazyRoles
from llmir_lang.dsl.errors import (
    DSLError,
    GenerationError,
    ProgramExecutionError,
    ProgramInterruptedError,
    RoleError,
    SourceLocation,
)
from llmir_lang.dsl.results import FunctionResult
from llmir_lang.dsl.traced_text import refuse_traced_marks
from llmir_lang.errors import LLMIRError, NotYetSupportedError
from llmir_lang.executor.backend import Backend
from llmir_lang.ir import Function, FunctionBuilder, Value
from llmir_lang.ir.attrs import AttrValue

if TYPE_CHECKING:
    from llmir_lang.dsl.state import ProgramState


@dataclass(slots=True, eq=False)
class Piece:
    """One appended part of a state's text. ``text`` is None until its segment has run."""

    kind: str  # "text" | "role" | "gen" | "select" | "join" (no text: a gathering join, see fork)
    text: str | None
    name: str | None = None  # gen / select variable
    role: str | None = None
    begin: bool = False
    meta: dict[str, Any] | None = None
    failure: BaseException | None = None
    where: SourceLocation | None = None
    scopes: tuple[str, ...] = ()  # the var_scopes open when it was appended (their streams carry it)
    # separate_reasoning: the variable of the reasoning split off the output (``text`` is then the
    # answer, which is also the gen's value), and that reasoning once the segment has run
    reasoning_var: str | None = None
    reasoning: str | None = None


class SegmentRunner(Protocol):
    """Optimizes and runs one recorded segment; ``live`` are the states in ``fn``'s return order."""

    def execute(self, run: ProgramRun, fn: Function, live: list[ProgramState]) -> FunctionResult: ...


class GenerationNotSupportedError(GenerationError, NotYetSupportedError):
    """A gen used a feature (a constraint) the backend does not support yet."""


class ProgramRun:
    """One execution of a program (see the module docstring).

    ``runner`` is None in trace mode: nothing is run, reads of variables become ``var`` ops.
    ``defaults`` are sampling attributes that every gen without its own value takes.
    """

    def __init__(
        self,
        program: str,
        ir_name: str,
        backend: Backend | None,
        runner: SegmentRunner | None,
        defaults: dict[str, AttrValue] | None = None,
        stream: bool = False,
        params: Sequence[str] = (),
    ) -> None:
        self.program = program
        self.ir_name = ir_name
        self.backend = backend
        self.runner = runner
        self.defaults = dict(defaults or {})
        self.stream = stream
        self.roles = LazyRoles(backend)
        # gen name -> the json_schema it was given (a dict, JSON text or a pydantic class), for get_obj
        self.schemas: dict[str, Any] = {}
        # the reasoning variables a separate_reasoning did not define, the run being streamed
        self.unseparated: set[str] = set()
        self.states: list[ProgramState] = []
        self.builder = FunctionBuilder(ir_name, params)
        self.segment = 0
        self.segments_run = 0
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.thread: int | None = None  # the thread running the program body
        self.stats: Any = None  # the runner's counters, kept when ``release`` drops the runner
        # why nobody can receive the run's result any more (``arun``: its event loop was closed),
        # or None; asked before each segment of a run of its own, which is cancelled instead of
        # run (``flush``; never set on a batch's runs, whose runner a cancel stops whole)
        self.orphaned: Callable[[], str | None] | None = None
        self._tracing = runner is None
        if self._tracing:
            self.builder.op_hook = refuse_traced_marks
        self._anon = itertools.count()
        self._pending = 0  # pieces recorded in this segment and not run yet

    @property
    def tracing(self) -> bool:
        return self._tracing

    def in_body(self) -> bool:
        """True when called from the thread running the program body (before it ended)."""
        return self.thread == threading.get_ident() and not self.finished.is_set()

    # --- recording -----------------------------------------------------------------------
    def value(self, state: ProgramState) -> Value:
        """``state``'s IR value in the current segment, materialized on first use."""
        if state._segment != self.segment or state._value is None:
            v = self.builder.start()
            known = state._known_text()
            if known:
                v = self.builder.text(v, known)
            state._value, state._segment = v, self.segment
        return state._value

    def extend(self, state: ProgramState, record: Callable[[Value], Value], piece: Piece) -> None:
        """Record one extending op on ``state`` (``record`` builds it) and append its piece."""
        state._value = record(self.value(state))
        if state._scopes:
            piece.scopes = tuple(state._scopes)
        state._pieces.append(piece)
        if piece.text is None:
            self._pending += 1
        state._on_piece(piece)

    def anonymous_name(self) -> str:
        return f"_gen{next(self._anon)}"  # primitives.is_anonymous knows these names

    def gen_attrs(self, attrs: dict[str, AttrValue]) -> dict[str, AttrValue]:
        """A gen's attributes with the run's defaults for every key it does not set."""
        out = {k: v for k, v in self.defaults.items() if k not in attrs}
        out.update(attrs)
        return out

    def render_role(self, role: str, begin: bool, where: SourceLocation | None) -> str:
        if self.tracing and self.backend is None:
            return ""
        try:
            return self.roles.begin(role) if begin else self.roles.end(role)
        except LLMIRError as e:
            raise RoleError(f"cannot render role {role!r}: {e}", self.program, where) from e

    def release(self) -> None:
        """Drop the run's references to its backend and runner (called as the program finishes).

        A finished state is often kept long after the run (a notebook's output history keeps every
        value a cell displayed), and it must not keep an engine, its KV memory and its thread alive
        after the user created another one. The runner's counters stay (``run_stats``)."""
        self.stats = getattr(self.runner, "stats", None)
        self.runner = None
        self.backend = None
        self.orphaned = None  # (it holds the run's event loop)
        self.roles = LazyRoles(None)

    def cancel(self, reason: str) -> None:
        """Stop the run from another thread (a KeyboardInterrupt, a cancelled ``arun``): its
        requests in flight are aborted and the program ends with a ``ProgramInterruptedError``.
        Does nothing once the run has finished."""
        cancel = getattr(self.runner, "cancel", None)
        if cancel is not None and not self.finished.is_set():
            cancel(reason)

    def _cancel_if_orphaned(self) -> None:
        """Before a segment: cancel the run if its result can no longer be delivered (see
        ``orphaned``), so that the segment raises ``ProgramInterruptedError`` instead of running."""
        reason = self.orphaned() if self.orphaned is not None else None
        if reason is not None:
            self.cancel(reason)

    # --- sync ----------------------------------------------------------------------------
    def has_pending(self) -> bool:
        return self._pending > 0

    def flush(self) -> None:
        """Run the recorded segment (a sync point) and write the values into the pieces."""
        __tracebackhide__ = True
        segment = self._take_segment()
        if segment is None:
            return
        live, fn = segment
        assert self.runner is not None
        try:
            self._cancel_if_orphaned()
            result = self.runner.execute(self, fn, live)
        except BaseException as e:
            self._never_ran(live, e)
            raise
        self.segments_run += 1
        self._write_back(live, result)

    def flush_then(self, done: Callable[[Exception | None], None]) -> bool:
        """``flush`` without waiting, for the end of a body that has returned: the segment is
        handed to the runner (one with ``execute_async``) and ``done(error)`` is called on the
        thread that completes it, once the values are written back (``error``: what ``flush``
        would have raised). The body's thread is free at once (``run_batch``: its worker takes
        the next program, or exits, and no thread waits per program). False, ``done`` never
        called and nothing taken, when there is nothing to run or the runner cannot."""
        submit = getattr(self.runner, "execute_async", None)
        if submit is None or self.tracing or not self._pending:
            return False
        segment = self._take_segment()
        assert segment is not None
        live, fn = segment
        try:
            future = submit(self, fn, live)
        except BaseException as e:  # cancelled before it was handed over
            self._never_ran(live, e)
            raise
        self.thread = None  # the body has returned: its thread may run another program now

        def written(f: Future) -> None:
            # nothing is raised here: an exception's traceback would hold this frame, and through
            # its callers' frames the evaluator, the runner and the engine, for as long as the
            # failed state is kept (a notebook keeps them all)
            failed = f.exception()
            try:
                if failed is None:
                    self.segments_run += 1
                    failed = self._written(live, f.result())
                else:
                    self._never_ran(live, failed)
            except Exception as e:  # a bug: the run must still end, with it as its error
                failed = e
            if failed is not None:
                failed = _frameless(failed)
            done(failed if isinstance(failed, Exception) or failed is None else _as_exception(failed))

        future.add_done_callback(written)
        return True

    def _take_segment(self) -> tuple[list[ProgramState], Function] | None:
        """The recorded segment as a function (None if nothing is pending); recording goes on in
        a fresh builder."""
        if self.tracing:
            return None
        live = [st for st in self.states if st._segment == self.segment and st._value is not None]
        pending = self._pending
        builder = self.builder
        self.builder = FunctionBuilder(self.ir_name)
        self.segment += 1
        self._pending = 0
        if not pending:
            return None
        builder.ret(*[st._value for st in live if st._value is not None])
        return live, builder.build()

    def _write_back(self, live: list[ProgramState], result: FunctionResult) -> None:
        __tracebackhide__ = True
        error = self._written(live, result)
        if error is not None:
            raise error

    def _written(self, live: list[ProgramState], result: FunctionResult) -> Exception | None:
        """Write the segment's values into the pieces; the error the program stops with, if any
        (a piece without a value fails with it)."""
        failure = None
        for state, res in zip(live, result.states):
            for piece in state._pieces:
                if piece.text is None and piece.name is not None and piece.name in res.vars:
                    var = res.vars[piece.name]
                    piece.text, piece.meta = var.value, var.meta
                    if piece.reasoning_var is not None:
                        split = res.vars.get(piece.reasoning_var)
                        piece.reasoning = split.value if split is not None else ""
            if res.failure is not None and failure is None:
                failure = res.failure
        error: BaseException | None = None
        if failure is not None:
            where = self._where_of(live, failure.name)
            what = f"gen/select {failure.name!r}" if failure.name else "the program"
            if isinstance(failure.cause, ProgramInterruptedError):
                error = ProgramInterruptedError(f"{what} was stopped: {failure.message}", self.program, where)
            else:
                cls = (
                    GenerationNotSupportedError
                    if isinstance(failure.cause, NotYetSupportedError)
                    else GenerationError
                )
                error = cls(f"{what} failed: {failure.message}", self.program, where)
            error.__cause__ = _detached(failure.cause)
        stopped = [state for state, res in zip(live, result.states) if res.failure is not None]
        self._settle(live, stopped, error)
        return error

    def _never_ran(self, live: list[ProgramState], e: BaseException) -> None:
        """A segment taken from the recorder that gave no result (cancelled while it waited for
        its round, or before it was handed over; the runner failed): its states stop at their
        first piece without a value, as a segment whose gen failed does, and those pieces fail
        with an error saying why (reading one raises it instead of giving None)."""
        what = e.cause_message if isinstance(e, DSLError) else type(e).__name__ + (f": {e}" if str(e) else "")
        if isinstance(e, ProgramInterruptedError) or not isinstance(e, Exception):
            error: DSLError = ProgramInterruptedError(f"the program was stopped: {what}", self.program)
        else:
            error = GenerationError(f"the segment did not run: {what}", self.program)
        self._settle(live, live, error)

    def abandon(self) -> None:
        """At the end of the run: what the body recorded after its last sync point and never ran
        (it raised, or was interrupted, before that segment was taken) is settled as a segment
        that never ran, so no piece stays pending and no text after the first of them shows."""
        if self.tracing or not self._pending:
            return
        live = [st for st in self.states if st._segment == self.segment and st._value is not None]
        self._pending = 0
        err = self.error
        if err is None:  # a KeyboardInterrupt in the body: not an error a run records
            error: DSLError = ProgramInterruptedError("the program was interrupted before it ran", self.program)
        else:
            what = err.cause_message if isinstance(err, DSLError) else f"{type(err).__name__}: {err}"
            cls = ProgramInterruptedError if isinstance(err, ProgramInterruptedError) else ProgramExecutionError
            error = cls(f"the program stopped before it ran ({what})", self.program)
        self._settle(live, live, error)

    def _settle(self, live: list[ProgramState], stopped: list[ProgramState], error: BaseException | None) -> None:
        """The end of a segment: every state in ``stopped`` drops what follows its first piece that
        did not complete (all states look before any piece is failed: pieces are shared between a
        parent and its branches), then each piece still without a value fails with ``error``."""
        for state in stopped:
            state._stop_at_failure()
        for state in live:
            for piece in state._pieces:
                if piece.text is None and piece.failure is None:
                    piece.failure = error or GenerationError(
                        f"{piece.name!r} got no value from the backend", self.program, piece.where
                    )
            state._on_segment_done()

    @staticmethod
    def _where_of(live: list[ProgramState], name: str | None) -> SourceLocation | None:
        for state in live:
            for piece in state._pieces:
                if piece.name == name and piece.text is None:
                    return piece.where
        return None


def _frameless(e: BaseException) -> BaseException:
    """``e`` (and the exceptions it chains) without tracebacks, for a failed state to keep: their
    frames, some still running when the state gets the error (so ``traceback.clear_frames``
    cannot empty them), reach the evaluator, the runner and the engine. An error that is not
    llmir_lang's own keeps its traceback's text as a note (Python 3.11+)."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if x.__traceback__ is not None:
            if not isinstance(x, LLMIRError) and hasattr(x, "add_note"):
                x.add_note("traceback (its frames are not kept):\n" + "".join(traceback.format_tb(x.__traceback__)))
            x.__traceback__ = None
        x = x.__cause__ or x.__context__
    return e


def _as_exception(e: BaseException) -> Exception:
    """A segment's failure that is not an ``Exception`` (a KeyboardInterrupt on the round's thread)
    as the program's error."""
    err = ProgramInterruptedError(f"the segment was stopped ({type(e).__name__})")
    err.__cause__ = e
    return err


def _detached(cause: BaseException | None) -> BaseException | None:
    """``cause`` made fit to be kept by a failed state, as long as the state lives: the locals of
    its traceback's frames are cleared (they hold the evaluator, and through it the backend and
    its engine), and one of llmir_lang's typed errors (a prompt too long, a bad schema) loses its
    traceback altogether: its message says what is wrong, and the frames are the engine's own."""
    if cause is not None and cause.__traceback__ is not None:
        traceback.clear_frames(cause.__traceback__)
        if isinstance(cause, LLMIRError):
            cause.__traceback__ = None
    return cause
