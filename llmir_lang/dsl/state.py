"""``ProgramState``: the ``s`` a program appends to, reads variables from, and forks.

Appending (``s += ...``) records; reading (``s["x"]``, ``s.text()``, ``s.messages()``,
``s.get_meta_info``) is a sync point inside the program body (the recorded segment runs first)
and, outside it, waits for the program to finish (a streamed run). See ``recorder`` for the
segment model and ``fork`` for fork groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, overload

from llmir_lang.dsl.errors import (
    DSLError,
    FeatureNotSupportedError,
    ForkError,
    InvalidAppendError,
    ProgramExecutionError,
    ProgramInterruptedError,
    RoleError,
    SourceLocation,
    UnknownVariableError,
    VariableRedefinedError,
)
from llmir_lang.dsl.primitives import (
    Concat,
    Gen,
    RoleBlock,
    RoleMarker,
    Select,
    TracedText,
    is_anonymous,
    marked_placeholder,
)
from llmir_lang.dsl.recorder import Piece, ProgramRun
from llmir_lang.dsl.streaming import AsyncStream, StreamLog
from llmir_lang.dsl.vars import GatherSlot, PieceSlot, RangeSlot, Slot, ValueSlot
from llmir_lang.errors import IRVerifyError, LLMIRError
from llmir_lang.executor.tokenizer import lone_surrogate
from llmir_lang.ir import Value

if TYPE_CHECKING:
    from llmir_lang.dsl.fork import ForkGroup


class ProgramState:
    """The state of one running program (or one fork branch of it)."""

    # SGLang's: the body's return value on the state a run returns (None elsewhere)
    ret_value: Any = None

    def __init__(
        self,
        run: ProgramRun,
        pieces: list[Piece] | None = None,
        variables: dict[str, Slot] | None = None,
        role: str | None = None,
    ) -> None:
        self._run = run
        self._pieces: list[Piece] = pieces if pieces is not None else []
        self._vars: dict[str, Slot] = variables if variables is not None else {}
        self._role = role
        self._scopes: set[str] = set()
        self._value: Value | None = None
        self._segment = -1
        self._log: StreamLog | None = StreamLog() if run.stream else None
        self._stream_lock = threading.Lock()  # chunks arrive on the engine's thread
        self._cursor = len(self._pieces)  # pieces before it are already in the stream log
        self._received: dict[int, str] = {}  # id(piece) -> streamed gen text received
        # id(piece) -> the fork branch whose chunks fill it (pieces a concat join appended here)
        self._borrowed: dict[int, ProgramState] = {}
        self._sent: dict[int, str] = {}  # id(piece) -> text written to the log
        # id(piece) of the pieces after the point where the program stopped in this state: they
        # never ran here, so they are no part of its text, stream, messages or later prompts
        self._dropped: set[int] = set()
        # id(join piece) -> the branch pieces that a join recorded in this segment waits for
        self._joins: dict[int, list[Piece]] = {}
        run.states.append(self)

    # --- appending -----------------------------------------------------------------------
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

    def _append(self, x: Any, where: SourceLocation | None) -> None:
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
                self._append(item, where)
        elif isinstance(x, (list, tuple)):
            for item in x:
                self._append(item, where)
        elif isinstance(x, Gen):
            self._append_gen(x, x.where or where)
        elif isinstance(x, Select):
            at = x.where or where
            # an unnamed select (SGLang's) is named where it is appended, as an unnamed gen: each
            # append its own variable, and the same name in every trace of the program
            name = x.name if x.name is not None else run.anonymous_name()
            self._claim(name, at)
            piece = Piece("select", None, name=name, where=at)
            self._record(lambda v: run.builder.select(v, name, x.choices, x.choices_method), piece, at)
            self._vars[name] = PieceSlot(piece)
        elif isinstance(x, RoleMarker):
            self._role_marker(x.role, x.begin, x.where or where)
        elif isinstance(x, RoleBlock):
            at = x.where or where
            self._role_marker(x.role, True, at)
            self._append(x.content, at)
            self._role_marker(x.role, False, at)
        else:
            raise InvalidAppendError(
                f"cannot append a {type(x).__name__} ({x!r:.60}); append text (use str(...) for "
                "numbers and objects), gen(...), select(...), a role, or a list of those",
                run.program,
                where,
            )

    def _append_gen(self, g: Gen, where: SourceLocation | None) -> None:
        run = self._run
        name = g.name if g.name is not None else run.anonymous_name()
        self._claim(name, where)
        attrs = run.gen_attrs(g.attrs)
        piece = Piece("gen", None, name=name, where=where)
        self._record(lambda v: run.builder.gen(v, name, **attrs), piece, where)
        self._vars[name] = PieceSlot(piece)
        if g.schema is not None:
            run.schemas[name] = g.schema

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

    # --- forks ---------------------------------------------------------------------------
    def fork(
        self, size: int = 1, position_ids_offset: list[int] | None = None, *, n: int | None = None
    ) -> ForkGroup:
        """``size`` branches (SGLang's default: one), each starting with this state's text and
        variables (a ``ForkGroup``). ``position_ids_offset`` is accepted by name, as in SGLang,
        and only as None. ``n=`` is the older name of ``size``."""
        from llmir_lang.dsl.fork import ForkGroup

        where = SourceLocation.here()
        if n is not None:
            if size != 1 and size != n:
                raise ForkError(f"fork() got size={size!r} and n={n!r}; pass one", self._run.program, where)
            size = n
        self._refuse_position_ids("fork", position_ids_offset, where)
        return ForkGroup.create(self, size, where)

    def copy(self, position_ids_offset: list[int] | None = None) -> StateCopy:
        """A state of its own with this state's text and variables (``fork(1)``'s branch). Kept
        as a value, it is never joined; ``with s.copy() as c:`` joins it back on exit, as in SGLang
        (see ``StateCopy``)."""
        from llmir_lang.dsl.fork import ForkGroup

        where = SourceLocation.here()
        self._refuse_position_ids("copy", position_ids_offset, where)
        group = ForkGroup.create(self, 1, where, branch_type=StateCopy)
        copy = group[0]
        assert isinstance(copy, StateCopy)
        copy._group = group
        return copy

    def _refuse_position_ids(self, what: str, offset: Any, where: SourceLocation | None) -> None:
        if offset is not None:
            raise FeatureNotSupportedError(
                f"{what}(position_ids_offset=...) is not supported: a branch continues at its parent's "
                f"positions, sharing the parent's KV cache; call {what}() without it",
                self._run.program,
                where,
            )

    # --- reading -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        __tracebackhide__ = True
        slot = self._slot(name, SourceLocation.here())
        if self._run.tracing:
            return self._traced(name, slot)
        self._sync(slot)
        return slot.value()

    def __setitem__(self, name: str, value: Any) -> None:
        """Store a Python value as variable ``name``. Once the program has finished, this also
        replaces a produced variable (``state["n"] = int(state["n"])``, as in SGLang), keeping its
        meta info; while it runs, a produced name cannot be set, since the recorded program (and a
        branch or a later segment) still refers to the generated value."""
        slot = self._vars.get(name)
        if isinstance(slot, _ReplacedSlot):  # replaced once already: keep the gen's meta
            slot = slot.produced
        produced = name in self._scopes or isinstance(slot, (PieceSlot, RangeSlot, GatherSlot))
        if produced and not self._run.finished.is_set():
            raise VariableRedefinedError(
                f"variable {name!r} is produced by a gen/select/var_scope/join and cannot be set while "
                "the program runs (SGLang would overwrite it); store the value under another name, e.g. "
                f"s[{name + '_value'!r}] = ..., or set it on the state run() returns, once the program "
                "has finished",
                self._run.program,
                SourceLocation.here(),
            )
        self._vars[name] = _ReplacedSlot(value, slot) if produced and slot is not None else ValueSlot(value)

    def __contains__(self, name: object) -> bool:
        return name in self._vars

    def get_var(self, name: str) -> Any:
        return self[name]

    def set_var(self, name: str, value: Any) -> None:
        self[name] = value

    def variables(self) -> dict[str, Any]:
        """Every named variable and its value (a sync point)."""
        self._sync(None)
        return {k: s.value(strict=False) for k, s in self._vars.items() if not is_anonymous(k)}

    def get_meta_info(self, name: str) -> dict[str, Any]:
        """Prompt / completion / cached tokens, logprobs and finish reason of gen ``name`` (for a
        select: every choice's logprobs). A sync point."""
        slot = self._slot(name, SourceLocation.here())
        if self._run.tracing:
            return _TracedMeta(name)
        self._sync(slot)
        return slot.meta()

    def get_obj(self, name: str) -> Any:
        """The value of ``gen(name, json_schema=...)`` as an object (a sync point): validated by
        pydantic where the schema was a type (a model instance, a dataclass instance, a TypedDict's
        dict, a list of them, ...), else the parsed JSON, validated against the schema. After
        a fork's ``join`` (``s[name]`` is a list), a list with one object per branch.

        Raises ``ConstraintViolationError`` when the text does not validate, saying so when
        ``max_tokens`` cut the object short: never a silently truncated object.
        """
        value = self[name]
        schema = self._run.schemas.get(name)
        if schema is None:
            raise DSLError(
                f"get_obj({name!r}): {name!r} was not generated with json_schema=...; read it with s[{name!r}]",
                self._run.program,
                SourceLocation.here(),
            )
        meta = self.get_meta_info(name)
        if isinstance(value, list):
            # a joined fork's variable: one text per branch, each with its own meta (a list used to
            # reach json.loads whole, which raised a bare TypeError)
            branches = meta.get("branches") or [{}] * len(value)
            return [
                _parse_obj(name, text, schema, branch, f" (fork branch {i})")
                for i, (text, branch) in enumerate(zip(value, branches))
            ]
        return _parse_obj(name, value, schema, meta, "")

    def text(self) -> str:
        """The whole text so far (a sync point). A gen that failed after streaming some text (one
        stopped by ``cancel``) keeps that text here, as the stream showed it; the text recorded
        after it (a later turn the program never reached) is not here: it never ran."""
        self._sync(None)
        return self._known_text()

    def messages(self) -> list[dict[str, str]]:
        """The chat messages so far, one ``{"role", "content"}`` per closed role block (a sync
        point). A role still open is not a message yet, as in SGLang. The content is the text as
        appended, not left-stripped as SGLang's is, so that the backend's chat template renders
        these messages to the very text the program built."""
        self._sync(None)
        out: list[dict[str, str]] = []
        current: dict[str, str] | None = None
        for p in self._pieces:
            if id(p) in self._dropped:  # after a stop: its role markers close or open nothing
                continue
            if p.kind == "role":
                if p.begin:
                    current = {"role": p.role or "", "content": ""}
                elif current is not None:
                    out.append(current)
                    current = None
            elif current is not None:
                current["content"] += self._piece_text(p)
        return out

    def error(self) -> BaseException | None:
        """The exception that stopped this program (None if it ran to the end or still runs)."""
        return self._run.error

    def run_stats(self) -> dict[str, int]:
        """What the run sent to the backend so far (shared by a whole ``run_batch``): segments,
        rounds, gen/chain requests, prefills and score calls."""
        run = self._run
        stats = run.stats if run.runner is None else getattr(run.runner, "stats", None)
        if stats is None:
            return {}
        return {k: getattr(stats, k) for k in ("segments", "rounds", "requests", "prefills", "score_calls")}

    def sync(self) -> ProgramState:
        """Run everything recorded so far (in the body) or wait for the program (outside it)."""
        self._sync(None)
        return self

    def text_iter(self, var_name: str | None = None, *, var: str | None = None) -> Iterator[str]:
        """The text (or variable ``var_name``'s text) as it is produced; a run with
        ``stream=True`` yields it piece by piece as the engine generates, any other run yields it
        at once. A KeyboardInterrupt while it waits for the next piece stops the program
        (``cancel``). ``var=`` is the older name of ``var_name`` (SGLang's)."""
        return self._text_iter(self._stream_var("text_iter", var_name, var))

    def text_async_iter(
        self, var_name: str | None = None, return_meta_data: bool = False, *, var: str | None = None
    ) -> AsyncIterator[str]:
        """``text_iter`` for ``async for``; never blocks the event loop. Cancelling the task that
        reads it stops the program (``cancel``), also where the cancel lands in the loop's body;
        a reader that stops otherwise (``break``) leaves it running. ``return_meta_data=True``
        (SGLang's ``(chunk, meta_info)`` pairs) is refused: the stream carries text only."""
        name = self._stream_var("text_async_iter", var_name, var)
        if return_meta_data:
            raise FeatureNotSupportedError(
                "text_async_iter(return_meta_data=True) is not supported yet: the stream carries text "
                "only; iterate the text, then read state.get_meta_info(var_name) (it waits for the gen)",
                self._run.program,
                SourceLocation.here(),
            )
        return AsyncStream(self._text_async_iter(name), self._reader_cancelled)

    def _reader_cancelled(self) -> None:
        self._run.cancel("the task reading text_async_iter() was cancelled")

    @staticmethod
    def _stream_var(what: str, var_name: str | None, var: str | None) -> str | None:
        if var is not None and var_name is not None and var != var_name:
            raise TypeError(f"{what}() got var_name={var_name!r} and var={var!r}; pass one of them")
        return var_name if var_name is not None else var

    def _text_iter(self, var: str | None, strict: bool = True) -> Iterator[str]:
        where = SourceLocation.here()
        if self._log is None:
            self._sync(None)
            yield self.text() if var is None else str(self[var])
        else:
            got = False
            try:
                for chunk in self._log.iter(var):
                    got = True
                    yield chunk
            except KeyboardInterrupt:
                self._run.cancel("text_iter() was interrupted")
                raise
            tail = self._unstreamed(var, got)
            if tail:
                yield tail
        if strict:
            self._raise_failure(var, where)

    async def _text_async_iter(self, var: str | None) -> AsyncGenerator[str, None]:
        where = SourceLocation.here()
        if self._log is None:
            self._sync(None)
            yield self.text() if var is None else str(self[var])
        else:
            got = False
            try:
                async for chunk in self._log.aiter(var):
                    got = True
                    yield chunk
            except (KeyboardInterrupt, asyncio.CancelledError):
                self._run.cancel("text_async_iter() was cancelled")
                raise
            tail = self._unstreamed(var, got)
            if tail:
                yield tail
        self._raise_failure(var, where)

    def _unstreamed(self, var: str | None, got: bool) -> str:
        """After a stream's last chunk, a variable's text that never streamed: one set with
        ``s[k] = v`` or gathered by a join comes as one chunk, its value's text (a name the program
        never produced raises)."""
        if var is None or got:
            return ""
        try:
            return str(self[var])
        except ProgramInterruptedError:
            return ""

    def _raise_failure(self, var: str | None, where: SourceLocation | None) -> None:
        """At the end of a stream: the error of the program (``var`` None) or of the variable, if
        it failed, so a stream never ends short in silence. A stop that was asked for (``cancel``,
        an interrupt: ``ProgramInterruptedError``) just ends it, as the one who stopped it knows
        (``state.error()`` says so)."""
        try:
            if var is None:
                if self._run.error is not None:
                    raise self._run.error
            else:
                self._slot(var, where).value()
        except ProgramInterruptedError:
            pass

    def cancel(self) -> None:
        """Stop the program while it runs (``run(stream=True)``, ``arun``): its engine requests
        are aborted, the gens and selects not done fail, and ``error()`` becomes a
        ``ProgramInterruptedError``. The text produced so far stays readable. Does nothing once
        the program has finished."""
        self._run.cancel(f"program {self._run.program!r} was cancelled")

    def __str__(self) -> str:
        """``ProgramState(<the whole text>)``, SGLang's form (``print(state)``); it waits for the
        program like ``text()``. ``repr`` stays short and never waits (debuggers, tracebacks)."""
        return f"ProgramState({self.text()})"

    def __repr__(self) -> str:
        """The last 60 characters run so far and the program's status; never waits."""
        # as text(): a stopped gen keeps what it streamed (a repr that dropped it showed less
        # than text() for a cancelled stream)
        known = "".join(self._piece_text(p) for p in self._pieces)
        if not self._run.finished.is_set():
            status = ", running"
        elif self._run.error is not None:
            status = f", failed: {type(self._run.error).__name__}"
        else:
            status = ""
        return f"ProgramState({known[-60:]!r}{status})"

    def _repr_html_(self) -> str:
        """Jupyter's rich view: role blocks, generated variables highlighted with their token
        counts and cache hits (``notebook.render_state_html``); never waits for a running program."""
        from llmir_lang.dsl.notebook import render_state_html

        return render_state_html(self)

    # --- internals -----------------------------------------------------------------------
    def _known_text(self) -> str:
        """The text of the pieces run so far (all of them, between segments)."""
        return "".join(self._piece_text(p) for p in self._pieces)

    def _piece_text(self, p: Piece) -> str:
        """A piece's text; for a failed one, what it streamed before it failed; for one after the
        point where the program stopped, nothing."""
        if id(p) in self._dropped:
            return ""
        if p.text is not None:
            return p.text
        return (self._streamed(p) or "") if p.failure is not None else ""

    def _slot(self, name: str, where: SourceLocation | None) -> Slot:
        slot = self._vars.get(name)
        if slot is not None:
            return slot
        if name in self._scopes:
            raise UnknownVariableError(
                f"variable {name!r} is read inside its own var_scope; read it after the with-block",
                self._run.program,
                where,
            )
        known = ", ".join(sorted(k for k in self._vars if not is_anonymous(k))) or "none"
        err = self._run.error
        if err is not None:  # the program stopped before it got there, most likely
            cls = ProgramInterruptedError if isinstance(err, ProgramInterruptedError) else ProgramExecutionError
            e = cls(
                f"variable {name!r} was never produced: the program stopped before it ({err}); "
                f"known variables: {known}",
                self._run.program,
                where,
            )
            e.__cause__ = err
            raise e
        raise UnknownVariableError(
            f"variable {name!r} is never produced (known variables: {known}); name a gen/select "
            "or var_scope after it, or check the spelling",
            self._run.program,
            where,
        )

    def _sync(self, slot: Slot | None) -> None:
        __tracebackhide__ = True
        run = self._run
        if run.tracing:
            return
        if run.in_body():
            if slot is None or slot.pending():
                run.flush()
        elif not run.finished.is_set():
            run.finished.wait()

    def _traced(self, name: str, slot: Slot) -> Any:
        run = self._run
        if isinstance(slot, PieceSlot):
            return TracedText(name, run.builder.var(run.value(self), name), id(run), "variable")
        if isinstance(slot, ValueSlot):
            return slot.value()
        # a var_scope's text or a join's gathered list: the IR has no value to refer to, so a
        # placeholder that refuses to enter the IR (the plain "{name}" it was went in as text)
        return TracedText(name, None, id(run), "variable")

    # --- streaming (called by the recorder and the runner) -------------------------------
    def _on_piece(self, piece: Piece) -> None:
        if self._log is not None and piece.text is not None:
            with self._stream_lock:
                self._advance()

    def _on_chunk(self, name: str, text: str) -> None:
        if self._log is None:
            return
        with self._stream_lock:
            for k in range(self._cursor, len(self._pieces)):
                piece = self._pieces[k]
                if piece.name == name and piece.text is None:
                    if piece.failure is not None or id(piece) in self._dropped:
                        # the engine's last chunks of a request stopped by a cancel: the gen's text
                        # was settled when it stopped, as the stream has shown it
                        return
                    self._received[id(piece)] = self._received.get(id(piece), "") + text
                    self._advance(upto=k)
                    return

    def _on_segment_done(self) -> None:
        self._joins.clear()  # every join of the segment is settled: it has run or failed
        if self._log is not None:
            with self._stream_lock:
                self._advance()

    def _stop_at_failure(self) -> None:
        """The program stopped in the segment that just ran (a gen failed, ``cancel``, an
        interrupt, or the segment never ran): drop from this state every piece after its first
        gen / select / join that did not complete. They never ran, and the evaluator does not
        say so (it goes on computing a failed state's constant text), so without this the text of
        a later turn the program never reached would show in ``text()``, the stream and
        ``messages()``, and a later segment would prompt with it. A piece after that point that
        the stream has already shown stays (a fused chain the engine went through before the
        stop: ``gen -> text -> gen`` as one request): a stream cannot take text back, and the
        state's text is always its stream's. Called before the segment's pieces are failed."""
        with self._stream_lock:
            pieces = self._pieces
            first = next((k for k, p in enumerate(pieces) if self._incomplete(p)), None)
            if first is None:
                return
            keep = first
            for k in range(first + 1, len(pieces)):
                p = pieces[k]
                if self._sent.get(id(p)) or (p.text is None and self._streamed(p) is not None):
                    keep = k
            self._dropped.update(id(p) for p in pieces[keep + 1 :])

    def _incomplete(self, p: Piece) -> bool:
        """A piece without a value yet, or a join still waiting for one in its branches."""
        if p.text is None and p.failure is None:
            return True
        return any(w.text is None and w.failure is None for w in self._joins.get(id(p), ()))

    def _advance(self, upto: int | None = None) -> None:
        """Write pieces from the cursor on to the log, as far as their text is known.

        With ``upto`` (a later gen is streaming), an unfilled gen before it whose stream has
        begun is finished (its request moved on to a later step, or a join waited for it) and the
        cursor passes it; any other unfilled piece (a select, or a gen that has streamed nothing)
        holds the cursor, and the later text waits in ``_received`` until that piece's text is
        known, so the log's text is always the state's text in order. A join whose branches still
        run holds the cursor too, and pieces dropped after a stop are passed over."""
        assert self._log is not None
        while self._cursor < len(self._pieces):
            piece = self._pieces[self._cursor]
            key = id(piece)
            if key in self._dropped:  # never ran here (``_stop_at_failure``)
                self._cursor += 1
                continue
            if piece.kind == "join" and self._incomplete(piece):
                # a join whose branches are still running: the parent's text after it has not
                # run yet (a later gen of the parent streaming means it has: the join is done)
                if upto is None or self._cursor >= upto:
                    return
                self._cursor += 1
                continue
            streamed = self._streamed(piece)
            known = piece.text if piece.text is not None else (streamed or "")
            sent = self._sent.get(key, "")
            if known.startswith(sent) and len(known) > len(sent):
                names = (piece.name, *piece.scopes) if piece.kind in ("gen", "select") and piece.name else piece.scopes
                self._log.emit(names, known[len(sent) :])
                self._sent[key] = known
            if piece.text is None and piece.failure is None:
                if upto is None or self._cursor >= upto or streamed is None:
                    return
            self._cursor += 1

    def _streamed(self, piece: Piece) -> str | None:
        """The streamed text received for ``piece`` so far (None: no chunk yet, not even an
        empty one), here or in the branch it was joined from."""
        got = self._received.get(id(piece))
        if got is not None:
            return got
        branch = self._borrowed.get(id(piece))
        return branch._streamed(piece) if branch is not None else None

    def _close_stream(self) -> None:
        if self._log is not None:
            with self._stream_lock:
                self._advance()
            self._log.close()


class StateCopy(ProgramState):
    """What ``s.copy()`` returns: a state of its own (append to it, read it) that is also SGLang's
    context manager. ``with s.copy() as c: c += ...`` joins ``c`` back into ``s`` on exit, as
    SGLang's ``copy`` (``fork(1)``, then ``join()``) does: each variable produced in ``c`` comes
    to ``s`` as a list of one, and ``s``'s text is unchanged. A copy kept as a value (``c =
    s.copy()``) is never joined. The block joins on the way out of an exception too, as a role
    block closes, so a caller that catches it can go on."""

    _group: ForkGroup | None = None
    _entered = False

    def __enter__(self) -> StateCopy:
        group = self._group
        if group is None or self._entered or group._joined:
            raise ForkError(
                "this copy was already used in a with-block; call s.copy() again for another",
                self._run.program,
                SourceLocation.here(),
            )
        self._entered = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._group is not None
        if exc_type is None:
            self._group.join()
            return
        # NOTE: the exception leaving the block is the one to report, not a join it made impossible
        with contextlib.suppress(LLMIRError):
            self._group.join()


class _ReplacedSlot(ValueSlot):
    """A produced variable replaced after the program finished: the new value, the gen's meta."""

    __slots__ = ("produced",)

    def __init__(self, value: Any, produced: Slot) -> None:
        super().__init__(value)
        self.produced = produced

    def meta(self) -> dict[str, Any]:
        return self.produced.meta()


__all__ = ["ProgramState", "StateCopy"]



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


def _parse_obj(name: str, text: Any, schema: Any, meta: dict[str, Any], where: str) -> Any:
    """``get_obj`` for one generated text: pydantic's value of it, or the parsed JSON validated
    against the schema; ``ConstraintViolationError`` otherwise (``where`` names a fork branch)."""
    import json

    from llmir_lang.errors import ConstraintViolationError

    cut = (
        " (generation stopped at max_tokens: raise max_tokens)"
        if meta.get("finish_reason") == "length"
        else ""
    )
    from llmir_lang.executor.constraints.schema_pydantic import is_pydantic_type, type_name, validate_json_as

    if is_pydantic_type(schema):
        try:
            return validate_json_as(schema, text)
        except Exception as e:
            raise ConstraintViolationError(
                f"gen({name!r}){where} does not validate as {type_name(schema)}{cut}: {e}"
            ) from None
    import jsonschema

    from llmir_lang.dsl.lowering import json_validator

    try:
        obj = json.loads(text)
    except (ValueError, TypeError) as e:
        raise ConstraintViolationError(f"gen({name!r}){where} is not JSON{cut}: {e}") from None
    validator = json_validator(schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True))
    try:  # None, or a validator that cannot run (a $ref it cannot resolve): the engine's check stands
        error = jsonschema.exceptions.best_match(validator.iter_errors(obj)) if validator is not None else None
    except Exception:
        error = None
    if error is not None:
        raise ConstraintViolationError(
            f"gen({name!r}){where} does not validate against its schema{cut}: {error.message} "
            f"(at {error.json_path})"
        ) from None
    return obj


class _TracedMeta(dict):
    """``get_meta_info`` while tracing: empty (meta info exists only once a gen has run), and its
    text is a marked placeholder, so ``str()`` of it appended to the state is refused where it
    reaches the IR instead of recording the text ``{}``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __str__(self) -> str:
        return marked_placeholder(f"meta info of {self.name}")

    __repr__ = __str__
