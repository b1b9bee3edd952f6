"""A stopped program's text is what ran: never the constant text of turns it did not reach.

The rule these tests hold every way of stopping a program to (``state.cancel()``, an interrupt
of ``run_batch``, a gen that failed): a state's text, its stream and ``messages()`` end at the
first gen / select / join that did not complete. The text before that gen stays (the program
appended it before it stopped), the gen keeps the part of it that was streamed (nothing when the
run is not streamed) while its variable has no value and raises, and nothing after it is there:
not a later turn's user text, not the role markers that close the turn, not a fork's text after a
join whose branches were stopped. The one exception is text a stream has already shown (a fused
``gen -> text -> gen`` chain the engine went through before the stop): a stream cannot take text
back, and ``state.text()`` always equals the stream. ``messages()`` keeps its rule that a role
still open is not a message, so the assistant turn that was cut is not listed.

The text of later turns used to stay: constant pieces carry their text from the moment they are
appended, and ``text()`` joined every piece recorded, failed gens or not.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import pytest
from fake_backend import FakeBackend

import llmir_lang as llmir
from llmir_lang.dsl.chat_roles import chat_roles


@llmir.function
def two_turns(s):
    s += llmir.user("first question")
    s += llmir.assistant(llmir.gen("a1", max_tokens=400, ignore_eos=True))
    s += llmir.user("second question")
    s += llmir.assistant(llmir.gen("a2", max_tokens=8))


def _head(backend, question: str = "first question") -> str:
    """The text of a user turn and the assistant's opening marker, as the state renders them."""
    roles = chat_roles(backend)
    return roles.begin("user") + question + roles.end("user") + roles.begin("assistant")


def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture()
def slow_fake():
    """The fake backend answering each request after 1 s, all its words at once: a cancel lands
    while the request is in flight, and its chunks arrive after the program has stopped."""
    backend = FakeBackend(delay=1.0)
    yield backend
    backend.pool.shutdown(wait=True)


@pytest.mark.parametrize("passes", [None, ""], ids=["fused", "call-by-call"])
def test_cancel_during_a_turn_leaves_out_the_later_turns(rt, passes):
    state = two_turns.run(backend=rt, stream=True, passes=passes)
    it = state.text_iter()
    seen = ""
    while len(seen) < len(_head(rt)) + 20:  # turn 1's gen has streamed some text
        seen += next(it)
    state.cancel()
    streamed = seen + "".join(it)  # a cancel just ends the stream
    assert isinstance(state.error(), llmir.ProgramInterruptedError)
    text = state.text()
    a1 = "".join(state.text_iter("a1"))  # what the stopped gen streamed
    assert len(a1) >= 20
    # the text up to the stopped gen, then what it streamed, then nothing: no turn 2
    assert text == _head(rt) + a1
    assert streamed == text and "".join(state.text_iter()) == text
    assert "second question" not in text
    # the assistant's turn was cut, so it is still open: not a message (as any open role)
    assert state.messages() == [{"role": "user", "content": "first question"}]
    for name in ("a1", "a2"):
        with pytest.raises(llmir.ProgramInterruptedError):
            state[name]


def test_cancel_before_a_gen_streamed_and_its_late_chunks(slow_fake):
    state = two_turns.run(backend=slow_fake, stream=True)
    _wait(lambda: len(slow_fake.requests) == 1)
    state.cancel()
    streamed = "".join(state.text_iter())
    text = state.text()
    assert text == streamed == _head(slow_fake)  # turn 1's gen said nothing before the stop
    _wait(lambda: slow_fake.in_flight == 0)  # the request ran on and sent its chunks, too late
    assert state.text() == text and "".join(state.text_iter()) == text
    assert state.messages() == [{"role": "user", "content": "first question"}]
    with pytest.raises(llmir.ProgramInterruptedError):
        state["a1"]


def test_a_cancelled_run_that_does_not_stream(slow_fake):
    seen: list[llmir.ProgramState] = []

    @llmir.function
    def keeps_its_state(s):
        seen.append(s)
        two_turns(s)

    def cancel() -> None:
        _wait(lambda: len(slow_fake.requests) == 1)
        seen[0].cancel()

    helper = threading.Thread(target=cancel)
    helper.start()
    with pytest.raises(llmir.ProgramInterruptedError):
        keeps_its_state.run(backend=slow_fake)
    helper.join()
    state = seen[0]
    assert state.text() == _head(slow_fake)  # not streamed: the stopped gen has no text at all
    assert "".join(state.text_iter()) == state.text()
    assert state.messages() == [{"role": "user", "content": "first question"}]
    with pytest.raises(llmir.ProgramInterruptedError):
        state["a2"]


def test_cancel_between_turns_stops_at_the_gen_that_never_ran(fake):
    reached, go = threading.Event(), threading.Event()

    @llmir.function
    def tool_between_turns(s):
        s += llmir.user("first question") + llmir.assistant(llmir.gen("a1", max_tokens=3))
        s["a1"]  # a sync point: turn 1 has run
        reached.set()
        go.wait(30)  # a tool call, during which the program is cancelled
        s += llmir.user("second question") + llmir.assistant(llmir.gen("a2", max_tokens=3))
        s += llmir.user("third question")
        s.text()  # a sync point: the segment with turn 2 is refused, it never runs

    state = tool_between_turns.run(backend=fake, stream=True)
    assert reached.wait(30)
    state.cancel()
    go.set()
    streamed = "".join(state.text_iter())
    assert isinstance(state.error(), llmir.ProgramInterruptedError)
    roles = chat_roles(fake)
    turn_1 = _head(fake) + state["a1"] + roles.end("assistant")
    # the program got as far as turn 2's gen, which never ran: nothing after it is there
    assert state.text() == streamed == turn_1 + _head(fake, "second question")
    assert len(fake.gen_requests) == 1
    with pytest.raises(llmir.ProgramInterruptedError, match="was stopped"):
        state["a2"]  # an error, not None


@llmir.function
def facts(s):
    s += "Facts:\n"
    forks = s.fork(2)
    forks += lambda i: f"{i + 1}." + llmir.gen("fact", max_tokens=4)
    forks.join()
    s += "Summary:" + llmir.gen("summary", max_tokens=4)


def test_cancel_while_fork_branches_generate_leaves_out_the_text_after_the_join(slow_fake):
    state = facts.run(backend=slow_fake, stream=True)
    _wait(lambda: len(slow_fake.requests) == 2)  # both branches in flight
    state.cancel()
    streamed = "".join(state.text_iter())
    assert isinstance(state.error(), llmir.ProgramInterruptedError)
    # the join never completed: the parent's text stops at the fork, its stream too (it used to
    # show "Summary:" as soon as the line was recorded, before any branch had run)
    assert state.text() == streamed == "Facts:\n"
    with pytest.raises(llmir.ProgramInterruptedError):
        state["summary"]
    # a join that completes lets the text after it through, streamed in order
    fake = FakeBackend()
    try:
        done = facts.run(backend=fake, stream=True)
        assert "".join(done.text_iter()) == done.text()
        assert done.text().startswith("Facts:\n") and "Summary:" in done.text()
        assert done.error() is None and done["summary"] is not None
    finally:
        fake.pool.shutdown(wait=True)


def test_a_gen_that_failed_drops_the_text_after_it_and_the_next_prompt_too(fake):
    @llmir.function
    def recovers(s):
        # the fake backend refuses constraints: gen "a" fails before any model step
        s += "A:" + llmir.gen("a", max_tokens=2, regex="x+") + " after a"
        try:
            s["a"]
        except llmir.GenerationError:
            s += " fallback:"
        s += llmir.gen("b", max_tokens=2)

    state = recovers.run(backend=fake)
    assert state.text() == "A: fallback:" + state["b"]
    assert fake.gen_requests[-1].prompt == "A: fallback:"  # the next segment continues what ran


# --- run_batch -----------------------------------------------------------------------------
_REACHED = threading.Event()
_GO = threading.Event()
_SEEN: dict[int, llmir.ProgramState] = {}


@llmir.function
def between_turns(s, i):
    _SEEN[i] = s
    s += llmir.user(f"question {i}") + llmir.assistant(llmir.gen("a1", max_tokens=3))
    s["a1"]  # a sync point: turn 1 has run
    if i == 0:  # program 0 stays in Python (a tool call) while the batch is interrupted
        _REACHED.set()
        _GO.wait(30)
    s += llmir.user("second question") + llmir.assistant(llmir.gen("a2", max_tokens=3))
    s += llmir.user("third question")


def _interrupt_main_thread(
    call: Callable[[], object], when: Callable[[], bool], then: Callable[[], None]
) -> None:
    """Run ``call`` and send the main thread a SIGINT (a notebook's interrupt) once ``when()``
    holds, then run ``then()``; ``call`` must raise KeyboardInterrupt."""
    assert threading.current_thread() is threading.main_thread()
    armed = [True]

    def handler(signum: int, frame: object) -> None:
        if armed[0]:
            raise KeyboardInterrupt

    def fire() -> None:
        _wait(when)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        then()

    previous = signal.signal(signal.SIGINT, handler)
    helper = threading.Thread(target=fire, daemon=True)
    try:
        helper.start()
        with pytest.raises(KeyboardInterrupt):
            call()
    finally:
        armed[0] = False
        helper.join()
        signal.signal(signal.SIGINT, previous)


def test_an_interrupted_run_batch_leaves_out_the_text_that_never_ran(slow_fake):
    _REACHED.clear()
    _GO.clear()
    _SEEN.clear()

    def program_1_in_turn_2() -> bool:
        return _REACHED.is_set() and any("second question" in r.prompt for r in slow_fake.requests)

    def go_on_once_stopped() -> None:
        # program 1's turn 2 is stopped in flight; program 0 then goes on and records its turn 2,
        # whose segment never runs (the batch is cancelled): both end at their turn 2's gen
        _wait(lambda: 1 in _SEEN and _SEEN[1].error() is not None)
        _GO.set()

    _interrupt_main_thread(
        lambda: between_turns.run_batch([{"i": 0}, {"i": 1}], backend=slow_fake),
        program_1_in_turn_2,
        go_on_once_stopped,
    )
    for i in (0, 1):
        state = _SEEN[i]
        _wait(state._run.finished.is_set)
        assert isinstance(state.error(), llmir.ProgramInterruptedError), i
        roles = chat_roles(slow_fake)
        turn_1 = _head(slow_fake, f"question {i}") + state["a1"] + roles.end("assistant")
        # the program got to turn 2's gen, which never ran: its text stops there
        assert state.text() == turn_1 + _head(slow_fake, "second question"), i
        assert "third question" not in state.text()
        assert state.messages() == [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": state["a1"]},
            {"role": "user", "content": "second question"},
        ]
        with pytest.raises(llmir.ProgramInterruptedError):
            state["a2"]  # never ran: an error, not None
