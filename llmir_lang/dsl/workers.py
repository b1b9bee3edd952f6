"""Daemon threads kept between batches: ``spawn(fn)`` runs ``fn`` on an idle one, or a new one.

``run_batch`` runs every program body on a thread of its own (a body blocks where it reads a
generated value) plus a coordinator and a thread per round. Starting a thread costs little by
itself, but ``Thread.start`` waits until the new thread has run, so under a busy GIL each start
cost 0.2-0.3 ms on the 2-core benchmark machine: 17-21 ms of the 64-program select batch's first
20 ms, all before its first forward. A parked worker is woken by a queue put, which does not wait.

A worker that finishes goes back to the idle list (at most ``MAX_IDLE`` are kept; more exit) and
exits after ``IDLE_S`` seconds without work. Each task runs in a fresh ``contextvars`` context, as
on a new thread (a ``ContextVar`` set by one batch's program is not seen by the next). A forked
child process starts with no idle worker (the parent's threads do not exist there), and at
interpreter exit every worker ends: a parked one at once, a busy one after its task (waited for
up to ``EXIT_WAIT_S``), so none is still dropping a finished program's objects (an engine's
tensors among them) while the interpreter finalizes, which aborted the process ("terminate
called without an active exception": a daemon thread that takes the GIL then is ended by
``pthread_exit``, whose unwinding through torch's C++ frames calls ``std::terminate``). The names of
the threads say what they run, as before (``llmir-batch``, ``llmir-round``, ...), and a parked one
is ``llmir-idle-worker``.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

MAX_IDLE = 256
IDLE_S = 60.0
EXIT_WAIT_S = 5.0  # at interpreter exit: how long busy workers are waited for, in all
IDLE_NAME = "llmir-idle-worker"  # a parked worker's thread name (a running one has its task's)


class Task:
    """One ``spawn``: ``join()`` waits until its function has returned (or raised)."""

    __slots__ = ("fn", "args", "name", "_done")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
        self.fn, self.args, self.name = fn, args, name
        self._done = threading.Event()

    def join(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def done(self) -> bool:
        return self._done.is_set()


class _Worker:
    __slots__ = ("inbox", "thread")

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, daemon=True, name=IDLE_NAME)

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            with _lock:
                _all.discard(self)

    def _serve(self) -> None:
        while True:
            try:
                task = self.inbox.get(timeout=IDLE_S)
            except queue.Empty:
                if _retire(self):
                    return
                continue  # taken by spawn just now: its task is on the way
            if task is None:  # the interpreter is exiting (_stop_idle)
                return
            self.thread.name = task.name
            try:
                contextvars.Context().run(task.fn, *task.args)
            except BaseException as e:  # reported as an escaped exception of a thread is
                threading.excepthook(threading.ExceptHookArgs([type(e), e, e.__traceback__, self.thread]))
            finally:
                task.fn = task.args = None  # type: ignore[assignment]  # drop references now
                self.thread.name = IDLE_NAME
                task._done.set()
            if not _park(self):
                return


_lock = threading.Lock()
_idle: list[_Worker] = []
_all: set[_Worker] = set()  # every live worker, parked or busy
_exiting = False  # set at interpreter exit: a worker that finishes its task ends, not parks


def _park(worker: _Worker) -> bool:
    with _lock:
        if _exiting or len(_idle) >= MAX_IDLE:
            return False
        _idle.append(worker)
        return True


def _retire(worker: _Worker) -> bool:
    """An idle worker's timeout: leave the idle list and exit (False if spawn took it meanwhile)."""
    with _lock:
        if worker in _idle:
            _idle.remove(worker)
            return True
        return False


@atexit.register
def _stop_idle() -> None:
    """At interpreter exit, end every worker: the parked ones now, the busy ones once their task
    returns (together waited for at most ``EXIT_WAIT_S``). A daemon thread still running while
    the interpreter finalizes can abort the process (see the module's docstring, and
    ``engine._shutdown_live_engines``)."""
    global _exiting
    # the engines first, whichever exit hook was registered first: a program waiting on one (a
    # streamed run nobody read to the end) gets its requests failed now and can end in the wait
    # below, not after it, while native libraries are torn down
    engine = sys.modules.get("llmir_lang.executor.engine")
    if engine is not None:
        engine._shutdown_live_engines()
    with _lock:
        _exiting = True
        idle, _idle[:] = list(_idle), []
        workers = list(_all)
    for worker in idle:
        worker.inbox.put(None)
    deadline = time.monotonic() + EXIT_WAIT_S
    for worker in workers:
        if worker.thread is not threading.current_thread():
            worker.thread.join(timeout=max(0.0, deadline - time.monotonic()))


def _after_fork_in_child() -> None:
    global _lock, _idle, _all, _exiting
    _lock, _idle, _all, _exiting = threading.Lock(), [], set(), False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def spawn(fn: Callable[..., Any], *args: Any, name: str = "llmir-worker") -> Task:
    """Run ``fn(*args)`` on a pooled daemon thread now; the returned task's ``join`` waits for it.
    An exception that escapes ``fn`` goes to ``threading.excepthook``, as a thread's would."""
    task = Task(fn, args, name)
    with _lock:
        worker = _idle.pop() if _idle else None
    if worker is None:
        worker = _Worker()
        with _lock:
            _all.add(worker)
        worker.inbox.put(task)
        worker.thread.start()
    else:
        worker.inbox.put(task)
    return task


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """In the main thread: a SIGINT (Ctrl-C, a notebook's interrupt) that arrives inside the block
    is delivered again as it leaves it, so a KeyboardInterrupt cannot land halfway through work that
    must be whole, such as starting a batch's threads (the coordinator would wait for workers never
    started, and the started ones would run on with nobody to cancel them). Elsewhere (another
    thread, or a process whose SIGINT handler is not Python's to set) it changes nothing."""
    # another thread, or a handler not installed from Python (None: it could not be put back)
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    pending: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    except (ValueError, OSError):  # signals unavailable here (an embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:  # to the handler that was there, which raises KeyboardInterrupt as it would have
            signal.raise_signal(signal.SIGINT)
