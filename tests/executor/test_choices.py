"""The three ``select`` scoring methods on fixed logprobs (no model).

The organ / organism / antidisestablishmentarianism case is SGLang's model-free choices test: the
same logprobs make each method pick a different choice, which is the point of having three.
"""

from __future__ import annotations

import math

import pytest

from llmir_lang.errors import InvalidRequestError
from llmir_lang.executor.choices import (
    CHOICES_METHODS,
    GREEDY_TOKEN_SELECTION,
    TOKEN_LENGTH_NORMALIZED,
    UNCONDITIONAL_LIKELIHOOD_NORMALIZED,
    UnknownChoicesMethodError,
    greedy_logprob_matrix,
    greedy_token_selection,
    score_and_select,
    select_choice,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from llmir_lang.executor.constraints.errors import InvalidChoicesError

CHOICES = ["organ", "organism", "antidisestablishmentarianism"]
# token spellings: organ | organ ism | ant id is est ablish ment arian ism
LOGPROBS = [
    [-0.1],
    [-0.1, -0.3],
    [-0.4, -0.25, -0.1, -0.01, -0.01, -0.01, -0.01, -0.01],
]
# what a server reports as the normalized prompt logprob of each choice
NORMALIZED = [-0.1, -0.2, -0.05]
# the same tokens scored without the prompt; a first token has no context, so no logprob
UNCONDITIONAL: list[list[float | None]] = [
    [None],
    [None, -1.4],
    [None, -0.25, -0.1, -0.01, -0.01, -0.01, -0.01, -0.01],
]


def close(a: list[float], b: list[float], tol: float = 0.01) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


# --- the SGLang cases ---------------------------------------------------------------------
def test_token_length_normalized_picks_the_long_word():
    """The long word's confident later tokens give it the best normalized logprob."""
    d = token_length_normalized(CHOICES, LOGPROBS, NORMALIZED)
    assert d.choice == "antidisestablishmentarianism"
    assert d.index == 2 and d.method == TOKEN_LENGTH_NORMALIZED
    assert d.scores == NORMALIZED


def test_greedy_token_selection_picks_organ():
    """organ and organism tie on the first token; organ's padding (its mean, -0.1) beats -0.3."""
    d = greedy_token_selection(CHOICES, LOGPROBS)
    assert d.choice == "organ"
    expected = [
        [-0.1] * 8,
        [-0.1, -0.3] + [-0.2] * 6,
        [-0.4, -0.25, -0.1, -0.01, -0.01, -0.01, -0.01, -0.01],
    ]
    matrix = d.meta["greedy_logprob_matrix"]
    assert len(matrix) == 3
    assert all(close(row, want) for row, want in zip(matrix, expected))


def test_unconditional_likelihood_normalized_picks_organism():
    """'ism' after 'organ' is far likelier with the prompt than without it."""
    d = unconditional_likelihood_normalized(CHOICES, LOGPROBS, UNCONDITIONAL)
    assert d.choice == "organism"
    assert close(d.meta["normalized_unconditional_prompt_logprobs"], [-0.1, 0.5, -0.05])


# --- more behaviour -----------------------------------------------------------------------
def test_means_computed_from_token_logprobs():
    d = token_length_normalized(["a", "bc"], [[-1.0], [-0.2, -0.4]])
    assert d.choice == "bc"
    assert close(d.scores, [-1.0, -0.3], 1e-12)


def test_ties_go_to_the_first_choice():
    assert token_length_normalized(["x", "y"], [[-0.5], [-0.25, -0.75]]).index == 0
    assert greedy_token_selection(["x", "y"], [[-0.5, -0.5], [-0.5, -0.5]]).index == 0
    assert unconditional_likelihood_normalized(["x", "y"], [[-1.0], [-1.0]], [[None], [None]]).index == 0


def test_greedy_decides_on_a_later_column():
    d = greedy_token_selection(["p", "q", "r"], [[-2.0, -0.1], [-1.0, -0.9, -0.1], [-1.0, -0.5]])
    assert d.choice == "r"  # p loses column 0; q and r tie there; r wins column 1
    assert d.scores == [-2.0, -1.0, -1.0]


def test_greedy_padding_uses_each_rows_mean():
    assert greedy_logprob_matrix([[-1.0, -3.0], [-0.5, -0.5, -0.5, -0.5]]) == [
        [-1.0, -3.0, -2.0, -2.0],
        [-0.5, -0.5, -0.5, -0.5],
    ]


def test_methods_disagree_on_the_same_logprobs():
    # the reason three methods exist: with these numbers each picks a different answer
    picks = {
        TOKEN_LENGTH_NORMALIZED: token_length_normalized(CHOICES, LOGPROBS, NORMALIZED).choice,
        GREEDY_TOKEN_SELECTION: select_choice(GREEDY_TOKEN_SELECTION, CHOICES, LOGPROBS).choice,
        UNCONDITIONAL_LIKELIHOOD_NORMALIZED: select_choice(
            UNCONDITIONAL_LIKELIHOOD_NORMALIZED, CHOICES, LOGPROBS, UNCONDITIONAL
        ).choice,
    }
    assert len(set(picks.values())) == 3


# --- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("choices", [[], ["a", "a"], ["a", ""]])
def test_bad_choices_are_typed_errors(choices):
    with pytest.raises(InvalidChoicesError):
        token_length_normalized(choices, [[-1.0]] * len(choices))


def test_shape_mismatches_are_typed_errors():
    with pytest.raises(InvalidRequestError, match="2 logprob lists for 3 choices"):
        greedy_token_selection(["a", "b", "c"], [[-1.0], [-1.0]])
    with pytest.raises(InvalidRequestError, match="no token logprobs"):
        token_length_normalized(["a", "b"], [[-1.0], []])
    with pytest.raises(InvalidRequestError, match="same tokens"):
        unconditional_likelihood_normalized(["a", "b"], [[-1.0], [-1.0, -2.0]], [[None], [None]])
    with pytest.raises(InvalidRequestError, match="needs unconditional_logprobs"):
        select_choice(UNCONDITIONAL_LIKELIHOOD_NORMALIZED, ["a"], [[-1.0]])


def test_unknown_method():
    with pytest.raises(UnknownChoicesMethodError, match="greedy_token_selection"):
        select_choice("best_guess", ["a"], [[-1.0]])
    assert isinstance(UnknownChoicesMethodError("x"), InvalidRequestError)


# --- scoring through a backend's score() --------------------------------------------------
class FakeScorer:
    """score(prompt, continuations): one logprob per character, fixed per (prompt, character)."""

    def __init__(self, table: dict[str, dict[str, float]]):
        self.table = table
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, prompt: str, continuations):
        self.calls.append((prompt, list(continuations)))
        return [[self.table[prompt][ch] for ch in c] for c in continuations]


def test_score_and_select_one_call_per_prompt():
    scorer = FakeScorer(
        {
            "Q: ": {"a": -0.5, "b": -1.0, "c": -0.1},
            "<s>": {"a": -0.1, "b": -3.0, "c": -0.1},
        }
    )
    d = score_and_select(scorer, "Q: ", ["ab", "cc"], TOKEN_LENGTH_NORMALIZED)
    assert d.choice == "cc" and scorer.calls == [("Q: ", ["ab", "cc"])]
    assert d.meta["token_logprobs"] == [[-0.5, -1.0], [-0.1, -0.1]]
    scorer.calls.clear()
    d = score_and_select(scorer, "Q: ", ["ab", "cc"], UNCONDITIONAL_LIKELIHOOD_NORMALIZED, "<s>")
    # ab: mean(-0.5+0.1, -1.0+3.0) = 0.8; cc: mean(0, 0) = 0
    assert d.choice == "ab" and len(scorer.calls) == 2
    assert math.isclose(d.scores[0], 0.8) and d.meta["unconditional_token_logprobs"][1] == [-0.1, -0.1]


def test_score_and_select_checks_before_scoring():
    scorer = FakeScorer({})
    with pytest.raises(InvalidChoicesError):
        score_and_select(scorer, "Q: ", ["a", "a"])
    with pytest.raises(UnknownChoicesMethodError):
        score_and_select(scorer, "Q: ", ["a"], "nope")
    with pytest.raises(InvalidRequestError, match="unconditional_prompt"):
        score_and_select(scorer, "Q: ", ["a"], UNCONDITIONAL_LIKELIHOOD_NORMALIZED)
    assert scorer.calls == []


def test_all_methods_listed():
    assert set(CHOICES_METHODS) == {
        TOKEN_LENGTH_NORMALIZED,
        GREEDY_TOKEN_SELECTION,
        UNCONDITIONAL_LIKELIHOOD_NORMALIZED,
    }


def test_scores_within_float_noise_tie_and_the_first_choice_wins():
    """The same logprob scored in steps of other shapes differs by ~1e-6: such differences are
    ties (``TIE_NATS``), decided by the order of the choices, so the pick does not depend on how
    the choices were scored (all in one call with the passes on, one call each with them off)."""
    from llmir_lang.executor.choices import TIE_NATS, unconditional_likelihood_normalized

    noise = 1e-6
    assert token_length_normalized(["a", "b"], [[-1.0], [-1.0 + noise]]).index == 0
    assert greedy_token_selection(["a", "b"], [[-1.0, -2.0], [-1.0 + noise, -2.0 + noise]]).index == 0
    uncond = unconditional_likelihood_normalized(["a", "b"], [[-1.0], [-1.0 + noise]], [[-1.0], [-1.0]])
    assert uncond.index == 0
    # a real difference still decides
    assert token_length_normalized(["a", "b"], [[-1.0], [-1.0 + 10 * TIE_NATS]]).index == 1
    assert greedy_token_selection(["a", "b"], [[-1.0, -2.0], [-1.0 + noise, -1.5]]).index == 1
