"""Variable slots: where a program variable's value comes from.

- ``PieceSlot``: a gen or select (one piece of text, with its meta info).
- ``ReasoningSlot``: the reasoning ``separate_reasoning`` split off a gen's or select's output
  (``<name>_reasoning_content``; the gen's meta info).
- ``RangeSlot``: a ``var_scope``: the pieces appended inside the with-block, concatenated.
- ``GatherSlot``: a variable gathered by ``join`` from each branch, a list in branch order.
- ``ValueSlot``: a value the program set itself (``s["x"] = v``).

``pending()`` is True while a piece the value needs has not run yet (reading it is a sync);
``value()`` raises the generation error if a piece failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmir_lang.dsl.recorder import Piece

if TYPE_CHECKING:
    from llmir_lang.dsl.state import ProgramState


class Slot:
    def pending(self) -> bool:
        return False

    def value(self, strict: bool = True) -> Any:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        return {}


def _piece_value(piece: Piece, strict: bool) -> str | None:
    if piece.failure is not None and strict:
        raise piece.failure
    return piece.text


class PieceSlot(Slot):
    __slots__ = ("piece",)

    def __init__(self, piece: Piece) -> None:
        self.piece = piece

    def pending(self) -> bool:
        return self.piece.text is None and self.piece.failure is None

    def value(self, strict: bool = True) -> Any:
        return _piece_value(self.piece, strict)

    def meta(self) -> dict[str, Any]:
        if self.piece.failure is not None:
            raise self.piece.failure
        return dict(self.piece.meta or {})


class ReasoningSlot(PieceSlot):
    __slots__ = ()

    def value(self, strict: bool = True) -> Any:
        _piece_value(self.piece, strict)  # a failed gen raises its failure
        return self.piece.reasoning


class RangeSlot(Slot):
    __slots__ = ("state", "start", "end")

    def __init__(self, state: ProgramState, start: int, end: int) -> None:
        self.state, self.start, self.end = state, start, end

    def _pieces(self) -> list[Piece]:
        dropped = self.state._dropped  # after the point where the program stopped: never ran
        return [p for p in self.state._pieces[self.start : self.end] if id(p) not in dropped]

    def pending(self) -> bool:
        return any(p.text is None and p.failure is None for p in self._pieces())

    def value(self, strict: bool = True) -> Any:
        return "".join(_piece_value(p, strict) or "" for p in self._pieces())


class GatherSlot(Slot):
    """One slot per branch (None where a branch did not define the variable)."""

    __slots__ = ("slots",)

    def __init__(self, slots: list[Slot | None]) -> None:
        self.slots = slots

    def pending(self) -> bool:
        return any(s is not None and s.pending() for s in self.slots)

    def value(self, strict: bool = True) -> Any:
        return [s.value(strict) if s is not None else None for s in self.slots]

    def meta(self) -> dict[str, Any]:
        return {"branches": [s.meta() if s is not None else {} for s in self.slots]}


class ValueSlot(Slot):
    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def value(self, strict: bool = True) -> Any:
        return self._value


class _ReplacedSlot(ValueSlot):
    """A produced variable replaced after the program finished: the new value, the gen's meta."""

    __slots__ = ("produced",)

    def __init__(self, value: Any, produced: Slot) -> None:
        super().__init__(value)
        self.produced = produced

    def meta(self) -> dict[str, Any]:
        return self.produced.meta()
