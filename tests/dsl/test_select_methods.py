"""select's choices_method: SGLang's three methods (and sum_logprob), picked from backend scores."""

from __future__ import annotations

import pytest

import llmir_lang as llmir
from llmir_lang.executor import choices as ch

CHOICES = ["red apple", "blue", "green tea leaves"]


@pytest.mark.parametrize(
    "method", ["token_length_normalized", "greedy_token_selection", "unconditional_likelihood_normalized"]
)
def test_each_method_picks_what_the_choices_module_picks(fake, method):
    @llmir.function
    def prog(s):
        s += "Which colour is it? Answer: "
        s += llmir.select("c", CHOICES, choices_method=method)

    st = prog.run(backend=fake)
    prompt = "Which colour is it? Answer: "
    cond = fake.score(prompt, CHOICES)
    uncond = fake.score("\n", CHOICES) if method == "unconditional_likelihood_normalized" else None
    assert st["c"] == ch.select_choice(method, CHOICES, cond, uncond).choice
    scored_prompts = [p for p, _ in fake.scores]
    assert ("\n" in scored_prompts) == (method == "unconditional_likelihood_normalized")


def test_unknown_method_is_a_typed_error(fake):
    @llmir.function
    def prog(s):
        s += "x" + llmir.select("c", ["a", "b"], choices_method="best_guess")

    with pytest.raises(llmir.DSLError, match="choices_method"):
        prog.run(backend=fake)


def test_a_select_whose_async_scoring_fails_fails_alone(fake):
    """A backend's ``score_async`` that refuses one prompt at the call, and one whose future fails:
    each fails its own select (typed, as a failing ``score`` does); the batch's others go on."""
    from concurrent.futures import Future

    from llmir_lang.errors import InvalidRequestError

    class Picky(type(fake)):
        def score_async(self, prompt, continuations):
            if "refuse" in prompt:
                raise InvalidRequestError("refused at the call")
            if "fail" in prompt:
                fut: Future = Future()
                fut.set_exception(InvalidRequestError("failed in the engine"))
                return fut
            return super().score_async(prompt, continuations)

    @llmir.function
    def prog(s, word):
        s += f"Pick for {word}: " + llmir.select("c", ["a", "b"])

    states = prog.run_batch([{"word": "ok"}, {"word": "refuse"}, {"word": "fail"}, {"word": "fine"}], backend=Picky())
    assert states[0]["c"] in ("a", "b") and states[3]["c"] in ("a", "b")
    assert "refused at the call" in str(states[1].error())
    assert "failed in the engine" in str(states[2].error())
