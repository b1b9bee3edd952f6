"""``EngineService`` and the engine's request futures, on a scripted engine (no model, no HTTP).

The service must never cancel a request's engine future: the engine resolves it on its own
thread, and a cancel landing between the engine's ``done()`` check and its ``set_result`` raised
``InvalidStateError`` there, failing the request (and, with deferred text work, as on CUDA, the
other requests of its step). A client that leaves is stopped with ``Engine.abort``. Each request
is also counted exactly once: ``requests == finished + aborted + failed``.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest

from llmir_lang.errors import EngineError
from llmir_lang.executor.request import GenerateResult, StreamChunk
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.server import service as service_mod
from llmir_lang.server.config import ServerConfig
from llmir_lang.server.errors import ClientDisconnectedError
from llmir_lang.server.service import EngineService, Submission


class ScriptedEngine:
    """The part of ``Engine`` the service uses; the test resolves each request by hand."""

    model_path = "scripted"

    def __init__(self) -> None:
        self.futures: list[Future] = []
        self.streams: list = []
        self.aborted: list[int] = []
        self.abort_called = threading.Event()

    def submit(self, prompt, params, *, stream=None, logprob_start_len=-1, matcher=None) -> Future:
        fut: Future = Future()
        fut.rid = len(self.futures)  # type: ignore[attr-defined]
        self.futures.append(fut)
        self.streams.append(stream)
        return fut

    def abort(self, rid: int) -> bool:
        self.aborted.append(rid)
        self.abort_called.set()
        return True

    def shutdown(self) -> None:
        pass


def _result(rid: int, reason: str = "length") -> GenerateResult:
    return GenerateResult(rid, "ab", [1, 2], reason, 3, 2, 0)


def _service(engine: ScriptedEngine) -> EngineService:
    return EngineService(engine, ServerConfig(), owns_engine=False)


def _counted(svc: EngineService) -> dict[str, int]:
    c = svc.counters
    return {"requests": c.requests, "finished": c.finished, "aborted": c.aborted, "failed": c.failed}


def _resolve(fut: Future, value) -> None:
    """What the engine thread does: resolve unless already done (and it must not raise)."""
    if not fut.done():
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)


def test_stream_cancelled_while_awaiting_its_result_leaves_the_engine_future_alone():
    """A client that leaves right after the final event: the response task is cancelled while the
    stream awaits the request's result. That used to cancel the engine's future (the engine then
    raised InvalidStateError resolving it) and count the request as failed and aborted at once."""
    eng = ScriptedEngine()

    async def scenario() -> EngineService:
        svc = _service(eng)
        events = svc.stream(Submission("hi", SamplingParams(max_new_tokens=2)))
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.01)  # submitted; waiting for a chunk
        eng.streams[0](StreamChunk(0, "ab", [1, 2], finished=True, finish_reason="length"))
        chunk = await asyncio.wait_for(first, 5)
        assert chunk.finished
        rest = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.01)  # now awaiting the result, which the engine has not set yet
        rest.cancel()
        with pytest.raises(asyncio.CancelledError):
            await rest
        assert not eng.futures[0].cancelled()
        _resolve(eng.futures[0], _result(0))  # the engine resolves it: no InvalidStateError
        await asyncio.sleep(0.01)
        return svc

    svc = asyncio.run(scenario())
    assert eng.futures[0].result().finish_reason == "length"
    assert _counted(svc) == {"requests": 1, "finished": 1, "aborted": 0, "failed": 0}
    assert not svc.active
    svc.close()


async def _engine_aborts(eng: ScriptedEngine) -> None:
    """The request was not cancelled; wait for its abort and resolve it as the engine does."""
    assert not eng.futures[0].cancelled()
    await asyncio.to_thread(eng.abort_called.wait, 5)
    _resolve(eng.futures[0], _result(0, "abort"))  # what the abort makes the engine do
    await asyncio.sleep(0.01)


def _check_aborted_once(eng: ScriptedEngine, svc: EngineService) -> None:
    assert eng.aborted == [0]
    assert eng.futures[0].result().finish_reason == "abort"  # resolved by the engine, not cancelled
    assert _counted(svc) == {"requests": 1, "finished": 0, "aborted": 1, "failed": 0}
    svc.close()


def test_stream_closed_early_aborts_without_cancelling_the_engine_future():
    eng = ScriptedEngine()

    async def scenario() -> EngineService:
        svc = _service(eng)
        events = svc.stream(Submission("hi", SamplingParams(max_new_tokens=8)))
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.01)
        eng.streams[0](StreamChunk(0, "a", [1]))
        await asyncio.wait_for(first, 5)
        await events.aclose()  # the client went away mid-stream
        await _engine_aborts(eng)
        return svc

    _check_aborted_once(eng, asyncio.run(scenario()))


class _GoneClient:
    async def is_disconnected(self) -> bool:
        return True


def test_plain_request_of_a_client_that_left_is_aborted_not_cancelled(monkeypatch):
    monkeypatch.setattr(service_mod, "DISCONNECT_POLL_S", 0.01)
    eng = ScriptedEngine()

    async def scenario() -> EngineService:
        svc = _service(eng)
        with pytest.raises(ClientDisconnectedError):
            await svc.run(Submission("hi", SamplingParams(max_new_tokens=8)), _GoneClient())  # type: ignore[arg-type]
        await _engine_aborts(eng)
        return svc

    _check_aborted_once(eng, asyncio.run(scenario()))


def test_a_request_the_engine_fails_is_counted_once_as_failed():
    eng = ScriptedEngine()

    async def scenario() -> EngineService:
        svc = _service(eng)
        task = asyncio.ensure_future(svc.run(Submission("hi", SamplingParams(max_new_tokens=8))))
        await asyncio.sleep(0.01)
        _resolve(eng.futures[0], EngineError("engine step failed: boom"))
        with pytest.raises(EngineError):
            await asyncio.wait_for(task, 5)
        events = svc.stream(Submission("hi", SamplingParams(max_new_tokens=8)))
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.01)
        _resolve(eng.futures[1], EngineError("engine step failed: boom"))
        with pytest.raises(EngineError):
            await asyncio.wait_for(first, 5)
        return svc

    svc = asyncio.run(scenario())
    assert eng.aborted == []
    assert _counted(svc) == {"requests": 2, "finished": 0, "aborted": 0, "failed": 2}
    assert not svc.active
    svc.close()


def test_a_result_set_after_the_loop_closed_is_dropped_quietly(caplog):
    """The engine may resolve a request after the server's loop is gone (shutdown): its done
    callback must not fail on the engine thread (concurrent.futures would log it)."""
    eng = ScriptedEngine()

    async def scenario() -> None:
        svc = _service(eng)
        task = asyncio.ensure_future(svc.run(Submission("hi", SamplingParams(max_new_tokens=8))))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        svc.close()

    asyncio.run(scenario())
    errors: list[BaseException] = []
    worker = threading.Thread(target=lambda: _catch(errors, lambda: _resolve(eng.futures[0], _result(0))))
    worker.start()
    worker.join(5)
    assert not errors
    assert eng.futures[0].result().finish_reason == "length"
    assert not [r for r in caplog.records if "exception calling callback" in r.getMessage()]


def _catch(errors: list[BaseException], fn) -> None:
    try:
        fn()
    except BaseException as e:
        errors.append(e)


class _HereClient:
    async def is_disconnected(self) -> bool:
        return False


@pytest.mark.parametrize("how", ["client_gone", "task_cancelled"])
def test_prime_closes_the_events_when_it_stops_before_the_first_one(monkeypatch, how):
    """``prime`` waits for a stream's first event in a task of its own; when the client leaves, or
    the handler's task is cancelled (a server shutting down), that task is cancelled too and the
    events' cleanup runs (it aborts the request) before ``prime`` returns."""
    from llmir_lang.server import convert

    monkeypatch.setattr(convert, "DISCONNECT_POLL_S", 0.01)
    cleaned: list[str] = []

    async def events():
        try:
            await asyncio.sleep(60)  # the first token never comes
            yield {"never": True}
        finally:
            cleaned.append("events closed")

    async def scenario() -> None:
        client = _GoneClient() if how == "client_gone" else _HereClient()
        task = asyncio.ensure_future(convert.prime(events(), client))
        await asyncio.sleep(0.05)
        if how == "task_cancelled":
            task.cancel()
        with pytest.raises(ClientDisconnectedError if how == "client_gone" else asyncio.CancelledError):
            await task
        assert cleaned == ["events closed"]  # already, not when the generator is collected
        assert len(asyncio.all_tasks()) == 1  # only this scenario is left running

    asyncio.run(scenario())
