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
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import inspect
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from llmir_lang.dsl.errors import (
    LIBRARY_DIRS,
    DSLError,
    ProgramArgumentError,
    ProgramDefinitionError,
    ProgramExecutionError,
    ProgramInterruptedError,
    SourceLocation,
)
from llmir_lang.dsl.primitives import TracedText, check_sampling
from llmir_lang.dsl.recorder import ProgramRun, chat_roles
from llmir_lang.dsl.runner import BatchRunner, PipelineRunner
from llmir_lang.dsl.runtime import cache_prefix, get_default_backend, resolve_backend
from llmir_lang.dsl.state import ProgramState
from llmir_lang.dsl.workers import Task, interrupts_deferred, spawn
from llmir_lang.executor.backend import Backend
from llmir_lang.ir import Module, verify
from llmir_lang.ir import ops as K
from llmir_lang.ir.attrs import SAMPLING_ATTRS
from llmir_lang.optimizer import DEFAULT_PIPELINE
from llmir_lang.optimizer.canonicalize import canonicalize
from llmir_lang.optimizer.pass_manager import pipeline_text

_ALIASES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
_AUTO_THREADS = 256
_VAR_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_BY_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class LMFunction:
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
        """Inside a program, ``f(s, ...)`` runs ``f``'s body on the state ``s`` (composition);
        anywhere else it is ``run(...)``."""
        __tracebackhide__ = True
        if args and isinstance(args[0], ProgramState):
            return self.func(*args, **{**self.bound, **kwargs})
        return self.run(*args, **kwargs)

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
        for key, value in kwargs.items():
            if key in self.arg_names or (self._var_kw and key not in SAMPLING_ATTRS and key not in _ALIASES):
                program[key] = value
            elif _ALIASES.get(key, key) in SAMPLING_ATTRS:
                if value is not None:
                    sampling[_ALIASES.get(key, key)] = (
                        [value] if key in ("stop", "stop_regex") and isinstance(value, str) else value
                    )
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

    def run_batch(
        self,
        batch_kwargs: Iterable[Mapping[str, Any]],
        *,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        generator_style: bool = False,
        backend: Backend | None = None,
        passes: str | None = None,
        **sampling_defaults: Any,
    ) -> list[ProgramState] | Iterator[ProgramState]:
        """Run the program once per item, optimized and batched together. An item is a dict of
        arguments, or (as in SGLang) a list or tuple of positional values for the parameters
        after ``s``.

        Errors never stop the batch: a failed program's state has ``error()`` set. With
        ``generator_style=True`` the states are yielded in order as each program finishes; closing
        the iterator before its end (``close()``, or dropping it) stops the programs not yielded.
        A KeyboardInterrupt while it waits (a notebook's interrupt) stops the whole batch before
        it is raised: requests in flight are aborted, programs not started never run, and the
        progress bar is closed.
        """
        __tracebackhide__ = True
        if isinstance(batch_kwargs, (Mapping, str, bytes)) or not isinstance(batch_kwargs, Iterable):
            one = (
                "; a single dict is the arguments of one run: call run(**args), or give a list of one, "
                "run_batch([args])"
                if isinstance(batch_kwargs, Mapping)
                else ""
            )
            raise ProgramArgumentError(
                "run_batch takes a list (or another iterable) of runs, each a dict of arguments or a "
                f"list of positional values, got {type(batch_kwargs).__name__}{one}",
                self.name,
            )
        self._check_batch_keywords(sampling_defaults)
        items = list(batch_kwargs)
        prepared = []
        for i, kw in enumerate(items):
            if isinstance(kw, (list, tuple)):
                args, kw = self._positional_item(i, kw)
            elif isinstance(kw, Mapping):
                args = ()
            else:
                raise ProgramArgumentError(
                    f"run_batch item {i} must be a dict of arguments or a list of positional values, "
                    f"got {type(kw).__name__}",
                    self.name,
                )
            try:
                arguments, defaults = self._split(args, {**sampling_defaults, **kw})
            except ProgramArgumentError as e:
                raise ProgramArgumentError(f"run_batch item {i}: {e.cause_message}", self.name) from None
            prepared.append((arguments, defaults))
        chosen = resolve_backend(backend, self.name)
        if not prepared:
            return iter(()) if generator_style else []
        if num_threads == "auto":
            workers = min(len(prepared), _AUTO_THREADS)
        elif isinstance(num_threads, int) and num_threads >= 1:
            workers = min(num_threads, len(prepared))
        else:
            raise ProgramArgumentError(
                f"num_threads must be 'auto' or an integer >= 1, got {num_threads!r}", self.name
            )
        runner = BatchRunner(chosen, self._pipeline(passes), workers)
        runs = [
            ProgramRun(self.name, f"{self.name}.{i}", chosen, runner, d) for i, (_, d) in enumerate(prepared)
        ]
        states = [ProgramState(r) for r in runs]
        work = _BatchWork(
            self, runner, runs, [a for a, _ in prepared], _progress(len(runs)) if progress_bar else None
        )
        threads: list[Task] = []

        def finish() -> None:
            for t in threads:  # the coordinator, then each worker (which has called worker_exit)
                t.join()
            work.close()

        def interrupted(reason: str = "was interrupted") -> None:
            runner.cancel(f"run_batch() of {self.name!r} {reason}")
            finish()

        try:
            # pooled threads: a run_batch reuses the previous one's (see workers.py). An interrupt
            # while they start is raised once all have (and cancels the batch below), not between
            # two starts, which left the started ones running with nobody to cancel them
            with interrupts_deferred():
                threads.append(spawn(runner.serve, name="llmir-batch-coordinator"))
                threads.extend(spawn(work.run, name="llmir-batch") for _ in range(workers))
            if generator_style:
                return _BatchResults(states, finish, interrupted)
            for st in states:
                st._run.finished.wait()
        except BaseException:
            for _ in range(workers - max(0, len(threads) - 1)):  # workers that never started (a
                runner.worker_exit()  # failed thread start): the coordinator must not wait for them
            interrupted()
            raise
        finish()
        return states

    def _check_batch_keywords(self, keywords: Mapping[str, Any]) -> None:
        """Check the keywords given to ``run_batch`` itself (sampling defaults, or program
        arguments common to every item), so an error blames them, not the first item."""
        for key in keywords:
            if key in self.arg_names or _ALIASES.get(key, key) in SAMPLING_ATTRS or self._var_kw:
                continue
            own = [
                p.name
                for p in inspect.signature(LMFunction.run_batch).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY
            ]
            hint = (
                "; run_batch does not stream: generator_style=True yields each state as its program ends"
                if key == "stream"
                else ""
            )
            raise ProgramArgumentError(
                f"run_batch() got an unknown keyword argument {key!r}: it is none of run_batch's own "
                f"({', '.join(own)}), of the program's parameters ({self.arg_names}) or of the sampling "
                f"defaults ({sorted(SAMPLING_ATTRS)}){hint}",
                self.name,
            )
        try:
            self._split((), keywords, partial=True)
        except ProgramArgumentError as e:
            raise ProgramArgumentError(f"run_batch(): {e.cause_message}", self.name) from None

    def _positional_item(self, i: int, values: list | tuple) -> tuple[tuple, dict[str, Any]]:
        """A run_batch item of positional values as (args, kwargs): the values fill the parameters
        after ``s`` that ``bind`` left open, in order; they must fill the required ones and be no
        more than there are (SGLang's rule), said here with the parameter names."""
        named = [p for p in self._params if p.kind in _POSITIONAL and p.name not in self.bound]
        least = sum(1 for p in named if p.default is inspect.Parameter.empty)
        var = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in self._params)
        most = None if var and not self.bound else len(named)  # (after bind: named values only)
        if least <= len(values) and (most is None or len(values) <= most):
            if most is None or not self.bound:  # (in order: positional-only parameters too)
                return tuple(values), {}
            return (), dict(zip((p.name for p in named), values))
        takes = f"at least {least}" if most is None else f"{least}" if most == least else f"{least} to {most}"
        raise ProgramArgumentError(
            f"run_batch item {i} has {len(values)} positional value(s), but the program takes {takes} "
            f"(parameters: {[p.name for p in named]}); give one value per parameter, or a dict",
            self.name,
        )

    # --- SGLang's cache / compile ------------------------------------------------------------
    def cache(self, backend: Backend | None = None) -> str:
        """Compute the KV of the program's constant beginning (its text and roles before the
        first gen, select or argument) into ``backend``'s prefix cache now (default: the default
        backend), as SGLang's ``cache()``; later runs start from it. Returns the text cached (""
        when the program starts with an argument or a gen). A body that cannot be traced with its
        arguments unknown caches nothing, with a warning."""
        chosen = resolve_backend(backend, self.name)
        try:
            module = self._trace((), chosen, {})
        except DSLError as e:
            warnings.warn(
                f"cache(): program {self.name!r} cannot be traced with its arguments unknown, so "
                f"nothing was cached ({e.cause_message}); bind() the arguments it computes with",
                stacklevel=2,
            )
            return ""
        prefix, state = "", None
        for op in canonicalize(module, template=chat_roles(chosen)).functions[0].ops:
            if op.kind == K.START and state is None:
                state = op.result
            elif op.kind == K.TEXT and op.operands == (state,):
                prefix, state = prefix + (op.label or ""), op.result
            else:
                break
        if prefix:
            cache_prefix(chosen, prefix)
        return prefix

    def compile(self, *, backend: Backend | None = None) -> LMFunction:
        """Deprecated in SGLang, and not needed here: every run is traced and optimized whole.
        Warns and returns the program itself, so ``f.compile().run(...)`` still runs."""
        warnings.warn(
            "compile() is deprecated (as in SGLang) and does nothing: llmir_lang optimizes every "
            "run as a whole; call run() / run_batch() directly",
            DeprecationWarning,
            stacklevel=2,
        )
        return self

    # --- tracing -------------------------------------------------------------------------
    def trace(self, *args: Any, backend: Backend | None = None, **kwargs: Any) -> Module:
        """The program's IR without running it. Parameters not given become IR parameters, and
        reading a variable records a ``var`` op (its value in Python is the placeholder
        ``{name}``, so control flow on it follows one path)."""
        return self._trace(args, backend, kwargs)

    def _trace(self, args: tuple[Any, ...], backend: Backend | None, kwargs: Mapping[str, Any]) -> Module:
        arguments, defaults = self._split(args, kwargs, partial=True)
        missing = [
            p for p in self.arg_names
            if p not in arguments and self.signature.parameters[p].default is inspect.Parameter.empty
        ]  # fmt: skip
        chosen = backend if backend is not None else get_default_backend()
        run = ProgramRun(self.name, self.name, chosen, None, defaults, params=missing)
        for p in missing:
            arguments[p] = TracedText(p, run.builder.param(p), id(run))
        for p in self.arg_names:
            default = self.signature.parameters[p].default
            if p not in arguments and default is not inspect.Parameter.empty:
                arguments[p] = default
        state = ProgramState(run)
        run.thread = threading.get_ident()
        try:
            self._call(state, arguments)
        except Exception as e:
            raise self._wrap(e) from e.__cause__
        finally:
            run.finished.set()
        run.value(state)
        live = [st._value for st in run.states if st._value is not None]
        run.builder.ret(*live)
        module = Module((run.builder.build(),))
        verify(module)
        return module


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


# streamed arun() programs' watcher tasks (the loop keeps only weak references to its tasks)
_STREAM_WATCHERS: set[asyncio.Task[None]] = set()


def _stream_on_loop(
    fn: LMFunction, run: ProgramRun, state: ProgramState, arguments: dict[str, Any], loop: asyncio.AbstractEventLoop
) -> None:
    """Start ``arun(stream=True)``'s program on a pooled thread, with a task on ``loop`` that ends
    with it. When that task is cancelled while the program runs (``asyncio.run`` cancels the tasks
    left when its coroutine returns, so do other runners' shutdowns) the program is cancelled:
    without a loop nobody reads its stream, and it would run on to its end unseen."""
    ended = _spawn_on_loop(fn, run, state, arguments, loop, "llmir-program")

    async def watch() -> None:
        try:
            await ended
        except asyncio.CancelledError:
            run.cancel(
                f"arun(stream=True) of {fn.name!r}: the event loop it was started on cancelled its "
                "tasks (asyncio.run() does when its coroutine returns); read the stream to its end "
                "(async for ... in state.text_async_iter()) before then to let the program finish"
            )
            raise

    task = loop.create_task(watch(), name=f"llmir-stream-{fn.name}")
    _STREAM_WATCHERS.add(task)
    task.add_done_callback(_STREAM_WATCHERS.discard)


def _spawn_on_loop(
    fn: LMFunction,
    run: ProgramRun,
    state: ProgramState,
    arguments: dict[str, Any],
    loop: asyncio.AbstractEventLoop,
    name: str,
) -> asyncio.Future[None]:
    """Run the program on a pooled thread (waited for at exit, see workers.py); the future returned,
    of ``loop``, is set when it has ended, whatever the end.

    The program reports to ``loop`` alone: once that loop is closed (``loop.close()`` with the
    ``arun`` still pending, which cancels nothing) its next segment is cancelled instead of run.
    NOTE: a closed loop tells nobody, so the segment running when it closed runs to its end."""
    ended: asyncio.Future[None] = loop.create_future()

    def orphaned() -> str | None:
        if not loop.is_closed():
            return None
        return (
            f"arun() of {fn.name!r}: the event loop it was started on was closed while the program "
            "ran (nothing can receive its result); cancel the task, or await it, before loop.close()"
        )

    run.orphaned = orphaned

    def wake() -> None:
        if not ended.done():
            ended.set_result(None)

    def body() -> None:
        try:
            fn._body(run, state, arguments)
        finally:  # always: an awaiting task that is never woken waits forever
            try:
                loop.call_soon_threadsafe(wake)
            except RuntimeError:  # the loop is closed: nobody awaits this program any more
                pass

    spawn(body, name=name)
    return ended


# the methods that take program arguments by keyword beside keyword options of their own
_OPTION_METHODS = ("run", "arun", "run_batch", "trace")


@functools.cache
def _option_methods() -> dict[str, list[str]]:
    """Option name -> the methods of ``_OPTION_METHODS`` that take it (``backend``: all four)."""
    out: dict[str, list[str]] = {}
    for method in _OPTION_METHODS:
        for p in inspect.signature(getattr(LMFunction, method)).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                out.setdefault(p.name, []).append(f"{method}()")
    return out


def _check_option_names(params: list[inspect.Parameter], name: str, where: SourceLocation | None) -> None:
    """Refuse a parameter that can be given by keyword and is named like an option of ``run`` /
    ``arun`` / ``run_batch`` / ``trace``: ``f.run(backend=x)`` cannot say whose ``x`` it is, and any
    rule that picks one silently drops the value meant for the other (a test of whether the option
    was given cannot see ``run(stream=False)``, its default)."""
    options = _option_methods()
    for p in params:
        methods = options.get(p.name)
        if methods is None or p.kind not in _BY_KEYWORD:
            continue
        takers = methods[0] if len(methods) == 1 else f"{', '.join(methods[:-1])} and {methods[-1]}"
        raise ProgramDefinitionError(
            f"parameter {p.name!r} has the name of the option {p.name}= of {takers}, so a call such as "
            f"`{name}.{methods[0][:-2]}(..., {p.name}=...)` cannot tell the program's argument from the "
            f"option (SGLang's run() takes such a keyword for itself too); rename the parameter "
            f"(e.g. {p.name}_)",
            name,
            where,
        )


def _check_plain_def(func: Callable[..., Any], name: str, where: SourceLocation | None) -> None:
    """Refuse an ``async def`` or generator body: calling it only makes a coroutine or generator
    object, so the body would never run (the state would stay empty, with a "never awaited"
    warning at exit)."""
    if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        kind = "an async generator" if inspect.isasyncgenfunction(func) else "an async def"
        raise ProgramDefinitionError(
            f"a program body must be a plain def, not {kind}: calling one runs none of its code, "
            f"so the program would do nothing; write `def {name}(s, ...)` (gens need no await) and, to "
            f"run it without blocking an event loop, call `await {name}.arun(...)`",
            name,
            where,
        )
    if inspect.isgeneratorfunction(func):
        raise ProgramDefinitionError(
            "a program body must be a plain def, not a generator function (it contains yield): "
            f"calling one runs none of its code, so the program would do nothing; remove the yield from "
            f"`def {name}(s, ...)` (to stream text as it is generated, call "
            f"`{name}.run(..., stream=True)` and iterate `state.text_iter()`)",
            name,
            where,
        )


def _user_frame(e: BaseException) -> SourceLocation | None:
    """The user's line that raised: the innermost traceback frame that is neither llmir_lang's
    nor a library's (the standard library, site-packages), so an error raised inside httpx or
    json under the user's ``s["x"]`` or ``json.loads(...)`` names that line. None when no such
    frame is on the traceback (the error came from running what the body recorded, after it
    returned): a library's file and line would only mislead."""
    tb, found = e.__traceback__, None
    while tb is not None:
        path = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if not path.startswith(_PACKAGE) and not path.startswith(LIBRARY_DIRS):
            found = SourceLocation(path, tb.tb_lineno)
        tb = tb.tb_next
    return found


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class _BatchWork:
    """The programs of one ``run_batch``, as its worker threads take them in order (``run``).

    ``close`` (once every worker has exited) closes the progress bar and drops the runner: a
    failed program's error keeps its worker's frame alive (its traceback links to it), and must
    not keep the backend alive through it. So the workers read ``self.runner`` and never hold it
    in a local variable."""

    def __init__(
        self,
        program: LMFunction,
        runner: BatchRunner,
        runs: list[ProgramRun],
        arguments: list[dict[str, Any]],
        bar: Any,
    ) -> None:
        self.program = program
        self.runner: BatchRunner | None = runner
        # a finished program's entries are dropped (``run``): its state is the caller's alone
        self.runs: list[ProgramRun | None] = list(runs)
        self.arguments: list[dict[str, Any] | None] = list(arguments)
        self.bar = bar
        self._taken = 0  # programs taken by a worker, in input order
        self._lock = threading.Lock()

    def run(self) -> None:
        """One worker: run programs until none is left (skip them once the batch is cancelled)."""
        assert self.runner is not None
        try:
            while True:
                with self._lock:
                    if self._taken == len(self.runs):
                        return
                # a slot first, then the next program: programs start in input order
                self.runner.begin_program()
                with self._lock:
                    i = self._taken if self._taken < len(self.runs) else None
                    self._taken += i is not None
                if i is None:
                    self.runner.end_program()
                    return
                run, arguments = self.runs[i], self.arguments[i]
                assert run is not None and arguments is not None
                self.runs[i] = self.arguments[i] = None
                if self.runner.cancelled is not None:  # interrupted: what has not started never runs
                    self.program._end(run, self.program._wrap(ProgramInterruptedError(self.runner.cancelled)))
                    self.runner.end_program()
                    continue
                # each body in a fresh contextvars context, as on a thread of its own
                contextvars.Context().run(self.program._body, run, run.states[0], arguments, self._program_done)
        finally:
            self.runner.worker_exit()

    def _program_done(self) -> None:
        """A program has ended (on its worker, or on the round's thread that completed its last
        segment): one step of the progress bar, unless the batch was cancelled."""
        runner, bar = self.runner, self.bar
        if runner is None:  # the batch was closed already (its end came from a foreign thread)
            return
        try:
            if bar is not None and runner.cancelled is None:
                bar.update(1)
        finally:
            runner.end_program()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.runner = self.bar = None


class _BatchResults(Iterator[ProgramState]):
    """What ``run_batch(..., generator_style=True)`` returns: the states in input order, each as
    soon as its program has finished.

    It keeps no state it has yielded (a consumer that drops them keeps memory flat), and closing
    it before the end (``close()``, or dropping it: a ``for`` loop left with ``break`` over
    ``run_batch(...)`` itself) stops the programs not yielded yet, as an interrupt does: nobody
    can read their states any more, so they must not keep the engine busy."""

    def __init__(
        self,
        states: list[ProgramState],
        finish: Callable[[], None],
        interrupted: Callable[..., None],
    ) -> None:
        self._states = collections.deque(states)
        self._finish: Callable[[], None] | None = finish
        self._interrupted = interrupted

    def __next__(self) -> ProgramState:
        if not self._states:
            self._end(None)
            raise StopIteration
        try:
            self._states[0]._run.finished.wait()
        except BaseException:
            self._end("was interrupted")
            raise
        st = self._states.popleft()
        if not self._states:
            self._end(None)
        return st

    def close(self) -> None:
        """Stop the programs whose states were not yielded yet and wait for the batch's threads."""
        self._end("was closed before all its results were read")

    def _end(self, reason: str | None) -> None:
        finish, self._finish = self._finish, None
        if finish is None:
            return
        self._states.clear()
        if reason is None:
            finish()
        else:
            self._interrupted(reason)

    def __del__(self) -> None:
        if self._finish is not None:
            if sys.is_finalizing():
                # dropped with the module at interpreter exit: the exit hooks have stopped the
                # engines and waited for the batch's threads already, and a thread started now
                # never runs (its start waited forever: a script that left the loop hung at exit)
                return
            # NOTE: not here: the cancel and the joins take the runner's locks, and garbage
            # collection may run this in any thread, one of the batch's own included
            try:
                threading.Thread(target=self.close, daemon=True, name="llmir-batch-close").start()
            except RuntimeError:  # the interpreter is shutting down
                pass


def _progress(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a missing bar must not stop a batch
        return None
    return tqdm(total=total)
