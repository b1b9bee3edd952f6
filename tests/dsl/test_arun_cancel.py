"""``await f.arun(...)`` in asyncio services: every way the awaiting task ends early stops the
program (its engine requests aborted, none of its later segments run) and raises
``CancelledError`` as asyncio expects, and the other programs on the runtime go on untouched.

Two leftovers these tests hold fixed:

- ``loop.close()`` with an ``arun`` still pending (nothing is cancelled) left its program running
  every segment to its end, for a result nobody could receive: it now stops at its next segment.
- A task reading ``text_async_iter()`` cancelled while it handled a chunk (a web handler writing
  to a client that went away, a timeout around the loop) left the program generating to its end:
  only a cancel that landed while the reader waited for the next chunk stopped it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

import llmir_lang as llmir

LONG = 1500  # tokens: far longer than any test waits, so a gen that ends early was aborted


@llmir.function
def long_then_more(s, seen):
    seen.append(s)
    s += "Q: tell me a story\nA:" + llmir.gen("a", max_tokens=LONG, ignore_eos=True)
    s["a"]  # a sync point: "b" is a later segment
    s += "\nMore:" + llmir.gen("b", max_tokens=4)


@llmir.function
def short(s, q):
    s += "Q: " + q + "\nA:" + llmir.gen("a", max_tokens=8, ignore_eos=True)


def _live(rt) -> list[int]:
    engine = rt.engine
    return engine.call_in_engine_thread(lambda: [r.rid for r in engine.scheduler.all_requests()])


async def _until_generating(rt) -> None:
    while not _live(rt):
        await asyncio.sleep(0.005)


def _assert_stopped(rt, seen: list) -> None:
    """The program captured in ``seen`` was stopped in its first segment: its gen was aborted
    (the engine holds no request of it) and its second segment never ran."""
    (state,) = seen
    assert state._run.finished.wait(30), "the cancelled program never ended"
    assert isinstance(state.error(), llmir.ProgramInterruptedError), state.error()
    assert state._run.segments_run == 1  # the first, stopped; the second never ran
    with pytest.raises(llmir.ProgramInterruptedError):
        state["b"]
    assert _live(rt) == []  # a gen of LONG tokens still running would be there


@pytest.mark.parametrize("how", ["cancel", "wait_for", "task_group", "asyncio_run_shutdown"])
def test_an_ended_awaiting_task_stops_its_program_and_spares_the_others(rt, how):
    seen: list = []

    async def main():
        other = asyncio.create_task(short.arun("What is 1 + 1?", backend=rt))
        if how == "cancel":
            task = asyncio.create_task(long_then_more.arun(seen, backend=rt))
            await _until_generating(rt)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        elif how == "wait_for":
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(long_then_more.arun(seen, backend=rt), 0.2)
        elif how == "task_group":
            if not hasattr(asyncio, "TaskGroup"):
                pytest.skip("asyncio.TaskGroup is Python 3.11+")

            async def fail():
                await _until_generating(rt)
                raise ValueError("a sibling failed")

            with pytest.raises(BaseException) as info:  # an ExceptionGroup (3.11+)
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(long_then_more.arun(seen, backend=rt))
                    tg.create_task(fail())
            assert [type(e) for e in info.value.exceptions] == [ValueError]
        else:  # asyncio.run cancels the task left pending when main() returns
            asyncio.create_task(long_then_more.arun(seen, backend=rt))
            await _until_generating(rt)
        return await other

    state = asyncio.run(main())
    assert state.error() is None and state.get_meta_info("a")["completion_tokens"] == 8
    _assert_stopped(rt, seen)


@llmir.function
def paused(s, hold):
    hold["state"] = s
    s += "Q:" + llmir.gen("a", max_tokens=2)
    s["a"]
    hold["reached"].set()
    hold["go"].wait(30)  # a tool call, during which the loop is closed
    s += " R:" + llmir.gen("b", max_tokens=2)


def test_a_closed_event_loop_stops_its_pending_arun_at_the_next_segment(fake):
    """``loop.close()`` cancels nothing and tells nobody: the program notices when it next needs
    the engine, and stops there instead of running on for a result nobody can receive."""
    hold = {"reached": threading.Event(), "go": threading.Event()}
    loop = asyncio.new_event_loop()
    task = loop.create_task(paused.arun(hold, backend=fake))
    loop.run_until_complete(loop.run_in_executor(None, hold["reached"].wait, 30))
    loop.close()
    hold["go"].set()
    state = hold["state"]
    assert state._run.finished.wait(30)
    assert isinstance(state.error(), llmir.ProgramInterruptedError), state.error()
    assert "event loop" in str(state.error()) and "closed" in str(state.error())
    assert len(fake.gen_requests) == 1  # "b" never went to the backend
    assert state.text() == "Q:" + state["a"] + " R:"  # the text before the gen that never ran
    task._log_destroy_pending = False  # pending with its loop closed, as the test meant


def test_a_closed_event_loop_does_not_touch_other_programs(fake):
    hold = {"reached": threading.Event(), "go": threading.Event()}
    loop = asyncio.new_event_loop()
    task = loop.create_task(paused.arun(hold, backend=fake))
    loop.run_until_complete(loop.run_in_executor(None, hold["reached"].wait, 30))
    loop.close()
    states = short.run_batch([{"q": "x"}, {"q": "y"}], backend=fake)
    hold["go"].set()
    assert hold["state"]._run.finished.wait(30)
    assert [st.error() for st in states] == [None, None] and all(st["a"] for st in states)
    task._log_destroy_pending = False


async def _read_and_hang(state, how: str, in_body: asyncio.Event) -> None:
    """Read the stream and stall in the loop's body at the first chunk (a handler writing to a
    slow client), so that a cancel lands there and not in the iterator's wait. The handler streams
    directly, through an async generator of its own (a web framework's body), or from an iterator
    it keeps in a variable, closed by ``aclosing``."""
    if how == "aclosing":
        async with contextlib.aclosing(state.text_async_iter("a")) as it:
            async for _ in it:
                in_body.set()
                await asyncio.Event().wait()
        return
    async for _ in _relay(state.text_async_iter("a")) if how == "wrapped" else state.text_async_iter("a"):
        in_body.set()
        await asyncio.Event().wait()


async def _relay(chunks):
    async for chunk in chunks:
        yield chunk


@llmir.function
def long_gen(s):
    s += "Q: tell me a story\nA:" + llmir.gen("a", max_tokens=LONG, ignore_eos=True)


@pytest.mark.parametrize("how", ["cancel", "wrapped", "timeout", "aclosing"])
def test_a_reader_cancelled_in_the_loop_body_stops_the_program(rt, how):
    async def main():
        state = await long_gen.arun(backend=rt, stream=True)
        in_body = asyncio.Event()
        if how in ("timeout", "aclosing"):
            if not hasattr(asyncio, "timeout"):
                pytest.skip("asyncio.timeout is Python 3.11+")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await _read_and_hang(state, how, in_body)
            assert in_body.is_set()
        else:
            task = asyncio.create_task(_read_and_hang(state, how, in_body))
            await in_body.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.to_thread(state._run.finished.wait, 30)
        return state

    state = asyncio.run(main())
    assert isinstance(state.error(), llmir.ProgramInterruptedError), state.error()
    assert "text_async_iter" in str(state.error())
    assert len(state.text()) < len("Q: tell me a story\nA:") + LONG  # stopped, not run to its end
    assert _live(rt) == []


def test_a_reader_that_breaks_leaves_the_program_running(fake):
    """``break`` (or one ``anext``) is not a cancel: the state stays readable, so the program
    runs on to its end; ``state.cancel()`` stops it."""

    @llmir.function
    def two(s):
        s += "x" + llmir.gen("a", max_tokens=3)
        s += " y" + llmir.gen("b", max_tokens=3)

    async def main():
        state = await two.arun(backend=fake, stream=True)
        async for _ in state.text_async_iter():
            break
        first = await anext_(state.text_async_iter())
        await asyncio.to_thread(state._run.finished.wait, 30)
        return state, first

    state, first = asyncio.run(main())
    assert state.error() is None and state["b"] and state.text().startswith(first)


async def anext_(it):
    return await it.__anext__()
