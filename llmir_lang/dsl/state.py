"""``ProgramState``: the ``s`` a program appends to, reads variables from, and forks.

Appending (``s += ...``) records; reading (``s["x"]``, ``s.text()``, ``s.messages()``,
``s.get_meta_info``) is a sync point inside the program body (the recorded segment runs first)
and, outside it, waits for the program to finish (a streamed run). See ``recorder`` for the
segment model and ``fork`` for fork groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from llmir_lang.dsl.errors import (
    DSLError,
    InvalidAppendError,
    RoleError,
    SourceLocation,
    UnknownVariableError,
    VariableRedefinedError,
)
from llmir_lang.dsl.primitives import Concat, Gen, RoleBlock, RoleMarker, Select, TracedText
from llmir_lang.dsl.recorder import Piece, ProgramRun
from llmir_lang.dsl.streaming import StreamLog
from llmir_lang.dsl.vars import GatherSlot, PieceSlot, RangeSlot, Slot, ValueSlot
from llmir_lang.errors import IRVerifyError
from llmir_lang.ir import Value


class ProgramState:
    """The state of one running program (or one fork branch of it)."""

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
            run.extend(self, lambda v: run.builder.append(v, x.value), Piece("text", str(x), where=where))
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
            self._claim(x.name, at)
            piece = Piece("select", None, name=x.name, where=at)
            self._record(lambda v: run.builder.select(v, x.name, x.choices, x.choices_method), piece, at)
            self._vars[x.name] = PieceSlot(piece)
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
                f"variable {name!r} is already defined in this state; give this gen/select another "
                "name (in a loop, add the index: f'{name}_{i}'), or fork first so each branch has its own",
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

    def system(self) -> contextlib.AbstractContextManager[ProgramState]:
        """``with s.system(): s += "..."``: the appended text is one system message."""
        return self._role_block("system")

    def user(self) -> contextlib.AbstractContextManager[ProgramState]:
        return self._role_block("user")

    def assistant(self) -> contextlib.AbstractContextManager[ProgramState]:
        return self._role_block("assistant")

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
    def fork(self, n: int) -> Any:
        """``n`` branches, each starting with this state's text and variables (a ``ForkGroup``)."""
        from llmir_lang.dsl.fork import ForkGroup

        return ForkGroup.create(self, n, SourceLocation.here())

    def copy(self) -> ProgramState:
        """An independent state with this state's text and variables (never joined)."""
        return self.fork(1)[0]

    # --- reading -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        __tracebackhide__ = True
        slot = self._slot(name, SourceLocation.here())
        if self._run.tracing:
            return self._traced(name, slot)
        self._sync(slot)
        return slot.value()

    def __setitem__(self, name: str, value: Any) -> None:
        if name in self._scopes or isinstance(self._vars.get(name), (PieceSlot, RangeSlot, GatherSlot)):
            raise VariableRedefinedError(
                f"variable {name!r} is produced by a gen/select/var_scope/join; pick another name to set",
                self._run.program,
                SourceLocation.here(),
            )
        self._vars[name] = ValueSlot(value)

    def __contains__(self, name: object) -> bool:
        return name in self._vars

    def get_var(self, name: str) -> Any:
        return self[name]

    def set_var(self, name: str, value: Any) -> None:
        self[name] = value

    def variables(self) -> dict[str, Any]:
        """Every named variable and its value (a sync point)."""
        self._sync(None)
        return {k: s.value(strict=False) for k, s in self._vars.items() if not k.startswith("_gen")}

    def get_meta_info(self, name: str) -> dict[str, Any]:
        """Prompt / completion / cached tokens, logprobs and finish reason of gen ``name`` (for a
        select: every choice's logprobs). A sync point."""
        slot = self._slot(name, SourceLocation.here())
        self._sync(slot)
        return slot.meta()

    def get_obj(self, name: str) -> Any:
        """The value of ``gen(name, json_schema=...)`` as an object (a sync point): an instance of
        the pydantic model it was given, else the parsed JSON, validated against the schema. After
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
        """The whole text so far (a sync point)."""
        self._sync(None)
        return "".join(p.text or "" for p in self._pieces)

    def messages(self) -> list[dict[str, str]]:
        """The chat messages so far, one ``{"role", "content"}`` per role block (a sync point)."""
        self._sync(None)
        out: list[dict[str, str]] = []
        current: dict[str, str] | None = None
        for p in self._pieces:
            if p.kind == "role":
                if p.begin:
                    current = {"role": p.role or "", "content": ""}
                elif current is not None:
                    out.append(current)
                    current = None
            elif current is not None:
                current["content"] += p.text or ""
        if current is not None:
            out.append(current)
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

    def text_iter(self, var: str | None = None) -> Iterator[str]:
        """The text (or one variable's text) as it is produced; a run with ``stream=True`` yields
        it piece by piece as the engine generates, any other run yields it at once. A
        KeyboardInterrupt while it waits for the next piece stops the program (``cancel``)."""
        if self._log is None:
            self._sync(None)
            yield self.text() if var is None else str(self[var])
            return
        got = False
        try:
            for chunk in self._log.iter(var):
                got = True
                yield chunk
        except KeyboardInterrupt:
            self._run.cancel("text_iter() was interrupted")
            raise
        if var is not None and not got:
            self._slot(var, SourceLocation.here())  # a name the program never produced raises

    async def text_async_iter(self, var: str | None = None) -> AsyncIterator[str]:
        """``text_iter`` for ``async for``; never blocks the event loop. Cancelling the task that
        waits for the next piece stops the program (``cancel``)."""
        if self._log is None:
            self._sync(None)
            yield self.text() if var is None else str(self[var])
            return
        got = False
        try:
            async for chunk in self._log.aiter(var):
                got = True
                yield chunk
        except (KeyboardInterrupt, asyncio.CancelledError):
            self._run.cancel("text_async_iter() was cancelled")
            raise
        if var is not None and not got:
            self._slot(var, SourceLocation.here())

    def cancel(self) -> None:
        """Stop the program while it runs (``run(stream=True)``, ``arun``): its engine requests
        are aborted, the gens and selects not done fail, and ``error()`` becomes a
        ``ProgramInterruptedError``. The text produced so far stays readable. Does nothing once
        the program has finished."""
        self._run.cancel(f"program {self._run.program!r} was cancelled")

    def __repr__(self) -> str:
        known = "".join(p.text or "" for p in self._pieces)
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
        return "".join(p.text or "" for p in self._pieces)

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
        known = ", ".join(sorted(k for k in self._vars if not k.startswith("_gen"))) or "none"
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
            return TracedText(name, run.builder.var(run.value(self), name), id(run))
        if isinstance(slot, ValueSlot):
            return slot.value()
        return "{" + name + "}"

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
                    self._received[id(piece)] = self._received.get(id(piece), "") + text
                    self._advance(upto=k)
                    return

    def _on_segment_done(self) -> None:
        if self._log is not None:
            with self._stream_lock:
                self._advance()

    def _advance(self, upto: int | None = None) -> None:
        """Write pieces from the cursor on to the log, as far as their text is known.

        With ``upto`` (a later gen is streaming), an unfilled gen before it whose stream has
        begun is finished (its request moved on to a later step, or a join waited for it) and the
        cursor passes it; any other unfilled piece (a select, or a gen that has streamed nothing)
        holds the cursor, and the later text waits in ``_received`` until that piece's text is
        known, so the log's text is always the state's text in order."""
        assert self._log is not None
        while self._cursor < len(self._pieces):
            piece = self._pieces[self._cursor]
            key = id(piece)
            streamed = self._streamed(piece)
            known = piece.text if piece.text is not None else (streamed or "")
            sent = self._sent.get(key, "")
            if known.startswith(sent) and len(known) > len(sent):
                self._log.emit(piece.name if piece.kind in ("gen", "select") else None, known[len(sent) :])
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


__all__ = ["ProgramState"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_encodable(text: str, program: str, where: SourceLocation | None) -> None:
    """Refuse text no tokenizer can encode (a lone surrogate) where it is appended, with the
    position, rather than as the tokenizer's bare ``TypeError`` when the segment runs."""
    if text.isascii():
        return
    bad = _SURROGATE.search(text)
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
    """``get_obj`` for one generated text: the pydantic instance, or the parsed JSON validated
    against the schema; ``ConstraintViolationError`` otherwise (``where`` names a fork branch)."""
    import json

    from llmir_lang.errors import ConstraintViolationError

    cut = (
        " (generation stopped at max_tokens: raise max_tokens)"
        if meta.get("finish_reason") == "length"
        else ""
    )
    if isinstance(schema, type) and hasattr(schema, "model_validate_json"):
        try:
            return schema.model_validate_json(text)
        except Exception as e:
            raise ConstraintViolationError(
                f"gen({name!r}){where} does not validate as {schema.__name__}{cut}: {e}"
            ) from None
    import jsonschema

    try:
        obj = json.loads(text)
        jsonschema.validate(obj, json.loads(schema) if isinstance(schema, str) else schema)
    except (ValueError, TypeError, jsonschema.ValidationError) as e:
        raise ConstraintViolationError(
            f"gen({name!r}){where} does not validate against its schema{cut}: {e}"
        ) from None
    return obj
