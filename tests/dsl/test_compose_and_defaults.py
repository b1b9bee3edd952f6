"""A program calling another (``other(s, ...)`` runs ``other``'s body on ``s``) and the sampling
defaults of ``run`` / ``run_batch``, read as ``gen`` reads the same arguments. All on the fake
backend: instant."""

from __future__ import annotations

import pytest

import llmir_lang as llmir
from llmir_lang.dsl import InvalidAppendError, ProgramArgumentError

HERE = "test_compose_and_defaults.py"


@llmir.function
def answer(s, q, n=2):
    s += "Q: " + q + "\nA:" + llmir.gen("a", max_tokens=n)
    return "asked " + q


# --- composition ---------------------------------------------------------------------------------
def test_compose_by_keyword_state(fake):
    @llmir.function
    def outer(s):
        s += "Start\n"
        s["ret"] = answer(s=s, q="x")  # was run(s=...): "unknown argument 's'"

    st = outer.run(backend=fake)
    assert st.text().startswith("Start\nQ: x\nA:") and st["ret"] == "asked x"
    assert st["a"] == st.text().removeprefix("Start\nQ: x\nA:")


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda s: answer(s), "missing a required argument: 'q'"),
        (lambda s: answer(s, q="x", temperature=0.5), "unexpected keyword argument 'temperature'"),
        (lambda s: answer(s, "x", 2, 3), "too many positional arguments"),
    ],
)
def test_compose_with_bad_arguments_is_a_typed_error_at_the_call(fake, call, needle):
    @llmir.function
    def outer(s):
        s += "Start\n"
        call(s)

    with pytest.raises(ProgramArgumentError) as e:  # was a ProgramExecutionError wrapping TypeError
        outer.run(backend=fake)
    text = str(e.value)
    assert needle in text and "answer(s, ...)" in text and "['q', 'n']" in text, text
    assert f"{HERE}:" in text, text  # the line of the call


def test_compose_on_a_fork_group_says_to_call_it_per_branch(fake):
    @llmir.function
    def outer(s):
        s += "Start\n"
        forks = s.fork(2)
        answer(forks, "x")  # ran a new program with the group as q (a TypeError deep inside)

    with pytest.raises(ProgramArgumentError, match=r"fork group is not a state.*for branch in forks"):
        outer.run(backend=fake)

    @llmir.function
    def per_branch(s):
        s += "Start\n"
        forks = s.fork(2)
        for b in forks:
            answer(b, "x")
        forks.join()

    assert len(per_branch.run(backend=fake)["a"]) == 2


def test_appending_a_composed_call_says_to_drop_the_append(fake):
    @llmir.function
    def outer(s):
        s += answer(s, "x")  # answer appended already; its body returned None here

    @llmir.function
    def quiet(s, q):
        s += q + llmir.gen("a", max_tokens=1)

    @llmir.function
    def outer_none(s):
        s += quiet(s, "x")

    with pytest.raises(InvalidAppendError) as e:
        outer_none.run(backend=fake)
    assert "without `s +=`" in str(e.value), str(e.value)
    # a body that returns text is appendable, as before
    assert "asked x" in outer.run(backend=fake).text()


# --- sampling defaults of run / run_batch --------------------------------------------------------
def _max_tokens_of(fake) -> list[int]:
    return [
        step.params.max_new_tokens for r in fake.gen_requests for step in r.steps if not isinstance(step, str)
    ]


@llmir.function
def free(s):
    s += "Hello" + llmir.gen("x")


def test_both_names_of_a_default_are_refused(fake):
    for call in (
        lambda: free.run(backend=fake, max_tokens=3, max_new_tokens=2),
        lambda: free.run_batch([{}], backend=fake, max_new_tokens=2, max_tokens=3),
        lambda: free.run_batch([{"max_tokens": 3, "max_new_tokens": 2}], backend=fake),
    ):
        with pytest.raises(
            ProgramArgumentError, match="'max_tokens' and 'max_new_tokens'|'max_new_tokens' and 'max_tokens'"
        ):
            call()  # one of the two silently won


def test_an_item_default_replaces_the_common_one_in_either_spelling(fake):
    states = free.run_batch([{"max_tokens": 1}, {}], backend=fake, max_new_tokens=3)
    assert [st.error() for st in states] == [None, None]
    assert sorted(_max_tokens_of(fake)) == [1, 3]


@pytest.mark.parametrize(
    ("kwargs", "stop"),
    [({"stop": {"\n"}}, ["\n"]), ({"stop": frozenset({"."})}, ["."]), ({"stop": ("a", "b")}, ["a", "b"])],
)
def test_run_stop_default_takes_what_gen_takes(fake, kwargs, stop):
    free.run(backend=fake, **kwargs)  # a set was refused here, and taken by gen(stop=...)
    (request,) = fake.gen_requests
    assert request.steps[0].params.stop == stop


def test_run_empty_stop_regex_default_is_none_as_in_gen(fake):
    st = free.run(backend=fake, stop_regex="", max_tokens=2)  # was an error; gen(stop_regex="") is none
    assert st.error() is None and st["x"]
    with pytest.raises(ProgramArgumentError, match="sampling defaults: stop must be"):
        free.run(backend=fake, stop=5)


# --- Runtime(mem_fraction_static=...) ------------------------------------------------------------
@pytest.mark.parametrize("fraction", [2.0, 0, -0.5, "1.5", "most", True])
def test_runtime_memory_fraction_out_of_range_is_refused_on_any_device(fraction):
    from llmir_lang.dsl.runtime import sglang_engine_options
    from llmir_lang.errors import InvalidRequestError

    # on the CPU it was dropped unseen; on a GPU 2.0 became kv_memory=2.0, two bytes ("too small")
    for device in ("cpu", None):
        with pytest.raises(InvalidRequestError, match=r"mem_fraction_static=.*\(0, 1\]"):
            sglang_engine_options(None, {"mem_fraction_static": fraction, "device": device})
    with pytest.raises(InvalidRequestError, match="mem_fraction_static"):
        llmir.Runtime(mem_fraction_static=fraction, device="cpu")  # before loading anything
    assert sglang_engine_options(None, {"mem_fraction_static": 1, "device": "cpu"}) == {"device": "cpu"}
    assert sglang_engine_options(None, {"mem_fraction_static": "0.8", "device": "cpu"}) == {"device": "cpu"}
