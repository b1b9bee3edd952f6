"""``run_batch``: a program run once per item, all of them optimized and batched together by a
``BatchRunner``, on pooled worker threads that take the programs in input order
(``_BatchWork``); with ``generator_style=True`` the states come as each program ends
(``_BatchResults``)."""

from __future__ import annotations

import collections
import contextvars
import inspect
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from llmir_lang.dsl.errors import ProgramArgumentError, ProgramInterruptedError
from llmir_lang.dsl.program_signature import _ALIASES, _POSITIONAL
from llmir_lang.dsl.recorder import ProgramRun
from llmir_lang.dsl.runner import BatchRunner
from llmir_lang.dsl.runtime import resolve_backend
from llmir_lang.dsl.state import ProgramState
from llmir_lang.dsl.workers import Task, interrupts_deferred, spawn
from llmir_lang.executor.backend import Backend
from llmir_lang.ir.attrs import SAMPLING_ATTRS

if TYPE_CHECKING:
    from llmir_lang.dsl.function import LMFunction

_AUTO_THREADS = 256


class _BatchRunning:
    """``LMFunction.run_batch``. Needs of the program: ``name``, ``arg_names``, ``bound``,
    ``_params``, ``_var_kw``, ``_split``, ``_pipeline``, and what ``_BatchWork`` runs a body with
    (``_body``, ``_end``, ``_wrap``)."""

    name: str
    arg_names: list[str]
    bound: dict[str, Any]
    _params: list[inspect.Parameter]
    _var_kw: bool
    _split: Callable[..., tuple[dict, dict]]
    _pipeline: Callable[[str | None], str]

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
                arguments, defaults = self._split(args, self._item_keywords(sampling_defaults, kw))
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
                for p in inspect.signature(_BatchRunning.run_batch).parameters.values()
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

    def _item_keywords(self, common: Mapping[str, Any], item: Mapping[str, Any]) -> dict[str, Any]:
        """An item's keywords over those given to ``run_batch`` itself: an item's sampling default
        replaces the common one also when spelled the other way (``max_tokens`` for a common
        ``max_new_tokens``), instead of the two meeting as both names of one default."""
        own = {_ALIASES.get(k, k) for k in item if k not in self.arg_names}
        merged = {
            k: v
            for k, v in common.items()
            if k in item or k in self.arg_names or _ALIASES.get(k, k) not in own
        }
        merged.update(item)
        return merged

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
