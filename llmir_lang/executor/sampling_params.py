"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import regex

from llmir_lang.errors import InvalidRequestError

# Temperatures below this sample greedily. Dividing float32 logits by a smaller one overflows
# (1e-45 turned every logit into +-inf and the softmax into NaN, which sampled token 0); and at
# 1e-5 a logit lead of 0.001 is already a factor e^100, so the draw is the argmax anyway.
GREEDY_TEMPERATURE = 1e-5

# torch.Generator.manual_seed takes any integer in this range (negative ones wrap around)
_SEED_RANGE = (-(2**63), 2**64)


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request. Defaults mean greedy decoding of up to 128 tokens.

    temperature == 0 means greedy (argmax); so does any temperature below ``GREEDY_TEMPERATURE``
    (1e-5). top_k <= 0 means no top-k cut. Penalties follow the OpenAI (frequency / presence,
    additive over generated tokens) and HF (repetition, multiplicative over prompt and generated
    tokens) conventions. ``stop_regex`` ends the output at the first token after which its text
    contains a match of one of the patterns (Python ``re`` syntax, searched as ``re.search``
    would, no flags); the output is cut where that match starts, as at a stop string, and
    ``matched_stop`` is the pattern. Like stop strings they are searched only once
    ``min_new_tokens`` tokens are out, and only matches that end in text from then on count.
    ``top_logprobs_num > 0`` implies ``return_logprob`` (asking for the top
    alternatives of each token is asking for logprobs; it was silently ignored before); with
    ``max_new_tokens == 0`` the result's ``top_logprobs`` is one entry, the next token's. ``seed``
    gives the request its own generator: the same seed gives the same tokens alone, in any batch,
    and with or without speculative decoding (``speculate.verify`` hands back the draws of rejected
    draft positions).

    ``validate`` checks every field's type as well as its range (bools are not integers here), so a
    bad value is an InvalidRequestError at submission, never a failure inside an engine step, which
    would fail the request's batch mates with it.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_regex: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    return_prompt_logprob: bool = False
    skip_special_tokens: bool = True
    # The output constraint: a ``constraints.ConstraintSpec`` (``spec_from_json_schema(...)``,
    # ``spec_from_regex(...)``, ...), compiled by the engine at submission, or a compiled constraint
    # (anything with ``new_matcher()``, e.g. ``Engine.compile_constraint(spec)``): each request gets
    # its own matcher. None = free text.
    constraint: Any = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (the engine calls it again at submission: fields may have been set
        since construction). Normalizes ``stop`` / ``stop_token_ids`` to lists (a lone string is
        one stop string; None is none) and sets ``return_logprob`` when ``top_logprobs_num > 0``."""

        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"invalid sampling parameter: {msg}")

        for name in ("max_new_tokens", "min_new_tokens"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise bad(f"{name} must be an integer >= 0, got {v!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise bad(
                f"min_new_tokens ({self.min_new_tokens}) is larger than max_new_tokens "
                f"({self.max_new_tokens}); lower min_new_tokens or raise max_new_tokens"
            )
        if not _finite(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _finite(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise bad(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k):
            raise bad(f"top_k must be an integer (<= 0 disables it), got {self.top_k!r}")
        if not _finite(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise bad(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not _finite(v) or not (-2.0 <= v <= 2.0):
                raise bad(f"{name} must be a number in [-2, 2], got {v!r}")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be a number > 0 (1 = off), got {self.repetition_penalty!r}")
        if not _is_int(self.top_logprobs_num) or self.top_logprobs_num < 0:
            raise bad(f"top_logprobs_num must be an integer >= 0, got {self.top_logprobs_num!r}")
        if self.seed is not None and (
            not _is_int(self.seed) or not _SEED_RANGE[0] <= self.seed < _SEED_RANGE[1]
        ):
            raise bad(f"seed must be None or an integer in [-2**63, 2**64), got {self.seed!r}")
        for name in ("ignore_eos", "return_logprob", "return_prompt_logprob", "skip_special_tokens"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise bad(f"{name} must be True or False, got {v!r}")
        stop = self.stop
        if stop is None or isinstance(stop, str):
            stop = [stop] if stop else []
        if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or s == "" for s in stop):
            raise bad(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        self.stop = list(stop)
        self.stop_regex = _stop_regexes(self.stop_regex, bad)
        ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or any(not _is_int(t) or t < 0 for t in ids):
            raise bad(f"stop_token_ids must be a list of integers >= 0, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(ids)
        if self.top_logprobs_num > 0:
            self.return_logprob = True
        _check_constraint(self.constraint, bad)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @classmethod
    def from_dict(cls, d: dict[str, Any] | SamplingParams | None) -> SamplingParams:
        if d is None:
            return cls()
        if isinstance(d, SamplingParams):
            return d
        if not isinstance(d, dict):
            raise InvalidRequestError(
                f"sampling parameters must be a SamplingParams, a dict or None, got {type(d).__name__} {d!r}"
            )
        names = set(cls.__dataclass_fields__)
        unknown = set(d) - names
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling parameter(s) {sorted(map(str, unknown))}; known: {sorted(names)}"
            )
        return cls(**d)


def _stop_regexes(value: Any, bad: Any) -> list[str]:
    """``stop_regex`` as a list of patterns that compile and cannot match the empty string (one that
    can would end every output at once, before any text)."""
    pats = [value] if isinstance(value, str) else ([] if value is None else value)
    if not isinstance(pats, (list, tuple)) or any(not isinstance(s, str) or s == "" for s in pats):
        raise bad(f"stop_regex must be a non-empty regex string or a list of them, got {value!r}")
    for pat in pats:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", FutureWarning)  # "possible nested set": [[:digit:]]
                re.compile(pat)
            compiled = compile_stop_regex(pat)
        except FutureWarning as e:
            raise bad(
                f"stop_regex {pat!r} reads differently to Python's re and to the regex module ({e}); "
                "escape the bracket ([\\[]) or write the class out ([0-9] for [[:digit:]])"
            ) from None
        except (re.error, regex.error) as e:  # Python's re syntax, which SGLang servers take too
            raise bad(f"stop_regex {pat!r} does not parse: {e}") from None
        if compiled.fullmatch("") is not None:
            raise bad(
                f"stop_regex {pat!r} matches the empty string, so it would end every output before "
                "its first character; make it require at least one character"
            )
    return list(pats)


@lru_cache(maxsize=256)
def compile_stop_regex(pattern: str) -> regex.Pattern:
    """A ``stop_regex`` pattern, compiled once per process. The ``regex`` module (``re``'s syntax,
    plus partial matches) tells how much of the text's end may still become a match: the text the
    stream holds back."""
    return regex.compile(pattern)


def _check_constraint(constraint: Any, bad: Any) -> None:
    """``constraint`` must be None, a ConstraintSpec or a compiled constraint. A per-request
    ``Matcher`` (it holds one request's state) or a raw schema / regex would otherwise be taken for
    something it is not."""
    if constraint is None or callable(getattr(constraint, "new_matcher", None)):
        return
    from llmir_lang.executor.constraints.spec import ConstraintSpec

    if isinstance(constraint, ConstraintSpec):
        return
    hint = (
        "a Matcher holds one request's state: pass it as Engine.submit(..., matcher=m)"
        if callable(getattr(constraint, "advance", None))
        else "build one with constraints.spec_from_json_schema / spec_from_regex / spec_from_choices / "
        "spec_from_dtype / spec_from_grammar"
    )
    raise bad(
        f"constraint must be a ConstraintSpec or a compiled constraint, got {type(constraint).__name__}; {hint}"
    )


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    """A Python int that is not a bool (``isinstance(True, int)`` holds: True ran as 1 token)."""
    return isinstance(x, int) and not isinstance(x, bool)
