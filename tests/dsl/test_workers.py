"""The pooled threads ``run_batch`` runs programs on (``dsl/workers.py``), and what changed with
them: a worker does not wait for its program's last segment, while ``num_threads`` still bounds how
many programs are live at once."""

from __future__ import annotations

import contextvars
import gc
import os
import threading
import time
import weakref

import pytest

import llmir_lang as llmir
from llmir_lang.dsl import workers


def test_spawn_runs_on_a_reused_named_thread_and_join_waits():
    seen: list[tuple[int, str]] = []

    def record(delay: float) -> None:
        time.sleep(delay)
        seen.append((threading.get_ident(), threading.current_thread().name))

    first = workers.spawn(record, 0.05, name="llmir-test")
    assert first.join(5) and first.done() and len(seen) == 1
    time.sleep(0.05)  # the worker parks itself after the task's join is released
    second = workers.spawn(record, 0.0, name="llmir-test-2")
    assert second.join(5)
    assert seen[0][1] == "llmir-test" and seen[1][1] == "llmir-test-2"
    assert seen[1][0] == seen[0][0]  # the same thread, parked in between
    assert threading.current_thread().name != workers.IDLE_NAME
    assert any(t.name == workers.IDLE_NAME for t in threading.enumerate())  # parked, named so


def test_an_escaped_exception_goes_to_threading_excepthook_and_the_worker_lives_on(monkeypatch):
    got: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: got.append(args.exc_value))

    def boom() -> None:
        raise ValueError("from a task")

    assert workers.spawn(boom).join(5)
    assert len(got) == 1 and isinstance(got[0], ValueError)
    after = workers.spawn(lambda: None)
    assert after.join(5)


@llmir.function
def straight(s, q):
    s += "Q: " + q + "\nA:" + llmir.gen("a", max_tokens=3)


def test_num_threads_still_bounds_the_live_programs(fake):
    batch = [{"q": str(i)} for i in range(6)]
    one = straight.run_batch(batch, num_threads=1, backend=fake)
    # one program at a time: each has ended before the next begins, so each is a round of its own
    assert one[0].run_stats()["rounds"] == 6
    assert all(s.error() is None for s in one)
    many = straight.run_batch(batch, backend=fake)
    assert many[0].run_stats()["rounds"] == 1  # all live together: their last segments in one round
    assert [s.text() for s in many] == [s.text() for s in one]


def test_a_failed_last_segment_ends_its_program_alone_with_progress(fake, capsys):
    @llmir.function
    def maybe_bad(s, q):
        s += "Q: " + q + "\nA:" + llmir.gen("a", max_tokens=3, regex="(" if q == "bad" else None)

    states = maybe_bad.run_batch([{"q": "x"}, {"q": "bad"}, {"q": "y"}], backend=fake, progress_bar=True)
    assert states[0].error() is None and states[2].error() is None
    assert isinstance(states[1].error(), llmir.DSLError)
    assert "3/3" in capsys.readouterr().err


def test_programs_start_in_input_order_within_the_bound(fake):
    lock = threading.Lock()
    live, order = [0, 0], []

    @llmir.function
    def two_segments(s, q):
        with lock:
            live[0] += 1
            live[1] = max(live[1], live[0])
            order.append(int(q))
        s += "Q: " + q + llmir.gen("a", max_tokens=2)
        _ = s["a"]  # a sync point: the body waits here, its slot held
        s += "x" + llmir.gen("b", max_tokens=2)
        with lock:
            live[0] -= 1

    for threads in (1, 2, 3):
        live[:], order[:] = [0, 0], []
        states = two_segments.run_batch([{"q": str(i)} for i in range(12)], num_threads=threads, backend=fake)
        assert all(s.error() is None for s in states)
        assert live[1] <= threads and order == sorted(order)


def test_each_program_starts_with_a_fresh_context(fake):
    var = contextvars.ContextVar("var", default="unset")
    seen: list[str] = []

    @llmir.function
    def sets_it(s, q):
        seen.append(var.get())
        var.set(q)
        s += "Q: " + q + llmir.gen("a", max_tokens=2)

    sets_it.run_batch([{"q": "a"}], backend=fake)
    sets_it.run_batch([{"q": "b"}, {"q": "c"}], num_threads=1, backend=fake)
    assert seen == ["unset", "unset", "unset"]  # as on threads of their own


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_run_batch_in_a_forked_child_process(fake):
    straight.run_batch([{"q": "warm"}], backend=fake)  # the parent has parked workers now
    pid = os.fork()
    if pid == 0:  # the child: the parent's workers do not exist here
        code = 1
        try:
            from fake_backend import FakeBackend

            child_fake = FakeBackend()
            (state,) = straight.run_batch([{"q": "child"}], backend=child_fake)
            code = 0 if state.error() is None else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    raise AssertionError("run_batch hung in the forked child")


def test_a_failed_write_back_does_not_keep_the_backend_alive(monkeypatch):
    from fake_backend import FakeBackend

    from llmir_lang.dsl import recorder

    def broken(self, live, result):
        raise KeyError("a write-back bug")

    monkeypatch.setattr(recorder.ProgramRun, "_written", broken)
    backend = FakeBackend()
    alive = weakref.ref(backend)
    states = straight.run_batch([{"q": "a"}, {"q": "b"}], backend=backend)
    assert all(isinstance(s.error(), llmir.ProgramExecutionError) for s in states)
    assert "KeyError" in str(states[0].error())
    backend.pool.shutdown(wait=True)
    del backend
    gc.collect()
    assert alive() is None, "a failed state keeps its backend alive through its error's frames"


def test_parked_workers_end_at_interpreter_exit():
    assert workers.spawn(lambda: None).join(5)
    time.sleep(0.05)  # parked
    assert any(t.name == workers.IDLE_NAME for t in threading.enumerate())
    try:
        workers._stop_idle()  # what atexit runs
        assert not any(t.name == workers.IDLE_NAME for t in threading.enumerate())
        assert workers.spawn(lambda: None).join(5)  # a later spawn starts a new one
    finally:
        workers._exiting = False  # this process goes on: pool again


def test_interpreter_exit_waits_for_a_busy_worker_to_finish_its_task(tmp_path):
    """A worker still running a task when the interpreter exits (a program body ending after a
    Ctrl-C) is waited for, so it is not dropping the program's objects while the interpreter
    finalizes (that aborted the extraction CLI now and then)."""
    import subprocess
    import sys

    done = tmp_path / "done"
    code = (
        "import time\n"
        "from llmir_lang.dsl import workers\n"
        "def task():\n"
        "    time.sleep(0.5)\n"
        f"    open({str(done)!r}, 'w').write('ok')\n"
        "workers.spawn(task)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert done.read_text() == "ok"
