"""``@function``: a Python function ``f(s, ...)`` made into a program with ``run``, ``run_batch``,
``arun``, ``bind``, ``trace`` and ``cache``.

Keyword arguments of ``run`` / ``run_batch`` that are not program parameters are sampling
defaults for every gen that does not set them (``temperature=0.7``, ``max_tokens=64``, and the
engine's names ``max_new_tokens`` / ``min_new_tokens``). ``passes`` picks the optimizer pipeline
(default: ``optimizer.DEFAULT_PIPELINE``; ``""`` runs call by call; a list of pass names is
joined with commas). As in SGLang, a run's state
has the body's return value as ``state.ret_value``.

A program parameter named like a keyword option of ``run`` / ``arun`` / ``run_batch`` / ``trace``
(``stream``, ``backend``, ``passes``, ``num_threads``, ``progress_bar``, ``generator_style``) is a
``ProgramDefinitionError`` where the program is defined: ``f.run(backend=...)`` could not tell the
argument from the option (SGLang's ``run`` takes such a keyword for itself, and the program never
sees it). Rename it; a positional-only parameter (``def f(s, backend, /)``) is never given by
keyword, and is accepted. A parameter named like a sampling default (``temperature``) is the
program's: ``run(temperature=...)`` gives it. A program body is a plain ``def``: an ``async def``
or a generator is a ``ProgramDefinitionError`` (``await f.arun(...)`` is async).

``LMFunction`` is made of this module's running core and two halves of its own: ``run_batch``
(``run_batch.py``) and ``trace`` / ``cache`` (``tracing.py``); ``arun``'s threads are in
``arun.py``, the signature checks in ``program_signature.py``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any

from llmir_lang.dsl.arun import _spawn_on_loop, _stream_on_loop
from llmir_lang.dsl.compose import compose_call, is_not_run
from llmir_lang.dsl.errors import (
    DSLError,
    ProgramArgumentError,
    ProgramDefinitionError,
    ProgramExecutionError,
    ProgramInterruptedError,
    SourceLocation,
    _user_frame,
)
from llmir_lang.dsl.program_signature import (
    _ALIASES,
    _POSITIONAL,
    _VAR_KINDS,
    _check_option_names,
    _check_plain_def,
)
from llmir_lang.dsl.recorder import ProgramRun
from llmir_lang.dsl.run_batch import _BatchRunning
from llmir_lang.dsl.runner import PipelineRunner
from llmir_lang.dsl.runtime import resolve_backend
from llmir_lang.dsl.sampling_args import check_sampling, sampling_default
from llmir_lang.dsl.state import ProgramState
from llmir_lang.dsl.tracing import _Tracing
from llmir_lang.dsl.workers import spawn
from llmir_lang.executor.backend import Backend
from llmir_lang.ir.attrs import SAMPLING_ATTRS
from llmir_lang.optimizer import DEFAULT_PIPELINE
from llmir_lang.optimizer.pass_manager import pipeline_text


class LMFunction(_BatchRunning, _Tracing):
    """A program. Call ``run(...)`` (or the object itself) to run it on a backend.

    ``num_api_spec_tokens`` is SGLang's hint for speculative execution on API models (generate
    that many tokens for several gens of one chat turn in one call). It is kept (as the attribute)
    and has no effect: the embedded engine already runs a turn's gens as one request
    (``fuse-constants``), and the OpenAI backend sends one request per gen."""

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        passes: str | None = None,
        name: str | None = None,
        bound: Mapping[str, Any] | None = None,
        num_api_spec_tokens: int | None = None,
    ) -> None:
        if not callable(func):
            raise ProgramDefinitionError(f"@function decorates a function, got {type(func).__name__}")
        n = num_api_spec_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ProgramDefinitionError(f"num_api_spec_tokens must be an integer >= 0 or None, got {n!r}")
        self.num_api_spec_tokens = n
        code = getattr(func, "__code__", None)
        where = SourceLocation(code.co_filename, code.co_firstlineno) if code is not None else None
        self.name = name or getattr(func, "__name__", "program")
        _check_plain_def(func, self.name, where)
        self.signature = inspect.signature(func)
        params = list(self.signature.parameters.values())
        if not params or params[0].name != "s" or params[0].kind not in _POSITIONAL:
            got = f"{params[0].name!r}" if params else "no parameter"
            raise ProgramDefinitionError(
                f"the first parameter of a program is its state and must be named 's' (got {got}); "
                f"write `def {self.name}(s, ...)`",
                self.name,
                where,
            )
        _check_option_names(params[1:], self.name, where)
        self.func = func
        self.passes = pipeline_text(passes) if passes is not None else None
        self.where = where
        self._params = params[1:]
        # named parameters (what ``bind``, ``trace`` and error messages list); ``*args`` and
        # ``**kwargs`` are not names a caller can pass
        self.arg_names = [p.name for p in params[1:] if p.kind not in _VAR_KINDS]
        self._var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        self.bound = dict(bound or {})
        functools.update_wrapper(self, func)

    def __repr__(self) -> str:
        return f"<llmir program {self.name}({', '.join(['s', *self.arg_names])})>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Inside a program, ``f(s, ...)`` (or ``f(s=s, ...)``) runs ``f``'s body on the state ``s``
        and returns what it returns (composition, see ``compose``); anywhere else it is ``run(...)``."""
        __tracebackhide__ = True
        composed = compose_call(self, args, kwargs)
        return self.run(*args, **kwargs) if is_not_run(composed) else composed

    def bind(self, **kwargs: Any) -> LMFunction:
        """A copy of this program with some arguments fixed."""
        unknown = [k for k in kwargs if k not in self.arg_names and not self._var_kw]
        if unknown:
            raise ProgramArgumentError(
                f"bind(): {unknown} are not parameters of the program (parameters: {self.arg_names})",
                self.name,
            )
        return LMFunction(
            self.func,
            passes=self.passes,
            name=self.name,
            bound={**self.bound, **kwargs},
            num_api_spec_tokens=self.num_api_spec_tokens,
        )

    # --- arguments -----------------------------------------------------------------------
    def _split(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any], partial: bool = False
    ) -> tuple[dict, dict]:
        """(program arguments by name, sampling defaults as IR attributes)."""
        program: dict[str, Any] = {}
        sampling: dict[str, Any] = {}
        given: dict[str, str] = {}  # sampling attribute -> the keyword that gave it
        for key, value in kwargs.items():
            if key in self.arg_names or (self._var_kw and key not in SAMPLING_ATTRS and key not in _ALIASES):
                program[key] = value
            elif _ALIASES.get(key, key) in SAMPLING_ATTRS:
                try:
                    attr, value = sampling_default(key, value, given)
                except DSLError as e:
                    raise ProgramArgumentError(f"sampling defaults: {e.cause_message}", self.name) from None
                if value is not None:
                    sampling[attr] = value
            else:
                raise ProgramArgumentError(
                    f"unknown argument {key!r}: the program's parameters are {self.arg_names} and the "
                    f"sampling defaults are {sorted(SAMPLING_ATTRS)}",
                    self.name,
                )
        try:
            binder = self.signature.bind_partial if partial else self.signature.bind
            bound = binder(None, *args, **{**self.bound, **program})
        except TypeError as e:
            raise ProgramArgumentError(
                f"bad arguments: {e} (parameters: {self.arg_names})", self.name
            ) from None
        if not partial:
            bound.apply_defaults()
        out = dict(bound.arguments)
        out.pop("s", None)
        try:
            check_sampling(sampling, None, "sampling defaults")
        except DSLError as e:
            raise ProgramArgumentError(e.cause_message, self.name) from None
        return out, sampling

    def _call(self, state: ProgramState, arguments: Mapping[str, Any]) -> Any:
        """``func(state, ...)`` with ``arguments`` (by parameter name, as ``_split`` returns them)
        passed the way the signature takes them: ``*args`` spread positionally (with every named
        parameter before it), ``**kwargs`` spread as keywords."""
        __tracebackhide__ = True
        args: list[Any] = [state]
        kwargs: dict[str, Any] = {}
        var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in self._params)
        for p in self._params:
            if p.name not in arguments:
                continue
            value = arguments[p.name]
            if p.kind is inspect.Parameter.VAR_POSITIONAL:
                args.extend(value)
            elif p.kind is inspect.Parameter.VAR_KEYWORD:
                kwargs.update(value)
            elif p.kind is inspect.Parameter.POSITIONAL_ONLY or (
                var_positional and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            ):
                args.append(value)
            else:
                kwargs[p.name] = value
        return self.func(*args, **kwargs)

    def _pipeline(self, passes: str | None) -> str:
        if passes is not None:
            return pipeline_text(passes)
        return self.passes if self.passes is not None else DEFAULT_PIPELINE

    # --- running -------------------------------------------------------------------------
    def _body(
        self,
        run: ProgramRun,
        state: ProgramState,
        arguments: dict[str, Any],
        on_end: Callable[[], None] | None = None,
        raise_base: bool = False,
    ) -> None:
        """Run the program body on ``state``; record any error on ``run``, never raise (but a
        KeyboardInterrupt in the thread that runs it).

        A ``BaseException`` that is not an ``Exception`` (``SystemExit``, a ``KeyboardInterrupt``
        or ``CancelledError`` the body raised itself) is the program's error too, as a
        ``ProgramExecutionError`` whose cause it is: on a background thread (``arun``,
        ``stream=True``, ``run_batch``) it escaped the thread and the run ended as if it had
        succeeded, so an awaiting ``arun`` never woke. ``raise_base`` (``run``, on the caller's
        thread) raises it on as well, as the caller's own.

        With ``on_end`` (``run_batch``) the body's last segment is not waited for: the run ends,
        and ``on_end()`` is called, on the thread that completes that segment; this thread returns
        as soon as the body has (see ``ProgramRun.flush_then``). Else the run has ended on return.
        """
        __tracebackhide__ = True  # IPython and pytest show the user's frames, not these
        run.thread = threading.get_ident()
        detached = False
        try:
            state.ret_value = self._call(state, arguments)
            if on_end is not None:
                detached = run.flush_then(lambda error: self._end_detached(run, error, on_end))
            if not detached:
                run.flush()
        except Exception as e:
            run.error = self._wrap(e)
        except BaseException as e:
            if run.error is None:  # (a cancel that stopped the body has set its own already)
                run.error = (
                    ProgramInterruptedError("the program was interrupted (KeyboardInterrupt)", self.name)
                    if isinstance(e, KeyboardInterrupt)
                    else self._wrap(e)
                )
            if raise_base:
                raise
        finally:
            if not detached:
                self._end_then(run, on_end)

    def _end_detached(self, run: ProgramRun, error: Exception | None, on_end: Callable[[], None]) -> None:
        """The end of a run whose last segment completed after its body returned (``_body``)."""
        try:
            if error is not None:
                run.error = self._wrap(error)
        finally:
            self._end_then(run, on_end)

    def _end_then(self, run: ProgramRun, on_end: Callable[[], None] | None) -> None:
        """``on_end()`` (always: run_batch's other programs wait for this one's slot), then ``_end``:
        in that order, as once the run is finished run_batch may return and close the batch."""
        try:
            if on_end is not None:
                on_end()
        finally:
            self._end(run)

    @staticmethod
    def _end(run: ProgramRun, error: BaseException | None = None) -> None:
        """Finish ``run`` (with ``error``, if given): release its backend, wake its readers."""
        if error is not None:
            run.error = error
        run.abandon()  # what the body recorded after its last sync point never ran
        run.release()
        run.finished.set()
        for st in run.states:
            st._close_stream()

    def _wrap(self, e: BaseException) -> Exception:
        if isinstance(e, DSLError):
            if e.program is not None:
                return e
            out = type(e)(e.cause_message, self.name, e.where)
            out.__cause__ = e.__cause__ or e
            return out
        err = ProgramExecutionError(f"{type(e).__name__}: {e}", self.name, _user_frame(e))
        err.__cause__ = e
        return err

    def run(
        self,
        *args: Any,
        stream: bool = False,
        backend: Backend | None = None,
        passes: str | None = None,
        **kwargs: Any,
    ) -> ProgramState:
        """Run the program and return its final state. With ``stream=True`` the program runs in
        the background and the state streams (``text_iter``); errors are then on ``state.error()``;
        otherwise they are raised. A KeyboardInterrupt while it runs aborts its requests."""
        __tracebackhide__ = True
        run, state, arguments = self._start(args, kwargs, stream, backend, passes)
        if stream:
            self._background(run, state, arguments, "llmir-program")
            return state
        self._body(run, state, arguments, raise_base=True)
        if run.error is not None:
            raise run.error
        return state

    async def arun(
        self,
        *args: Any,
        stream: bool = False,
        backend: Backend | None = None,
        passes: str | None = None,
        **kwargs: Any,
    ) -> ProgramState:
        """``run`` without blocking the event loop. The program runs on a thread of its own, so
        any number of ``arun`` calls run at once and the engine batches their requests (a thread
        pool would cap them at its size). With ``stream=True`` it returns at once and
        ``async for chunk in state.text_async_iter(var)`` streams; the streamed program belongs to
        the event loop it was started on: when that loop's remaining tasks are cancelled (as
        ``asyncio.run`` does once its coroutine returns) the program is cancelled too, instead of
        running on with no loop to stream to. Cancelling the awaiting task stops the program: its
        requests are aborted."""
        __tracebackhide__ = True
        run, state, arguments = self._start(args, kwargs, stream, backend, passes)
        loop = asyncio.get_running_loop()
        if stream:
            _stream_on_loop(self, run, state, arguments, loop)
            return state
        done = _spawn_on_loop(self, run, state, arguments, loop, "llmir-arun")
        try:
            await done
        except BaseException:  # the awaiting task was cancelled, or the loop interrupted
            run.cancel(f"arun() of {self.name!r} was cancelled")
            raise
        if run.error is not None:
            raise run.error
        return state

    def _start(
        self,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        stream: bool,
        backend: Backend | None,
        passes: str | None,
    ) -> tuple[ProgramRun, ProgramState, dict[str, Any]]:
        """The run of one program (not started yet), its root state and its arguments."""
        arguments, defaults = self._split(args, kwargs)
        chosen = resolve_backend(backend, self.name)
        runner = PipelineRunner(chosen, self._pipeline(passes))
        run = ProgramRun(self.name, self.name, chosen, runner, defaults, stream=stream)
        return run, ProgramState(run), arguments

    def _background(self, run: ProgramRun, state: ProgramState, arguments: dict[str, Any], name: str) -> None:
        # pooled: at interpreter exit a program still running is waited for (after the engines
        # have stopped and failed its requests) instead of running on through finalization
        spawn(self._body, run, state, arguments, name=name)

def function(
    func: Callable[..., Any] | None = None,
    num_api_spec_tokens: int | None = None,
    *,
    passes: str | None = None,
    name: str | None = None,
) -> Any:
    """Make ``def f(s, ...)`` a program: ``@function`` or ``@function(passes="...", name=...)``.
    ``num_api_spec_tokens`` (SGLang's) is accepted and has no effect (see ``LMFunction``)."""
    if func is not None:
        return LMFunction(func, passes=passes, name=name, num_api_spec_tokens=num_api_spec_tokens)
    return lambda f: LMFunction(f, passes=passes, name=name, num_api_spec_tokens=num_api_spec_tokens)
