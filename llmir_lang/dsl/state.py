"""``ProgramState``: the ``s`` a program appends to, reads variables from, and forks.

Appending (``s += ...``) records; reading (``s["x"]``, ``s.text()``, ``s.messages()``,
``s.get_meta_info``) is a sync point inside the program body (the recorded segment runs first)
and, outside it, waits for the program to finish (a streamed run). See ``recorder`` for the
segment model and ``fork`` for fork groups. Appending lives in ``state_append``, streaming in
``state_stream`` (the two halves ``ProgramState`` is made of besides reading and forking).
"""

from __future__ import annotations

import contextlib
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any

from llmir_lang.dsl.errors import (
    DSLError,
    FeatureNotSupportedError,
    ForkError,
    ProgramExecutionError,
    ProgramInterruptedError,
    SourceLocation,
    UnknownVariableError,
    VariableRedefinedError,
)
from llmir_lang.dsl.gen_objects import _parse_obj
from llmir_lang.dsl.primitives import is_anonymous
from llmir_lang.dsl.recorder import Piece, ProgramRun
from llmir_lang.dsl.state_append import _StateAppending
from llmir_lang.dsl.state_stream import _StateStreaming
from llmir_lang.dsl.streaming import StreamLog
from llmir_lang.dsl.traced_text import TracedText, _TracedMeta
from llmir_lang.dsl.vars import GatherSlot, PieceSlot, RangeSlot, Slot, ValueSlot, _ReplacedSlot
from llmir_lang.errors import LLMIRError
from llmir_lang.ir import Value
from llmir_lang.ir.reasoning import REASONING_SUFFIX

if TYPE_CHECKING:
    from llmir_lang.dsl.fork import ForkGroup


class ProgramState(_StateAppending, _StateStreaming):
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
        if name in self._run.unseparated:
            raise UnknownVariableError(
                f"variable {name!r} is not defined: this run is streamed, and separate_reasoning does "
                "nothing in a streamed run (as in SGLang: the stream has shown the whole output), so "
                f"{name.removesuffix(REASONING_SUFFIX)!r} holds the whole output; run without stream=True "
                f"to split it (known variables: {known})",
                self._run.program,
                where,
            )
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


__all__ = ["ProgramState", "StateCopy"]
