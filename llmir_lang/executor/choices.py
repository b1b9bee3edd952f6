"""Picking one of several fixed continuations (``select`` / ``gen(choices=...)``) from token logprobs.

SGLang's three scoring methods, as pure functions of per-token logprobs (no model, no tokenizer):

==================================  ==============================================================
method                              picks the choice with
==================================  ==============================================================
``token_length_normalized``         the highest mean token logprob (the default)
``greedy_token_selection``          the best first-token logprob; ties go to the next token, and
                                    a shorter choice is padded with its own mean logprob
``unconditional_likelihood_norm.``  the highest mean of ``logp(token | prompt) - logp(token)``,
                                    where ``logp(token)`` comes from scoring the choice without the
                                    prompt (one extra scoring call)
==================================  ==============================================================

Inputs: ``token_logprobs[i][j]`` is the logprob of token ``j`` of choice ``i`` after the prompt
(what ``Backend.score(prompt, choices)`` returns, all choices in one batched call). Every choice
must have at least one token. Ties go to the earliest choice, so results are deterministic.

Where each method fails (why there are three): the mean favours long choices whose later tokens
are near-certain once the first is chosen ("antidisestablishmentarianism"); greedy selection is
misled by an attractive first token; the unconditional normalization removes how likely a choice
is on its own, at the cost of a second scoring call.

``score_and_select`` runs the scoring calls through any ``score(prompt, continuations)`` callable
(``EngineBackend.score``, ``Engine.score``) and applies a method. The three method functions are
also what the DSL exports under SGLang's names (``llmir.greedy_token_selection``): ``select``
takes them, or their names, or SGLang's own method objects (``choices_method_name``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmir_lang.errors import InvalidRequestError

TOKEN_LENGTH_NORMALIZED = "token_length_normalized"
GREEDY_TOKEN_SELECTION = "greedy_token_selection"
UNCONDITIONAL_LIKELIHOOD_NORMALIZED = "unconditional_likelihood_normalized"
CHOICES_METHODS: tuple[str, ...] = (
    TOKEN_LENGTH_NORMALIZED,
    GREEDY_TOKEN_SELECTION,
    UNCONDITIONAL_LIKELIHOOD_NORMALIZED,
)

ScoreFn = Callable[[str, Sequence[str]], list[list[float]]]


class UnknownChoicesMethodError(InvalidRequestError):
    """``choices_method`` is not one of ``CHOICES_METHODS``."""


@dataclass(frozen=True, slots=True)
class ChoiceDecision:
    """The picked choice, its index, the score of every choice under the method, and extra detail.

    ``scores[i]`` is what the method compared for choice ``i`` (for greedy selection: the first
    column of ``meta["greedy_logprob_matrix"]``; the matrix decides ties).

    ``meta`` holds the keys SGLang's method adds to a select's meta info, per choice, under its
    names: ``greedy_logprob_matrix`` (greedy selection), ``unconditional_token_logprobs`` and
    ``normalized_unconditional_prompt_logprobs`` (unconditional normalization); a DSL select
    reports them (``dsl.lowering.select_meta``: the unconditional logprobs as SGLang's triples).
    """

    choice: str
    index: int
    method: str
    scores: list[float]
    meta: dict[str, Any] = field(default_factory=dict)


# --- validation ---------------------------------------------------------------------------
def _check(choices: Sequence[str], token_logprobs: Sequence[Sequence[float]]) -> list[list[float]]:
    from llmir_lang.executor.constraints.spec import spec_from_choices

    spec_from_choices(choices)  # typed InvalidChoicesError: empty, duplicates, non-strings
    if len(token_logprobs) != len(choices):
        raise InvalidRequestError(
            f"{len(token_logprobs)} logprob lists for {len(choices)} choices; score every choice once"
        )
    rows = [[float(x) for x in lps] for lps in token_logprobs]
    for choice, row in zip(choices, rows):
        if not row:
            raise InvalidRequestError(
                f"choice {choice!r} has no token logprobs; every choice must spell at least one token"
            )
    return rows


# Scores closer than this (in nats) are a tie, decided by the order of the choices. The same
# logprob computed in steps of other shapes (every choice in one scoring call, or one call per
# choice; a prefill or a cached prompt) differs by float rounding, about 1e-6: without a margin,
# choices that tie exactly in theory (sharing their scored tokens, or an unconditional prompt equal
# to the prompt) were picked by that noise, differently with the passes on and off.
TIE_NATS = 1e-4


def _first_max(keys: Sequence[float]) -> int:
    """The first index whose key is within ``TIE_NATS`` of the largest."""
    top = max(keys)
    return next(i for i, k in enumerate(keys) if k >= top - TIE_NATS)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


# --- the three methods --------------------------------------------------------------------
def token_length_normalized(
    choices: Sequence[str],
    token_logprobs: Sequence[Sequence[float]],
    normalized_logprobs: Sequence[float] | None = None,
) -> ChoiceDecision:
    """The choice with the highest mean token logprob.

    ``normalized_logprobs`` (one per choice) replaces the means when a backend reports them
    itself (an SGLang server's ``normalized_prompt_logprob``), so both sources pick the same way.
    """
    rows = _check(choices, token_logprobs)
    if normalized_logprobs is None:
        scores = [_mean(row) for row in rows]
    else:
        if len(normalized_logprobs) != len(choices):
            raise InvalidRequestError(
                f"{len(normalized_logprobs)} normalized logprobs for {len(choices)} choices"
            )
        scores = [float(x) for x in normalized_logprobs]
    best = _first_max(scores)
    return ChoiceDecision(choices[best], best, TOKEN_LENGTH_NORMALIZED, scores)


def greedy_logprob_matrix(rows: Sequence[Sequence[float]]) -> list[list[float]]:
    """Rows padded to the longest choice, each with its own mean logprob.

    The padding stands for "this choice would continue about as confidently as it went so far",
    so a choice that is a prefix of a longer one is compared fairly past its end.
    """
    width = max(len(row) for row in rows)
    return [list(row) + [_mean(row)] * (width - len(row)) for row in rows]


def greedy_token_selection(
    choices: Sequence[str], token_logprobs: Sequence[Sequence[float]]
) -> ChoiceDecision:
    """The choice with the best first-token logprob; ties are decided by the next column.

    Column by column, keep only the choices that reach the column's maximum (within
    ``TIE_NATS``), until one is left (or the columns run out: then the earliest of the tied
    choices).
    """
    rows = _check(choices, token_logprobs)
    matrix = greedy_logprob_matrix(rows)
    alive = list(range(len(rows)))
    for col in range(len(matrix[0])):
        top = max(matrix[i][col] for i in alive)
        alive = [i for i in alive if matrix[i][col] >= top - TIE_NATS]
        if len(alive) == 1:
            break
    best = alive[0]
    return ChoiceDecision(
        choices[best],
        best,
        GREEDY_TOKEN_SELECTION,
        [row[0] for row in matrix],
        {"greedy_logprob_matrix": matrix},
    )


def unconditional_likelihood_normalized(
    choices: Sequence[str],
    token_logprobs: Sequence[Sequence[float]],
    unconditional_logprobs: Sequence[Sequence[float | None]],
) -> ChoiceDecision:
    """The choice with the highest mean of ``logp(token | prompt) - logp(token | no prompt)``.

    ``unconditional_logprobs[i]`` scores the same tokens of choice ``i`` without the prompt. A
    ``None`` entry (typically the first token, which has no context to be scored from) counts as
    0: that token keeps its conditional logprob.
    """
    rows = _check(choices, token_logprobs)
    if len(unconditional_logprobs) != len(choices):
        raise InvalidRequestError(
            f"{len(unconditional_logprobs)} unconditional logprob lists for {len(choices)} choices"
        )
    scores = []
    for choice, row, base in zip(choices, rows, unconditional_logprobs):
        if len(base) != len(row):
            raise InvalidRequestError(
                f"choice {choice!r} has {len(row)} conditional but {len(base)} unconditional token "
                "logprobs; score the same tokens in both calls"
            )
        scores.append(_mean([c - (0.0 if u is None else float(u)) for c, u in zip(row, base)]))
    best = _first_max(scores)
    meta = {
        "unconditional_token_logprobs": [list(base) for base in unconditional_logprobs],
        "normalized_unconditional_prompt_logprobs": list(scores),  # its own list: a caller may change one
    }
    return ChoiceDecision(choices[best], best, UNCONDITIONAL_LIKELIHOOD_NORMALIZED, scores, meta)


# --- dispatch -----------------------------------------------------------------------------
_METHOD_FUNCTIONS: dict[Callable[..., ChoiceDecision], str] = {
    token_length_normalized: TOKEN_LENGTH_NORMALIZED,
    greedy_token_selection: GREEDY_TOKEN_SELECTION,
    unconditional_likelihood_normalized: UNCONDITIONAL_LIKELIHOOD_NORMALIZED,
}
# SGLang's method objects (``sglang.lang.choices``), by class name: a program that passes them
# keeps working when its ``import sglang as sgl`` becomes ``import llmir_lang as sgl``
_SGLANG_CLASSES = {
    "TokenLengthNormalized": TOKEN_LENGTH_NORMALIZED,
    "GreedyTokenSelection": GREEDY_TOKEN_SELECTION,
    "UnconditionalLikelihoodNormalized": UNCONDITIONAL_LIKELIHOOD_NORMALIZED,
}


def choices_method_name(method: object) -> str:
    """The name of a choices method given as a name (returned as is; callers check it), as one of
    this module's three method functions (``llmir.greedy_token_selection``, SGLang's spelling),
    or as one of SGLang's method objects. Anything else (a custom scoring object, which SGLang
    accepts) is an ``UnknownChoicesMethodError``: the interpreter scores with these methods only."""
    if isinstance(method, str):
        return method
    name = next((n for fn, n in _METHOD_FUNCTIONS.items() if method is fn), None)
    if name is None and type(method).__module__.split(".")[0] == "sglang":
        name = _SGLANG_CLASSES.get(type(method).__name__)
    if name is None:
        raise UnknownChoicesMethodError(
            f"choices_method {method!r} is not one of llmir's methods; pass token_length_normalized, "
            "greedy_token_selection or unconditional_likelihood_normalized (the objects or their "
            "names): custom scoring methods are not supported"
        )
    return name


def check_method(method: str) -> str:
    if method not in CHOICES_METHODS:
        raise UnknownChoicesMethodError(
            f"unknown choices_method {method!r}; use one of {', '.join(CHOICES_METHODS)}"
        )
    return method


def select_choice(
    method: str,
    choices: Sequence[str],
    token_logprobs: Sequence[Sequence[float]],
    unconditional_logprobs: Sequence[Sequence[float | None]] | None = None,
) -> ChoiceDecision:
    """Apply ``method`` by name; ``unconditional_logprobs`` is required by (only) the third method."""
    check_method(method)
    if method == TOKEN_LENGTH_NORMALIZED:
        return token_length_normalized(choices, token_logprobs)
    if method == GREEDY_TOKEN_SELECTION:
        return greedy_token_selection(choices, token_logprobs)
    if unconditional_logprobs is None:
        raise InvalidRequestError(
            f"{UNCONDITIONAL_LIKELIHOOD_NORMALIZED} needs unconditional_logprobs: score the choices "
            "once more without the prompt"
        )
    return unconditional_likelihood_normalized(choices, token_logprobs, unconditional_logprobs)


def score_and_select(
    score: ScoreFn,
    prompt: str,
    choices: Sequence[str],
    method: str = TOKEN_LENGTH_NORMALIZED,
    unconditional_prompt: str | None = None,
) -> ChoiceDecision:
    """Score every choice after ``prompt`` in one ``score`` call, then pick with ``method``.

    ``unconditional_likelihood_normalized`` makes a second call after ``unconditional_prompt``
    (a context-free start such as the model's BOS text; required for that method, because the
    engine cannot score a token with no context at all). ``meta`` of the decision also holds the
    raw logprobs (``token_logprobs``; the second call's are the method's
    ``unconditional_token_logprobs``).
    """
    check_method(method)
    choices = list(choices)
    from llmir_lang.executor.constraints.spec import spec_from_choices

    spec_from_choices(choices)  # fail before any model step
    if method == UNCONDITIONAL_LIKELIHOOD_NORMALIZED and not unconditional_prompt:
        raise InvalidRequestError(
            f"{UNCONDITIONAL_LIKELIHOOD_NORMALIZED} needs unconditional_prompt= (for example the "
            "model's BOS text) to score the choices without the prompt"
        )
    logprobs = score(prompt, choices)
    base = score(unconditional_prompt, choices) if method == UNCONDITIONAL_LIKELIHOOD_NORMALIZED else None  # type: ignore[arg-type]
    decision = select_choice(method, choices, logprobs, base)
    decision.meta["token_logprobs"] = [list(x) for x in logprobs]
    return decision
