"""``arun``'s programs on pooled threads, each tied to the event loop that started it: the loop
is told when the program ends, a closed loop stops it at its next segment, and a streamed
program is cancelled with the loop's remaining tasks."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from llmir_lang.dsl.recorder import ProgramRun
from llmir_lang.dsl.state import ProgramState
from llmir_lang.dsl.workers import spawn

if TYPE_CHECKING:
    from llmir_lang.dsl.function import LMFunction

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
