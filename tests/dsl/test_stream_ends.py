"""How a streamed run ends: the text a cancelled gen streamed stays in the state, a variable that
streams nothing (a var_scope's, a join's, one set by the program) still comes out of its stream,
and a failed program's stream and variables raise its error instead of ending short in silence."""

from __future__ import annotations

import asyncio

import pytest

import llmir_lang as llmir


@llmir.function
def long_answer(s):
    s += "Q: What is 2 + 2?\nA: " + llmir.gen("a", max_tokens=400, ignore_eos=True)


def test_a_cancelled_gen_keeps_the_text_it_streamed(rt):
    state = long_answer.run(backend=rt, stream=True)
    it = state.text_iter()
    seen = ""
    while len(seen) < 60:
        seen += next(it)
    state.cancel()
    rest = "".join(it)  # a stop that was asked for just ends the stream
    assert isinstance(state.error(), llmir.ProgramInterruptedError)
    assert state.text() == seen + rest and len(state.text()) >= 60
    with pytest.raises(llmir.ProgramInterruptedError):
        state["a"]  # the gen did not finish: no value
    assert "".join(state.text_iter()) == state.text()  # the stream and the state agree

    async def cancelled_arun() -> tuple[str, str]:
        st = await long_answer.arun(backend=rt, stream=True)
        got = ""
        async for chunk in st.text_async_iter():
            got += chunk
            if len(got) > 60:
                break
        st.cancel()
        st._run.finished.wait(30)
        return got, st.text()

    got, text = asyncio.run(cancelled_arun())
    assert text.startswith(got)


@llmir.function
def record(s, text):
    s += "Text: " + text + "\nPerson JSON:\n"
    with s.var_scope("json"):
        s += '{"name":"' + llmir.gen("name", max_tokens=12, stop='"') + '","age":'
        s += llmir.gen("age", max_tokens=4, stop=",") + "}"
    forks = s.fork(2)
    forks += lambda i: f" {i}:" + llmir.gen("x", max_tokens=2)
    forks.join()
    s["note"] = "done"


@pytest.mark.parametrize("stream", [True, False])
def test_every_variable_comes_out_of_its_stream(rt, stream):
    state = record.run(text="Dramai Kesoth is 36 years old.", backend=rt, stream=stream)
    for var in ("json", "name", "note", "x"):
        assert "".join(state.text_iter(var)) == str(state[var]), var
        got = asyncio.run(_collect(state.text_async_iter(var)))
        assert got == str(state[var]), var
    assert state["json"].startswith('{"name":"') and state["note"] == "done"
    with pytest.raises(llmir.UnknownVariableError):
        list(state.text_iter("nope"))


async def _collect(chunks) -> str:
    return "".join([c async for c in chunks])


@llmir.function
def tool(s):
    s += "Q: What is 2 + 2?\nA: " + llmir.gen("a", max_tokens=3, stop="\n")
    if s["a"]:
        raise ConnectionError("search API down")
    s += llmir.gen("b", max_tokens=3)


def test_a_failed_program_says_so_where_its_text_or_variables_are_read(rt):
    state = tool.run(backend=rt, stream=True)
    with pytest.raises(llmir.ProgramExecutionError, match="search API down"):
        list(state.text_iter())
    with pytest.raises(llmir.ProgramExecutionError, match="search API down"):
        list(tool.run(backend=rt).text_iter())  # not streamed: the same
    state = tool.run_batch([{}], backend=rt)[0]
    with pytest.raises(llmir.ProgramExecutionError, match=r"'b' was never produced: the program stopped") as e:
        state["b"]
    assert isinstance(e.value.__cause__, llmir.ProgramExecutionError)
    assert state["a"] == "4"  # what ran before the failure is still there


@llmir.function
def gen_like_names(s):
    s += "Q: What is 2 + 2?\nA:" + llmir.gen("_generated", max_tokens=2)
    forks = s.fork(2)
    forks += lambda i: llmir.gen("_genre", max_tokens=1)
    forks.join()


def test_names_that_start_like_an_unnamed_gens_are_ordinary_variables(rt):
    state = gen_like_names.run(backend=rt)
    assert set(state.variables()) == {"_generated", "_genre"}
    assert len(state["_genre"]) == 2
