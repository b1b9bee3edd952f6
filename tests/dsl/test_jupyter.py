"""llmir_lang as a notebook user meets it: interrupting a run (a kernel's interrupt is a SIGINT in the
main thread), finished states that must not keep their engine alive when the Runtime cell is run
again, ``arun`` in a running event loop, the ``%%llmir`` magic's errors, and the IR's display.
The last test runs a real Jupyter kernel (jupyter_client) on the fake backend."""

from __future__ import annotations

import asyncio
import gc
import io
import queue
import re
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fake_backend import FakeBackend

import llmir_lang as llmir
from llmir_lang.dsl.notebook import CellMagicError
from llmir_lang.dsl.testing import bundled_model_available
from llmir_lang.ir import print_ir

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent


@llmir.function
def two_steps(s, i):
    s += f"Item {i}:" + llmir.gen("a", max_tokens=3)
    s += " then" + s["a"] + llmir.gen("b", max_tokens=3)  # reading "a" ends the first segment


LONG = 700  # tokens of a generation that an interrupt must cut short


@llmir.function
def long_answer(s, q):
    s += "Q: " + q + "\nA: "
    s += llmir.gen("answer", max_tokens=LONG, ignore_eos=True)


@llmir.function
def short(s, q):
    s += "Q: " + q + "\nA: "
    s += llmir.gen("answer", max_tokens=4)


def _interrupt(call: Callable[[], object], when: Callable[[], bool], timeout: float = 60.0) -> float:
    """Run ``call`` and send the main thread a SIGINT (what a Jupyter kernel's interrupt is) once
    ``when()`` holds; return the seconds ``call`` took to raise KeyboardInterrupt after it. The
    test's own handler raises only while ``call`` runs, so a late signal cannot end the session."""
    assert threading.current_thread() is threading.main_thread()
    armed = True
    sent: list[float] = []

    def handler(signum: int, frame: object) -> None:
        if armed:
            raise KeyboardInterrupt

    def fire() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and armed:
            if when():
                sent.append(time.monotonic())
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return
            time.sleep(0.005)

    previous = signal.signal(signal.SIGINT, handler)
    helper = threading.Thread(target=fire, daemon=True)
    try:
        helper.start()
        try:
            call()
        except KeyboardInterrupt:
            armed = False
            return time.monotonic() - sent[0]
        armed = False
        raise AssertionError(f"no KeyboardInterrupt came out of the call (signal sent: {bool(sent)})")
    finally:
        armed = False
        helper.join()
        signal.signal(signal.SIGINT, previous)


def _engine_steps(rt: llmir.Runtime) -> int:
    return rt.stats()["steps"]


def _tokens(rt: llmir.Runtime) -> int:
    return rt.stats()["tokens_computed"]


def _assert_cut_short(rt: llmir.Runtime, tokens_before: int) -> None:
    """Once the engine is idle, it computed far fewer tokens than the interrupted generation asked
    for: its request was aborted, instead of running to ``max_tokens`` for nobody."""
    deadline = time.monotonic() + 60
    steps = _engine_steps(rt)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        steps, before = _engine_steps(rt), steps
        if steps == before:
            break
    assert _tokens(rt) - tokens_before < LONG // 2, "the interrupted program's request ran on"


def _batch_threads() -> list[str]:
    names = ("llmir-batch", "llmir-batch-coordinator", "llmir-round")
    return [t.name for t in threading.enumerate() if t.name in names]


# --- interrupting ------------------------------------------------------------------------------
def test_interrupted_run_batch_stops_the_whole_batch(capsys):
    fake = FakeBackend(delay=0.2)
    try:
        batch = [{"i": i} for i in range(40)]
        took = _interrupt(
            lambda: two_steps.run_batch(batch, backend=fake, num_threads=4, progress_bar=True),
            when=lambda: len(fake.requests) >= 2,
        )
        assert took < 2.0
        # nothing of the batch runs on: no thread left, no request sent after the interrupt
        assert _batch_threads() == []
        sent = len(fake.requests)
        time.sleep(0.5)
        assert len(fake.requests) == sent < 40
        # the progress bar was closed where it stopped, inside the interrupted call
        bar = capsys.readouterr().err
        assert "/40" in bar and "40/40" not in bar
        # the next call runs as usual
        (st,) = two_steps.run_batch([{"i": 1}], backend=fake)
        assert st.error() is None and st["b"]
    finally:
        fake.pool.shutdown(wait=True)


@pytest.mark.parametrize("generator_style", [False, True])
def test_interrupt_while_the_batch_threads_start(monkeypatch, generator_style):
    """A SIGINT that arrives while run_batch is still starting its threads (a worker already sent a
    request: CI's Jupyter kernel test hit it) stops the whole batch, as one that arrives later
    does; before, it escaped between two thread starts and the started workers ran on."""
    batch_module = sys.modules["llmir_lang.dsl.run_batch"]  # where run_batch starts its threads

    fake = FakeBackend(delay=0.2)
    starts = []
    real_spawn = batch_module.spawn

    def spawn(fn, *args, name="llmir-worker"):
        task = real_spawn(fn, *args, name=name)
        starts.append(name)
        if len(starts) == 3:  # the coordinator and two of four workers have started
            deadline = time.monotonic() + 10
            while not fake.requests and time.monotonic() < deadline:
                time.sleep(0.005)
            signal.raise_signal(signal.SIGINT)
        return task

    monkeypatch.setattr(batch_module, "spawn", spawn)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            out = two_steps.run_batch(
                [{"i": i} for i in range(40)], backend=fake, num_threads=4, generator_style=generator_style
            )
            if generator_style:  # not reached: the interrupt comes out of run_batch itself
                next(out)
        assert len(starts) == 5  # every thread started before the interrupt was raised
        assert _batch_threads() == []
        sent = len(fake.requests)
        time.sleep(0.5)
        assert len(fake.requests) == sent < 40
    finally:
        signal.signal(signal.SIGINT, previous)
        fake.pool.shutdown(wait=True)


def test_interrupted_run_aborts_its_engine_request(rt):
    steps, tokens = _engine_steps(rt), _tokens(rt)
    took = _interrupt(
        lambda: long_answer.run(q="What is 2 + 2?", backend=rt), when=lambda: _engine_steps(rt) > steps + 3
    )
    assert took < 5.0
    _assert_cut_short(rt, tokens)
    assert short.run(q="What is 1 + 1?", backend=rt).error() is None


def test_interrupted_display_stream_stops_the_program(rt):
    sink = io.StringIO()
    tokens = _tokens(rt)
    state = long_answer.run(q="What is 3 + 4?", backend=rt, stream=True)
    _interrupt(lambda: llmir.display_stream(state, file=sink), when=lambda: len(sink.getvalue()) > 20)
    _assert_cut_short(rt, tokens)
    assert isinstance(state.error(), llmir.ProgramInterruptedError)
    assert "failed: ProgramInterruptedError" in repr(state)


def test_interrupted_text_iter_stops_the_program(rt):
    tokens = _tokens(rt)
    state = long_answer.run(q="What is 5 + 6?", backend=rt, stream=True)
    seen: list[str] = []

    def read() -> None:
        for chunk in state.text_iter("answer"):
            seen.append(chunk)

    _interrupt(read, when=lambda: len(seen) > 3)
    _assert_cut_short(rt, tokens)
    assert isinstance(state.error(), llmir.ProgramInterruptedError)


def test_cancel_stops_a_streaming_program_and_keeps_its_text(rt):
    tokens = _tokens(rt)
    state = long_answer.run(q="What is 7 + 8?", backend=rt, stream=True)
    it = state.text_iter()
    head = next(it)
    while len(head) < 30:
        head += next(it)
    state.cancel()
    rest = "".join(it)  # the stream ends instead of running to max_tokens
    _assert_cut_short(rt, tokens)
    assert isinstance(state.error(), llmir.ProgramInterruptedError)
    assert state.text().startswith("Q: What is 7 + 8?") and (head + rest).startswith("Q: ")
    state.cancel()  # a finished program: nothing happens
    assert short.run(q="What is 1 + 1?", backend=rt).error() is None


def test_cancelled_arun_aborts_and_many_aruns_run_at_once(rt):
    async def cancelled() -> None:
        steps = _engine_steps(rt)
        task = asyncio.ensure_future(long_answer.arun(q="Why?", backend=rt))
        while _engine_steps(rt) <= steps + 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    tokens = _tokens(rt)
    asyncio.run(cancelled())
    _assert_cut_short(rt, tokens)

    # every arun gets a thread of its own: the default executor would cap them at
    # min(32, cores + 4), and the engine would never see more requests at once than that
    fake = FakeBackend(delay=0.5, workers=64)
    try:

        async def many() -> list[llmir.ProgramState]:
            return await asyncio.gather(*(short.arun(q=str(i), backend=fake) for i in range(40)))

        states = asyncio.run(many())
        assert [st.error() for st in states] == [None] * 40
        assert fake.max_in_flight == 40
    finally:
        fake.pool.shutdown(wait=True)


# --- memory ------------------------------------------------------------------------------------
def test_finished_states_do_not_keep_their_engine_alive(request):
    """A notebook's output history keeps every state a cell displayed; running the cell that makes
    a Runtime again must free the previous engine (thread, KV pool, weights)."""
    model = None if bundled_model_available() else str(request.getfixturevalue("random_model_dir"))
    runtime = llmir.Runtime(model, device="cpu", kv_memory="32MB")
    engine = weakref.ref(runtime.engine)
    kept = [short.run(q="What is 1 + 1?", backend=runtime)]
    kept += short.run_batch([{"q": "a"}, {"q": "b"}], backend=runtime)
    kept.append(short.run(q="What is 2 + 2?", backend=runtime, stream=True).sync())
    too_long = " ".join(str(i) for i in range(4000))  # longer than the model's context
    (failed,) = short.run_batch([{"q": too_long}], backend=runtime)
    assert isinstance(failed.error(), llmir.GenerationError)
    kept.append(failed)
    del runtime
    gc.collect()
    assert engine() is None, "a finished ProgramState keeps its Runtime's engine alive"
    # what a notebook reads from them still works
    for st in kept[:-1]:
        assert st.text().startswith("Q: ") and st.get_meta_info("answer")["completion_tokens"] >= 1
        assert 'class="llmir-state"' in st._repr_html_()
    assert kept[0].run_stats()["requests"] >= 1
    assert "error: " in failed._repr_html_()


# --- %%llmir -----------------------------------------------------------------------------------
@pytest.fixture()
def shell():
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "llmir_lang")  # the README's spelling
    previous = llmir.get_default_backend()
    yield ip
    llmir.set_default_backend(previous)
    InteractiveShell.clear_instance()  # later tests run outside IPython again


def test_magic_errors_are_one_typed_line(shell, capsys):
    fake = FakeBackend()
    try:
        llmir.set_default_backend(fake)
        for line, words in (
            ("--nope", "unrecognized arguments: --nope"),
            ("--stop", "--stop: expected one argument"),
            ("--max-tokens x", "invalid int value"),
            ("--temperature -1", "temperature must be a number >= 0"),
        ):
            with pytest.raises(CellMagicError) as e:
                shell.run_cell_magic("llmir", line, "hello\n")
            text = str(e.value)
            assert words in text, text
            assert "(2)" not in text and "usage: usage" not in text
            assert e.value._render_traceback_() == [f"CellMagicError: {text}"]
        assert capsys.readouterr().err == ""  # argparse printed nothing
        assert fake.requests == []  # no bad value reached the backend

        llmir.set_default_backend(None)
        with pytest.raises(CellMagicError, match="NoBackendError: .*set_default_backend") as e:
            shell.run_cell_magic("llmir", "", "hello\n")
        assert isinstance(e.value.__cause__, llmir.NoBackendError)

        llmir.set_default_backend(fake)
        state = shell.run_cell_magic("llmir", "--no-stream --max-tokens 3", "hello\n")
        assert state is shell.user_ns["_llmir"] and state["answer"]  # the cell's result is shown
        assert shell.run_cell_magic("llmir", "--max-tokens 3", "hello\n") is None  # streamed already
        assert "--max-tokens" in shell.find_cell_magic("llmir").__doc__  # what %%llmir? shows
    finally:
        fake.pool.shutdown(wait=True)


def test_magic_raises_the_error_of_a_streamed_prompt(shell, rt):
    llmir.set_default_backend(rt)
    too_long = " ".join(str(i) for i in range(4000))
    with pytest.raises(CellMagicError, match="GenerationError: .*PromptTooLongError") as e:
        shell.run_cell_magic("llmir", "--max-tokens 3", too_long)
    assert "threading.py" not in str(e.value) and "interactiveshell.py" not in str(e.value)
    assert shell.user_ns["_llmir"].error() is e.value.__cause__  # the failed state is there to read


# --- display -----------------------------------------------------------------------------------
def test_the_ir_prints_and_displays_as_its_text():
    pretty = pytest.importorskip("IPython.lib.pretty")
    module = short.trace()
    assert str(module) == print_ir(module) and pretty.pretty(module) == print_ir(module)
    assert str(module.functions[0]).startswith("func @short(%q: text) {")


# --- in a real kernel --------------------------------------------------------------------------
def test_in_a_jupyter_kernel():
    """The magic's error is one line, a program error names its cell as IPython does, a traced
    program displays as IR text, and the kernel's interrupt stops a ``run_batch`` for good."""
    pytest.importorskip("ipykernel")
    manager = pytest.importorskip("jupyter_client.manager")
    try:
        km, kc = manager.start_new_kernel(kernel_name="python3", startup_timeout=60)
    except Exception as e:  # only the kernel's start may skip the test
        pytest.skip(f"the Jupyter kernel (ipykernel 'python3') could not start here: {type(e).__name__}: {e}")

    def run(code: str, interrupt_on: str | None = None) -> tuple[str, list[dict]]:
        """Execute ``code``; interrupt the kernel when ``interrupt_on`` appears in its output."""
        msg_id = kc.execute(code)
        out, errors, interrupted = "", [], False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                msg = kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out += content["text"]
            elif kind in ("execute_result", "display_data"):
                out += content["data"].get("text/plain", "")
            elif kind == "error":
                errors.append(content)
            elif kind == "status" and content["execution_state"] == "idle":
                return out, errors
            if interrupt_on is not None and interrupt_on in out and not interrupted:
                km.interrupt_kernel()
                interrupted = True
        raise AssertionError(f"the cell did not finish: {code!r}")

    try:
        _, errors = run(
            f"import sys, threading; sys.path.insert(0, {str(HERE)!r})\n"
            "import llmir_lang as llmir\n"
            "from fake_backend import FakeBackend\n"
            "fake = FakeBackend(delay=0.2)\n"
            "llmir.set_default_backend(fake)\n"
            "%load_ext llmir_lang"
        )
        assert errors == []
        _, (error,) = run("%%llmir --nope\nhello")
        assert error["ename"] == "CellMagicError" and len(error["traceback"]) == 1

        _, (error,) = run("@llmir.function\ndef bad(s):\n    s += llmir.gen('x', temperature=-1)\nbad.run()")
        assert error["ename"] == "DSLError" and re.search(r"\(Cell In\[\d+\], line 3\)", error["evalue"])

        out, _ = run(
            "@llmir.function\ndef step(s, i):\n"
            "    s += str(i) + llmir.gen('a', max_tokens=2)\n"
            "    s += s['a'] + llmir.gen('b', max_tokens=2)\n"
            "step.trace()"
        )
        assert "func @step(%i: text) {" in out and "Module(" not in out

        _, (error,) = run(
            "class Loud(FakeBackend):\n"
            "    def submit(self, request, on_chunk=None):\n"
            "        if not self.requests: print('started', flush=True)\n"
            "        return super().submit(request, on_chunk)\n"
            "fake = Loud(delay=0.2)\n"
            "step.run_batch([{'i': i} for i in range(64)], num_threads=4, backend=fake)",
            interrupt_on="started",
        )
        assert error["ename"] == "KeyboardInterrupt"
        out, errors = run(
            "import time\n"
            "sent = len(fake.requests); time.sleep(0.5)\n"
            "print(len(fake.requests) - sent, [t.name for t in threading.enumerate() if 'batch' in t.name])\n"
            "print(step.run(i=1).error())"
        )
        assert errors == [] and out.split("\n")[:2] == ["0 []", "None"], out
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
