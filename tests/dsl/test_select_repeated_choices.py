"""A select with repeated choices (``["yes", "no", "yes"]``) reports its meta info per choice as
the program gave them, as SGLang does: code like ``zip(choices, meta["normalized_prompt_logprobs"])``
pairs each choice with its own score. Each distinct choice is still scored once, and the value is
what scoring the distinct choices picks (repeats tie, and the first of tied choices wins).

Before the fix every per-choice list followed the de-duplicated choices, so such a zip paired
choices with the scores of others, silently."""

from __future__ import annotations

import pytest

import llmir_lang as llmir
from llmir_lang.executor import choices as ch
from llmir_lang.ir import print_ir

PROMPT = "Q: Is the sky blue on a clear day?\nA:"
CHOICES = [" yes", " no", " yes", " it depends on the weather", " no"]
DISTINCT = list(dict.fromkeys(CHOICES))
METHODS = [*ch.CHOICES_METHODS, "sum_logprob"]
# the per-choice lists of a select's meta info (SGLang's names and llmir's own)
PER_CHOICE = (
    "choices",
    "logprobs",
    "normalized_logprobs",
    "normalized_prompt_logprobs",
    "input_token_logprobs",
    "output_token_logprobs",
)


def _kw(passes: str | None) -> dict:
    return {} if passes is None else {"passes": passes}


def _program(choices: list[str], method: str):
    @llmir.function
    def pick(s):
        s += PROMPT + llmir.select("ans", choices, choices_method=method)

    return pick


def _check_aligned(meta: dict, want: dict, value: str) -> None:
    """``meta`` (of CHOICES) lines up with CHOICES, and each entry is ``want``'s (of DISTINCT)
    entry for the same text; the value is the first of the picked text."""
    for key in PER_CHOICE:
        assert len(meta[key]) == len(CHOICES), key
    assert meta["choices"] == CHOICES
    for i, choice in enumerate(CHOICES):
        j = DISTINCT.index(choice)
        first = CHOICES.index(choice)
        for key in PER_CHOICE[1:]:
            assert meta[key][i] == meta[key][first], (key, i)  # a repeat carries its choice's scores
        assert meta["normalized_prompt_logprobs"][i] == pytest.approx(
            want["normalized_prompt_logprobs"][j], abs=1e-4
        )
        assert meta["logprobs"][i] == pytest.approx(want["logprobs"][j], abs=1e-4)
        assert [t[1:] for t in meta["input_token_logprobs"][i]] == [
            t[1:] for t in want["input_token_logprobs"][j]
        ]
    assert meta["picked"] == CHOICES.index(value)
    assert meta["choices"][meta["picked"]] == value
    scores = dict(zip(meta["choices"], meta["normalized_prompt_logprobs"]))  # SGLang programs do this
    assert scores == pytest.approx(dict(zip(want["choices"], want["normalized_prompt_logprobs"])), abs=1e-4)


@pytest.mark.parametrize("passes", [None, ""])
@pytest.mark.parametrize("method", METHODS)
def test_meta_lists_follow_the_choices_as_given(rt, method, passes):
    repeated = _program(CHOICES, method).run(backend=rt, **_kw(passes))
    distinct = _program(DISTINCT, method).run(backend=rt, **_kw(passes))
    assert repeated.error() is None and distinct.error() is None
    assert repeated["ans"] == distinct["ans"]  # what scoring the distinct choices picked
    _check_aligned(repeated.get_meta_info("ans"), distinct.get_meta_info("ans"), repeated["ans"])
    if method in ch.CHOICES_METHODS:
        # and what the choices module picks from the distinct choices' scores
        meta = distinct.get_meta_info("ans")
        unconditional = None
        if method == ch.UNCONDITIONAL_LIKELIHOOD_NORMALIZED:
            from llmir_lang.dsl.segment_calls import UNCONDITIONAL_PROMPT

            unconditional = rt.score(UNCONDITIONAL_PROMPT, DISTINCT)
        want = ch.select_choice(method, DISTINCT, meta["logprobs"], unconditional)
        assert repeated["ans"] == want.choice


@pytest.mark.parametrize("passes", [None, ""])
def test_forks_and_run_batch_report_per_choice_as_given(rt, passes):
    @llmir.function
    def branches(s, topic, choices):
        s += f"Topic: {topic}.\n"
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += PROMPT + f" ({i})" + llmir.select("ans", choices)
        return [(f["ans"], f.get_meta_info("ans")) for f in forks]

    topics = ["weather", "colours"]
    got = branches.run_batch([{"topic": t, "choices": CHOICES} for t in topics], backend=rt, **_kw(passes))
    want = branches.run_batch([{"topic": t, "choices": DISTINCT} for t in topics], backend=rt, **_kw(passes))
    for g, w in zip(got, want, strict=True):
        assert g.error() is None and w.error() is None
        for (value, meta), (want_value, want_meta) in zip(g.ret_value, w.ret_value, strict=True):
            assert value == want_value
            _check_aligned(meta, want_meta, value)


@pytest.mark.parametrize("passes", [None, ""])
@pytest.mark.parametrize("method", METHODS)
def test_each_distinct_choice_is_scored_once(fake, method, passes):
    """The repeats cost nothing: the backend scores the distinct choices (in one call with the
    passes on, one call each with them off), and a repeat that wins is reported at its first
    index."""

    @llmir.function
    def prog(s):
        s += "PREFER:b pick: " + llmir.select("x", ["a", "b", "a", "b", "c"], choices_method=method)

    st = prog.run(backend=fake, **_kw(passes))
    meta = st.get_meta_info("x")
    assert st["x"] == "b" and meta["picked"] == 1
    assert meta["choices"] == ["a", "b", "a", "b", "c"]
    assert meta["normalized_prompt_logprobs"][1] == meta["normalized_prompt_logprobs"][3] == -0.01
    assert meta["logprobs"][0] == meta["logprobs"][2] and meta["logprobs"][0] is not meta["logprobs"][2]
    scored = [c for p, cs in fake.scores if p.startswith("PREFER") for c in cs]
    assert sorted(scored) == ["a", "b", "c"]


def test_the_ir_keeps_distinct_choices_and_the_order_given():
    @llmir.function
    def prog(s):
        s += "Q: " + llmir.select("x", ["yes", "no", "yes"]) + " " + llmir.select("y", ["a", "b"])

    ir = print_ir(prog.trace())
    assert 'choices = ["yes", "no"], choices_given = [0, 1, 0]' in ir
    assert ir.count("choices_given") == 1  # a select without repeats prints as before


def test_select_keeps_the_choices_as_given_and_gen_constraint_drops_repeats():
    assert llmir.select("a", ["x", "y", "x"]).choices == ["x", "y", "x"]
    assert llmir.gen("g", choices=["1", "2", "1"]).attrs["choices"] == ["1", "2"]
