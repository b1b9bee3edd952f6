"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from llmir_lang.errors import InvalidRequestError


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request. Defaults mean greedy decoding of up to 128 tokens.

    temperature == 0 means greedy (argmax). top_k <= 0 means no top-k cut. Penalties follow the
    OpenAI (frequency / presence, additive over generated tokens) and HF (repetition,
    multiplicative over prompt and generated tokens) conventions.
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
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    return_prompt_logprob: bool = False
    skip_special_tokens: bool = True
    # Constraint attached by the structured-generation layer: any object with the
    # executor.constraints `Matcher` protocol factory (see constraints package). None = free text.
    constraint: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"invalid sampling parameter: {msg}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise bad(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise bad(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise bad(
                f"min_new_tokens ({self.min_new_tokens}) is larger than max_new_tokens "
                f"({self.max_new_tokens}); lower min_new_tokens or raise max_new_tokens"
            )
        if not _finite(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not _finite(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int):
            raise bad(f"top_k must be an integer (<= 0 disables it), got {self.top_k!r}")
        if not _finite(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not _finite(v) or not (-2.0 <= v <= 2.0):
                raise bad(f"{name} must be in [-2, 2], got {v!r}")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.top_logprobs_num < 0:
            raise bad(f"top_logprobs_num must be >= 0, got {self.top_logprobs_num!r}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad(f"stop must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        if d is None:
            return cls()
        if isinstance(d, SamplingParams):
            return d
        names = set(cls.__dataclass_fields__)
        unknown = set(d) - names
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling parameter(s) {sorted(unknown)}; known: {sorted(names)}"
            )
        return cls(**d)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
