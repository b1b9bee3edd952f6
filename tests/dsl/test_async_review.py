"""The async API used the way a web service uses it: many ``arun`` calls at once, timeouts,
cancelled readers, failing programs next to good ones, and long runs of sequential calls.

Two defects these tests hold fixed:

- A program body that raised a ``BaseException`` that is not an ``Exception`` (``SystemExit``,
  a ``KeyboardInterrupt`` or ``CancelledError`` raised by the user's code, a custom one) made
  ``await f.arun(...)`` hang forever: the exception escaped the pooled thread before it woke the
  awaiting task, and the run ended as if it had succeeded, so ``arun(stream=True)`` and
  ``run_batch`` reported ``error() is None`` and a stream that ended in silence.
- ``repr(state)`` of a stopped streamed program left out what the stopped gen had streamed, which
  ``state.text()`` keeps: a cancelled stream's repr showed only the prompt.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fake_backend import FakeBackend

import llmir_lang as llmir


class _Custom(BaseException):
    pass


@llmir.function
def qa(s, q):
    s += "Q: " + q + "\nA:" + llmir.gen("a", max_tokens=6)
    s += "\nB:" + llmir.gen("b", max_tokens=6)


@llmir.function
def raises_base(s, kind):
    s += "x" + llmir.gen("a", max_tokens=3)
    s["a"]  # a sync point: the body runs on after a segment
    if kind == "custom":
        raise _Custom("custom base exception")
    if kind == "exit":
        raise SystemExit(3)
    raise asyncio.CancelledError()


@llmir.function
def fails(s):
    s += "x" + llmir.gen("a", max_tokens=3)
    raise ValueError("failed on purpose " + s["a"])


@llmir.function
def long_gen(s):
    s += "Q: tell me a story\nA:" + llmir.gen("a", max_tokens=400, ignore_eos=True)


@pytest.fixture()
def slow():
    backend = FakeBackend(delay=0.05, workers=64)
    yield backend
    backend.pool.shutdown(wait=True)


@pytest.mark.parametrize("kind", ["custom", "exit", "cancelled"])
def test_arun_of_a_body_raising_a_base_exception_raises_instead_of_hanging(fake, kind):
    async def main():
        return await asyncio.wait_for(raises_base.arun(kind, backend=fake), 10)

    with pytest.raises(llmir.ProgramExecutionError) as info:
        asyncio.run(main())  # before the fix: hung, wait_for's TimeoutError after 10 s
    assert not isinstance(info.value.__cause__, Exception)
    assert "raises_base" in str(info.value)


def test_stream_of_a_body_raising_a_base_exception_fails(fake):
    async def main():
        state = await raises_base.arun("custom", backend=fake, stream=True)
        chunks = []
        with pytest.raises(llmir.ProgramExecutionError, match="custom base exception"):
            async for chunk in state.text_async_iter():
                chunks.append(chunk)
        return state, chunks

    state, chunks = asyncio.run(main())
    assert isinstance(state.error(), llmir.ProgramExecutionError)  # was None: "succeeded"
    assert isinstance(state.error().__cause__, _Custom)
    assert "".join(chunks) == state.text()


def test_batch_reports_a_base_exception_on_its_program(fake):
    states = raises_base.run_batch([{"kind": k} for k in ("custom", "exit")] + [{"kind": "custom"}], backend=fake,
                                   num_threads=1)  # fmt: skip
    assert all(isinstance(st.error(), llmir.ProgramExecutionError) for st in states)


def test_sync_run_still_raises_the_base_exception_itself(fake):
    with pytest.raises(_Custom):
        raises_base.run("custom", backend=fake)


def test_gather_of_50_aruns_with_one_failing_and_timeouts(slow):
    stuck = FakeBackend(delay=2.0)  # the timed-out ones: surely still running at their timeout

    async def one(i):
        if i == 7:
            return await fails.arun(backend=slow)
        if i % 10 == 3:
            return await asyncio.wait_for(qa.arun(str(i), backend=stuck), 0.05)
        return await asyncio.wait_for(qa.arun(str(i), backend=slow), 30)

    async def main():
        return await asyncio.gather(*[one(i) for i in range(50)], return_exceptions=True)

    res = asyncio.run(main())
    assert isinstance(res[7], llmir.ProgramExecutionError)
    assert all(isinstance(res[i], asyncio.TimeoutError) for i in range(3, 50, 10)), [res[i] for i in range(3, 50, 10)]
    ok = [r for i, r in enumerate(res) if i != 7 and i % 10 != 3]
    assert len(ok) == 44 and all(r.error() is None and r["b"] for r in ok)
    assert slow.max_in_flight >= 5  # the programs' requests were on the backend together
    stuck.pool.shutdown(wait=True)
    assert len(stuck.requests) <= 5  # the timed-out programs sent nothing after their first gen


def test_many_streams_one_failing_do_not_disturb_the_others(slow):
    async def main():
        states = [await (fails if i == 4 else qa).arun(*([] if i == 4 else [str(i)]), backend=slow, stream=True)
                  for i in range(20)]  # fmt: skip

        async def read(st):
            return "".join([c async for c in st.text_async_iter()])

        return states, await asyncio.gather(*[read(st) for st in states], return_exceptions=True)

    states, res = asyncio.run(main())
    assert isinstance(res[4], llmir.ProgramExecutionError)
    assert all(res[i] == states[i].text() and states[i].error() is None for i in range(20) if i != 4)


def test_sequential_aruns_do_not_pile_up_threads(fake):
    async def main():
        for i in range(20):  # warm the pool
            await qa.arun(str(i), backend=fake)
        before = threading.active_count()
        for i in range(300):
            await qa.arun(str(i), backend=fake)
            if i % 3 == 0:
                st = await qa.arun(str(i), backend=fake, stream=True)
                async for _ in st.text_async_iter("a"):
                    pass
        return before

    before = asyncio.run(main())
    time.sleep(0.1)
    assert threading.active_count() <= before + 2


def test_arun_bad_arguments_raise_a_clear_error_when_awaited(fake):
    async def main():
        with pytest.raises(llmir.ProgramArgumentError, match="missing a required argument: 'q'"):
            await qa.arun(backend=fake)
        with pytest.raises(llmir.ProgramArgumentError, match="unknown argument 'qq'"):
            await qa.arun(qq="x", backend=fake)
        with pytest.raises(TypeError, match="backend must be a Backend"):
            await qa.arun("x", backend=5)

    asyncio.run(main())


def test_cancelled_stream_repr_shows_what_was_streamed(rt):
    async def main():
        state = await long_gen.arun(backend=rt, stream=True)
        got = []

        async def reader():
            async for chunk in state.text_async_iter("a"):
                got.append(chunk)

        task = asyncio.create_task(reader())
        while len("".join(got)) < 30:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return state

    state = asyncio.run(main())
    state._run.finished.wait(10)
    assert isinstance(state.error(), llmir.ProgramInterruptedError)
    text = state.text()
    assert len(text) > len("Q: tell me a story\nA:") + 20
    assert repr(state) == f"ProgramState({text[-60:]!r}, failed: ProgramInterruptedError)"


def test_wait_for_timeout_aborts_engine_requests_and_engine_stays_usable(rt):
    engine = rt.engine

    def live():
        return engine.call_in_engine_thread(lambda: [r.rid for r in engine.scheduler.all_requests()])

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(long_gen.arun(backend=rt), timeout=0.1)
        deadline = time.monotonic() + 10
        while live():
            assert time.monotonic() < deadline, "the timed-out program's request was not aborted"
            await asyncio.sleep(0.01)
        return await qa.arun("What is 1 + 1?", backend=rt, max_tokens=2)

    state = asyncio.run(main())
    assert state.error() is None and state.get_meta_info("b")["completion_tokens"] >= 1


def test_text_async_iter_is_woken_by_the_writer_not_by_polling(monkeypatch):
    """A reader waiting for the next chunk awaits a future the writer resolves: before, it slept
    20 ms at a time (chunks up to 20 ms late; idle streams woke their loop 50 times a second)."""
    from llmir_lang.dsl.streaming import StreamLog

    log = StreamLog()

    async def no_sleep(*args, **kwargs):
        raise AssertionError("text_async_iter polled with asyncio.sleep")

    async def main():
        got = []

        async def reader():
            async for chunk in log.aiter():
                got.append(chunk)

        task = asyncio.create_task(reader())
        monkeypatch.setattr(asyncio, "sleep", no_sleep)
        for _ in range(50):  # let the reader reach its wait
            await _yield()
        assert len(log._waiters) == 1
        threading.Thread(target=lambda: (log.emit(("a",), "one"), log.emit(("a",), " two"))).start()
        while len(got) < 2:
            await _yield()
        threading.Thread(target=log.close).start()
        await asyncio.wait_for(task, 10)
        assert "".join(got) == "one two" and log._waiters == []

        # a cancelled reader takes its waiter off
        log2 = StreamLog()
        task = asyncio.create_task(_drain(log2))
        for _ in range(5):
            await _yield()
        assert len(log2._waiters) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert log2._waiters == []

    asyncio.run(main())


async def _drain(log):
    async for _ in log.aiter():
        pass


async def _yield():
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.call_soon(fut.set_result, None)
    await fut


@llmir.function
def many_steps(s, n):
    for i in range(n):
        s += " x" + llmir.gen(f"g{i}", max_tokens=2)
        s[f"g{i}"]  # a sync point each time: one request at a time


def test_a_streamed_arun_ends_with_the_event_loop_that_started_it(slow):
    """``asyncio.run`` cancels the tasks left when its coroutine returns; a streamed program
    started on that loop is cancelled with them (its requests aborted, its error says why)
    instead of running on to its end with nobody to stream to (before: all 40 requests ran)."""

    async def main():
        return await many_steps.arun(40, backend=slow, stream=True)

    state = asyncio.run(main())
    deadline = time.monotonic() + 10
    while state.error() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(state.error(), llmir.ProgramInterruptedError), state.error()
    assert "event loop" in str(state.error())
    time.sleep(0.2)
    assert len(slow.requests) <= 3


def test_a_streamed_arun_read_to_its_end_is_not_cancelled(fake):
    async def main():
        state = await many_steps.arun(3, backend=fake, stream=True)
        return state, "".join([c async for c in state.text_async_iter()])

    state, text = asyncio.run(main())
    assert state.error() is None and text == state.text() and state["g2"] is not None
