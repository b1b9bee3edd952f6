"""The lazy interpreter on a fake backend: sync points, batches, passes on == off, streaming, async,
and errors that stay on their own program."""

from __future__ import annotations

import asyncio

import pytest
from fake_backend import FakeBackend

import llmir_lang as llmir
from llmir_lang.dsl import GenerationError, ProgramExecutionError

FEW_SHOT = "Facts: Ada lives in Paris. Bo is 30 years old.\n" + "".join(
    f"Q: Is question {i} true?\nA: {'True' if i % 2 else 'False'}\n" for i in range(6)
)


@llmir.function
def few_shot(s, question):
    s += FEW_SHOT + "Q: " + question + "\nA: "
    s += llmir.select("answer", ["True", "False", "Unknown"])


@llmir.function
def react(s, question):
    s += "Question: " + question + "\n"
    for i in range(3):
        s += f"Thought {i}:" + llmir.gen(f"thought_{i}", max_tokens=3, stop="\n") + "\n"
        s += f"Action {i}: " + llmir.select(f"action_{i}", ["Search", "Finish"])
        if s[f"action_{i}"] == "Finish":  # control flow on a generated value: a sync point
            break
        s += "\nObservation: nothing.\n"


@llmir.function
def chat(s, topic):
    s += llmir.system("You are a helpful assistant who answers questions.")
    for turn in range(3):
        s += llmir.user(f"Tell me fact {turn} about {topic}.")
        s += llmir.assistant(llmir.gen(f"fact_{turn}", max_tokens=4))


@llmir.function
def skeleton(s, topic):
    s += "Write an essay about " + topic + " in three parts, one line each.\n"
    forks = s.fork(3)
    forks += lambda i: f"Part {i + 1}:" + llmir.gen("part", max_tokens=4, stop="\n")
    forks.join()
    s += "Conclusion:" + llmir.gen("conclusion", max_tokens=4)


def test_sync_point_splits_segments_and_resumes(fake):
    st = react.run(question="PREFER:Search where is Ada?", backend=fake)
    assert st.error() is None
    assert [st[f"action_{i}"] for i in range(3)] == ["Search"] * 3
    # three reads of a generated value inside the loop: three segments (the last read ends it)
    assert st.run_stats()["segments"] == 3
    # each segment's requests see the text the earlier segments produced
    assert all(r.prompt.startswith("Question: PREFER:Search where is Ada?") for r in fake.gen_requests)
    assert st.text().count("Observation: nothing.") == 3


def test_run_batch_one_round_shares_the_prefix_once(fake):
    questions = [{"question": f"Is fact number {i} stated?"} for i in range(8)]
    states = few_shot.run_batch(questions, backend=fake)
    assert all(s.error() is None for s in states)
    assert all(s["answer"] in ("True", "False", "Unknown") for s in states)
    stats = states[0].run_stats()
    assert stats["rounds"] == 1 and stats["segments"] == 8
    # the longest prefix every program shares, cut before a word: prefilled once
    assert [r.prompt for r in fake.prefills] == [FEW_SHOT + "Q: Is fact number"]
    assert len(fake.scores) == 8  # one batched score call per select (select-trie)
    # call by call: no prefill, one score call per choice
    fake.reset()
    plain = few_shot.run_batch(questions, backend=fake, passes="")
    assert len(fake.prefills) == 0 and len(fake.scores) == 24
    assert [s.text() for s in plain] == [s.text() for s in states]


@pytest.mark.parametrize("program,kwargs", [(react, {"question": "PREFER:Finish now?"}),
                                            (react, {"question": "PREFER:Search it"}),
                                            (chat, {"topic": "owls"}),
                                            (skeleton, {"topic": "rivers"})])  # fmt: skip
def test_passes_on_equals_passes_off(fake, program, kwargs):
    on = program.run(backend=fake, **kwargs)
    requests_on = len(fake.gen_requests)
    fake.reset()
    off = program.run(backend=fake, passes="", **kwargs)
    assert on.text() == off.text()
    assert on.variables() == off.variables()
    assert requests_on <= len(fake.gen_requests)


def test_chat_turns_fuse_into_one_request(fake):
    st = chat.run(topic="owls", backend=fake)
    assert len(st.messages()) == 7
    assert len(fake.gen_requests) == 1 and len(fake.gen_requests[0].steps) == 5  # 3 gens, 2 texts
    fake.reset()
    chat.run(topic="owls", backend=fake, passes="")
    assert len(fake.gen_requests) == 3


def test_batch_with_control_flow_matches_single_runs(fake):
    qs = [{"question": f"PREFER:{'Finish' if i % 3 == 0 else 'Search'} q{i}"} for i in range(6)]
    batch = react.run_batch(qs, backend=fake, num_threads=3)
    singles = [react.run(backend=fake, passes="", **q) for q in qs]
    assert [b.text() for b in batch] == [s.text() for s in singles]
    gen_style = list(react.run_batch(qs, backend=fake, generator_style=True))
    assert [g.text() for g in gen_style] == [s.text() for s in singles]


def test_errors_stay_on_their_program(fake):
    @llmir.function
    def sometimes(s, i):
        s += f"Item {i}:" + llmir.gen("x", max_tokens=2)
        if i == 2:
            raise ValueError("boom in program 2")
        if i == 3:
            forks = s.fork(2)
            forks += ["", "ok"]  # branch 0 generates from... an empty extension is fine
            forks[0] += llmir.gen("y", max_tokens=1, min_tokens=5)  # invalid: min > max
        s += llmir.gen("z", max_tokens=2)

    states = sometimes.run_batch([{"i": i} for i in range(5)], backend=fake)
    assert isinstance(states[2].error(), ProgramExecutionError)
    assert "boom in program 2" in str(states[2].error()) and "test_interpreter.py" in str(states[2].error())
    assert states[3].error() is not None and "min" in str(states[3].error())
    for i in (0, 1, 4):
        assert states[i].error() is None and states[i]["z"]


def test_backend_failure_in_one_branch_is_reported_on_the_state():
    class FailingBackend(FakeBackend):
        def _run(self, request, on_chunk):
            result = super()._run(request, on_chunk)
            if "branch 1" in request.prompt:
                result.error = "simulated engine failure"
                result.steps[0].error = "simulated engine failure"
            return result

    backend = FailingBackend()

    @llmir.function
    def f(s, n):
        s += f"Program {n} forks now.\n"
        forks = s.fork(2)
        forks += lambda i: f"branch {i}:" + llmir.gen("b", max_tokens=2)
        forks.join()

    states = f.run_batch([{"n": 0}, {"n": 1}], backend=backend)
    for st in states:
        assert isinstance(st.error(), GenerationError)
        assert "simulated engine failure" in str(st.error()) and "'b'" in str(st.error())
    with pytest.raises(GenerationError):
        f.run(n=5, backend=backend)


def test_stream_text_iter(fake):
    fake.delay = 0.01
    st = chat.run(topic="owls", backend=fake, stream=True)
    chunks = list(st.text_iter())
    assert len(chunks) > 5
    assert "".join(chunks) == st.text()
    st2 = chat.run(topic="owls", backend=fake, stream=True)
    assert "".join(st2.text_iter("fact_1")) == st2["fact_1"]
    # a state that was not streamed yields its text at once
    assert list(chat.run(topic="owls", backend=fake).text_iter()) == [st.text()]


@llmir.function
def select_then_gen(s):
    s += "Q: Is it?\nA: " + llmir.select("x", ["True", "False"]) + "\nWhy:" + llmir.gen("y", max_tokens=4)
    s += "\nMore:" + llmir.gen("empty", max_tokens=0) + "|" + llmir.gen("z", max_tokens=3)


@llmir.function
def concat_then_gen(s):
    s += "List:\n"
    forks = s.fork(2)
    forks += lambda i: f"{i}." + llmir.gen("item", max_tokens=3) + "\n"
    forks.join(mode="concate_and_append")
    s += "Done:" + llmir.gen("d", max_tokens=3)


@pytest.mark.parametrize("passes", [None, ""])
@pytest.mark.parametrize("program", [select_then_gen, concat_then_gen])
def test_stream_keeps_text_that_arrives_out_of_order(fake, program, passes):
    """A select's value, an empty gen in a fused chain and the branch text a concat join appends
    are known after a later gen has started streaming: the stream holds that gen's text until the
    earlier text is out, so the chunks always add up to the final text."""
    fake.delay = 0.002
    st = program.run(backend=fake, stream=True, passes=passes)
    assert "".join(st.text_iter()) == st.text()
    if program is select_then_gen:
        again = program.run(backend=fake, stream=True, passes=passes)
        assert list(again.text_iter("x")) == [again["x"]]


def test_stream_of_an_unknown_variable_raises(fake):
    st = chat.run(topic="owls", backend=fake, stream=True)
    with pytest.raises(llmir.dsl.UnknownVariableError):
        list(st.text_iter("nope"))


def test_async_run_and_async_stream(fake):
    async def main() -> tuple[str, str, str]:
        st = await chat.arun(topic="owls", backend=fake)
        streamed = await chat.arun(topic="owls", backend=fake, stream=True)
        parts = [c async for c in streamed.text_async_iter("fact_0")]
        return st["fact_0"], "".join(parts), streamed["fact_0"]

    direct, streamed, final = asyncio.run(main())
    assert direct == streamed == final


def test_sampling_defaults_apply_to_gens_without_their_own(fake):
    @llmir.function
    def f(s):
        s += "x" + llmir.gen("a") + llmir.gen("b", max_tokens=1)

    f.run(backend=fake, max_new_tokens=3, temperature=0.5)
    steps = [st for st in fake.gen_requests[0].steps if not isinstance(st, str)]
    assert steps[0].params.max_new_tokens == 3 and steps[0].params.temperature == 0.5
    assert steps[1].params.max_new_tokens == 1


def test_default_backend(fake):
    llmir.set_default_backend(fake)
    try:
        assert chat.run(topic="x").error() is None
        assert llmir.get_default_backend() is fake
    finally:
        llmir.set_default_backend(None)


def test_call_by_call_is_one_call_at_a_time_and_fork_groups_overlap(fake):
    fake.delay = 0.02
    skeleton.run(topic="rivers", backend=fake, passes="")
    assert fake.max_in_flight == 1
    fake.reset()
    skeleton.run(topic="rivers", backend=fake)
    assert fake.max_in_flight == 3  # the three branch heads of the grouped fork


@llmir.function
def star_args(s, head, *parts, tail="", **extra):
    s += head + "".join(parts) + extra.get("middle", "") + tail
    s += llmir.gen("a", max_tokens=2)


def test_star_args_and_keyword_catch_all_are_passed_as_written(fake):
    st = star_args.run("H|", "p1|", "p2|", tail="T|", middle="M|", backend=fake)
    assert st.text().startswith("H|p1|p2|M|T|")
    states = star_args.run_batch([{"head": "A|", "middle": "B|"}, {"head": "C|"}], backend=fake)
    assert states[0].text().startswith("A|B|")
    assert states[1].text().startswith("C|") and "B|" not in states[1].text()
    assert star_args.bind(middle="Z|").run("Y|", backend=fake).text().startswith("Y|Z|")
    # tracing: *parts and **extra are not IR parameters; head is
    assert "head" in str(star_args.trace())


def test_bind_and_progress_bar(fake, capsys):
    bound = chat.bind(topic="owls")
    assert bound.run(backend=fake).text() == chat.run(topic="owls", backend=fake).text()
    states = few_shot.bind(question="Is it?").run_batch([{}, {}], backend=fake, progress_bar=True)
    assert states[0].text() == states[1].text()
    assert "2/2" in capsys.readouterr().err
