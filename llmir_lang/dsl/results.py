"""What running a segment produces: variable values, failures, returned states, per function
(and ``_Val``, a state's value while the segment runs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class VarResult:
    """A variable's value and the meta info of the call that produced it."""

    value: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Failure:
    """Why a state could not be computed: the failed gen / select ``name`` and the cause."""

    name: str | None
    message: str
    cause: BaseException | None = None


@dataclass(slots=True)
class StateResult:
    """A returned state: its text and the variables visible in it (or its failure)."""

    text: str
    vars: dict[str, VarResult]
    failure: Failure | None = None


@dataclass(slots=True)
class FunctionResult:
    """One function's returned states, in the order of its ``return`` operands."""

    states: list[StateResult]

    @property
    def failure(self) -> Failure | None:
        return next((s.failure for s in self.states if s.failure is not None), None)


@dataclass(slots=True)
class _Val:
    """A state's value while a segment runs: its text and variables so far, its failure, and
    the prefill gates its model calls wait for (``SegmentEvaluator``)."""

    text: str
    vars: dict[str, VarResult]
    failure: Failure | None = None
    gates: frozenset[str] = frozenset()  # prefills this state's users must wait for
