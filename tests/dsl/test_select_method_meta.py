"""A select's meta info carries its method's own keys, as SGLang's ``ChoicesDecision.meta_info``
does (``sglang/lang/choices.py``; ``_execute_select`` stores it as the variable's meta info):

- ``greedy_token_selection``: ``greedy_logprob_matrix``, per choice its token logprobs padded to
  the longest choice with the choice's own mean logprob;
- ``unconditional_likelihood_normalized``: ``unconditional_token_logprobs`` (per choice, the
  ``(logprob, token id, text)`` of its tokens scored without the prompt) and
  ``normalized_unconditional_prompt_logprobs`` (per choice, the mean of conditional minus
  unconditional token logprobs: what the method compares);
- ``token_length_normalized`` and ``sum_logprob``: none of these (SGLang's has none either).

Every one follows the choices as the program gave them, repeats included, on every path. Before,
the matrix and the unconditional logprobs were computed and thrown away."""

from __future__ import annotations

import pytest

import llmir_lang as llmir
from llmir_lang.dsl.segment_calls import UNCONDITIONAL_PROMPT
from llmir_lang.executor import choices as ch

PROMPT = "Q: Is the sky blue on a clear day?\nA:"
# repeats, and choices of different token lengths (the greedy matrix pads the shorter ones)
CHOICES = [" yes", " no", " yes", " it depends on the weather", " no"]
DISTINCT = list(dict.fromkeys(CHOICES))
GREEDY, UNCOND = ch.GREEDY_TOKEN_SELECTION, ch.UNCONDITIONAL_LIKELIHOOD_NORMALIZED
METHOD_KEYS = {
    GREEDY: ("greedy_logprob_matrix",),
    UNCOND: ("unconditional_token_logprobs", "normalized_unconditional_prompt_logprobs"),
}
ALL_METHOD_KEYS = {k for keys in METHOD_KEYS.values() for k in keys}


def _kw(passes: str | None) -> dict:
    return {} if passes is None else {"passes": passes}


def _program(choices: list[str], method: str, prompt: str = PROMPT):
    @llmir.function
    def pick(s):
        s += prompt + llmir.select("ans", choices, choices_method=method)

    return pick


def _mean(xs):
    return sum(xs) / len(xs)


def _check_greedy(meta: dict) -> None:
    """The matrix is the reported token logprobs, padded with each choice's own mean."""
    matrix, inputs = meta["greedy_logprob_matrix"], meta["input_token_logprobs"]
    assert len(matrix) == len(meta["choices"])
    width = max(len(t) for t in inputs)
    for row, triples, norm in zip(matrix, inputs, meta["normalized_prompt_logprobs"]):
        lps = [t[0] for t in triples]
        assert len(row) == width and row[: len(lps)] == lps
        assert row[len(lps) :] == pytest.approx([_mean(lps)] * (width - len(lps)))
        assert _mean(lps) == pytest.approx(norm)
    # what the method compares: the first column decides unless choices tie on it
    first = [row[0] for row in matrix]
    assert first[meta["picked"]] >= max(first) - ch.TIE_NATS
    assert matrix[0] == matrix[2] and matrix[0] is not matrix[2]  # a repeat: equal, its own list


def _check_unconditional(meta: dict, want_uncond: dict[str, list[float]]) -> None:
    """The unconditional logprobs are the choices scored without the prompt (``want_uncond``),
    on the same tokens as ``input_token_logprobs``; the normalized ones are what the method
    compares."""
    uncond, inputs = meta["unconditional_token_logprobs"], meta["input_token_logprobs"]
    norm = meta["normalized_unconditional_prompt_logprobs"]
    assert len(uncond) == len(norm) == len(meta["choices"])
    for choice, row, triples, n in zip(meta["choices"], uncond, inputs, norm):
        assert all(isinstance(t, tuple) and len(t) == 3 for t in row)
        assert [t[1:] for t in row] == [t[1:] for t in triples]  # the same tokens (id, text)
        assert [t[0] for t in row] == pytest.approx(want_uncond[choice], abs=1e-4)
        assert n == pytest.approx(_mean([c[0] - u[0] for c, u in zip(triples, row)]), abs=1e-9)
    assert norm[meta["picked"]] >= max(norm) - ch.TIE_NATS
    assert uncond[0] == uncond[2] and uncond[0] is not uncond[2]
    assert norm[1] == norm[4]


@pytest.mark.parametrize("passes", [None, ""])
@pytest.mark.parametrize("method", [*ch.CHOICES_METHODS, "sum_logprob"])
def test_each_method_reports_its_own_keys(rt, method, passes):
    state = _program(CHOICES, method).run(backend=rt, **_kw(passes))
    assert state.error() is None
    meta = state.get_meta_info("ans")
    assert ALL_METHOD_KEYS & meta.keys() == set(METHOD_KEYS.get(method, ()))
    for key in METHOD_KEYS.get(method, ()):
        assert len(meta[key]) == len(CHOICES), key
    if method == GREEDY:
        _check_greedy(meta)
    if method == UNCOND:
        scored = rt.score(UNCONDITIONAL_PROMPT, DISTINCT)
        _check_unconditional(meta, dict(zip(DISTINCT, scored)))


@pytest.mark.parametrize("method", [GREEDY, UNCOND])
def test_passes_on_and_off_report_the_same(rt, method):
    on = _program(CHOICES, method).run(backend=rt).get_meta_info("ans")
    off = _program(CHOICES, method).run(backend=rt, passes="").get_meta_info("ans")
    assert on["picked"] == off["picked"]
    if method == GREEDY:
        for a, b in zip(on["greedy_logprob_matrix"], off["greedy_logprob_matrix"], strict=True):
            assert a == pytest.approx(b, abs=1e-4)
    else:
        assert on["normalized_unconditional_prompt_logprobs"] == pytest.approx(
            off["normalized_unconditional_prompt_logprobs"], abs=1e-4
        )
        for a, b in zip(on["unconditional_token_logprobs"], off["unconditional_token_logprobs"], strict=True):
            assert [t[1:] for t in a] == [t[1:] for t in b]
            assert [t[0] for t in a] == pytest.approx([t[0] for t in b], abs=1e-4)


@pytest.mark.parametrize("passes", [None, ""])
def test_forks_and_run_batch_report_the_method_keys(rt, passes):
    @llmir.function
    def branches(s, topic):
        s += f"Topic: {topic}.\n"
        forks = s.fork(2)
        for f, method in zip(forks, (GREEDY, UNCOND)):
            f += PROMPT + llmir.select("ans", CHOICES, choices_method=method)
        return [f.get_meta_info("ans") for f in forks]

    states = branches.run_batch([{"topic": "weather"}, {"topic": "colours"}], backend=rt, **_kw(passes))
    want_uncond = dict(zip(DISTINCT, rt.score(UNCONDITIONAL_PROMPT, DISTINCT)))
    for st in states:
        assert st.error() is None
        greedy, uncond = st.ret_value
        assert greedy["choices"] == uncond["choices"] == CHOICES
        assert "unconditional_token_logprobs" not in greedy and "greedy_logprob_matrix" not in uncond
        _check_greedy(greedy)
        _check_unconditional(uncond, want_uncond)


@pytest.mark.parametrize("passes", [None, ""])
def test_exact_values_on_a_fake_backend(fake, passes):
    """A backend whose scores are known: the keys hold exactly what scoring gave, laid out as the
    choices were given; without a tokenizer a triple's id and text are None."""
    prompt = "PREFER:b pick: "
    given = ["a", "b c d", "a", "b", "e f"]
    distinct = list(dict.fromkeys(given))
    cond = dict(zip(distinct, fake.score(prompt, distinct)))
    base = dict(zip(distinct, fake.score(UNCONDITIONAL_PROMPT, distinct)))

    greedy = _program(given, GREEDY, prompt).run(backend=fake, **_kw(passes))
    meta = greedy.get_meta_info("ans")
    width = max(len(lps) for lps in cond.values())
    assert meta["greedy_logprob_matrix"] == [
        cond[c] + [_mean(cond[c])] * (width - len(cond[c])) for c in given
    ]
    assert greedy["ans"] == "b" and meta["picked"] == 3

    state = _program(given, UNCOND, prompt).run(backend=fake, **_kw(passes))
    meta = state.get_meta_info("ans")
    assert meta["unconditional_token_logprobs"] == [[(lp, None, None) for lp in base[c]] for c in given]
    assert meta["normalized_unconditional_prompt_logprobs"] == [
        _mean([x - y for x, y in zip(cond[c], base[c])]) for c in given
    ]
    want = ch.select_choice(UNCOND, distinct, [cond[c] for c in distinct], [base[c] for c in distinct])
    assert state["ans"] == want.choice and meta["picked"] == given.index(want.choice)
