"""The records ``s += x`` takes: ``Concat``, ``Gen``, ``Select``, the role records and
``SeparateReasoning``, built by the constructors in ``primitives`` (``gen``, ``select``, ``user``,
...) and ``reasoning`` (``separate_reasoning``).

They are plain records; nothing runs when they are built. Primitives concatenate with text and
with each other (``"A: " + gen("a") + "\\n"``) into a ``Concat``, appended item by item.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmir_lang.dsl.errors import SourceLocation
from llmir_lang.ir.attrs import AttrValue


class Expr:
    """Base of appendable primitives: supports ``+`` with text and other primitives."""

    def __add__(self, other: object) -> Concat:
        return Concat([self, other])

    def __radd__(self, other: object) -> Concat:
        return Concat([other, self])


@dataclass(eq=False)
class Concat(Expr):
    """Items appended in order (text, primitives, nested concatenations)."""

    items: list[Any]

    def __add__(self, other: object) -> Concat:
        return Concat([*self.items, other])

    def __radd__(self, other: object) -> Concat:
        return Concat([other, *self.items])


@dataclass(eq=False)
class Gen(Expr):
    """Generate text into variable ``name`` (None: an anonymous generation).

    ``attrs`` are IR attributes: sampling parameters under their DSL names (``max_tokens``,
    ``stop``, ...) and at most one constraint (``regex``, ``json_schema``, ``choices``, ``grammar``,
    ``dtype``), all plain strings, numbers and lists.
    """

    name: str | None
    attrs: dict[str, AttrValue]
    where: SourceLocation | None = field(default=None, repr=False)
    schema: Any = field(default=None, repr=False)  # json_schema as given, for ProgramState.get_obj


@dataclass(eq=False)
class Select(Expr):
    """Pick one of ``choices`` (by the model's likelihood) into variable ``name``."""

    name: str | None  # None: named where it is appended (an anonymous variable)
    choices: list[str]
    choices_method: str = "token_length_normalized"
    where: SourceLocation | None = field(default=None, repr=False)


@dataclass(eq=False)
class RoleMarker(Expr):
    """Opens (``begin``) or closes a chat role; rendered by the model's own chat template."""

    role: str
    begin: bool
    where: SourceLocation | None = field(default=None, repr=False)


@dataclass(eq=False)
class RoleBlock(Expr):
    """A whole message: role begin, ``content`` (text and primitives), role end."""

    role: str
    content: Any
    where: SourceLocation | None = field(default=None, repr=False)


@dataclass(eq=False)
class SeparateReasoning(Expr):
    """``expr``, appended as usual, whose gens and selects split their output in reasoning format
    ``model_type`` (a name of ``ir.reasoning.FORMATS``) once they have run."""

    expr: Any
    model_type: str
    where: SourceLocation | None = field(default=None, repr=False)
