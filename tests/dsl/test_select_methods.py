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
