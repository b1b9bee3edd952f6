"""Streaming a ``ProgramState``: ``text_iter`` / ``text_async_iter`` for its readers, and the
stream log that the recorder and the runner fill as pieces, chunks and segments arrive (written
in order, so a stream's chunks always add up to ``text()``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import TYPE_CHECKING

from llmir_lang.dsl.errors import FeatureNotSupportedError, ProgramInterruptedError, SourceLocation
from llmir_lang.dsl.recorder import Piece, ProgramRun
from llmir_lang.dsl.streaming import AsyncStream, StreamLog

if TYPE_CHECKING:
    from llmir_lang.dsl.state import ProgramState


class _StateStreaming:
    """The streaming half of ``ProgramState``. Needs of the state: ``_run``, ``_pieces``, the
    stream's bookkeeping (set up by its ``__init__``), ``text()``, ``s[name]``, ``_sync`` and
    ``_slot``."""

    _run: ProgramRun
    _pieces: list[Piece]
    _log: StreamLog | None
    _stream_lock: threading.Lock
    _cursor: int
    _received: dict[int, str]
    _borrowed: dict[int, ProgramState]
    _sent: dict[int, str]
    _dropped: set[int]
    _joins: dict[int, list[Piece]]

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
