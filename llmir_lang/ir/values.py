"""SSA values of the program IR.

A value is a name and a type. There are two types:

- ``state``: the text of a program so far. Every append op consumes one state value and yields the
  next; a state value with several extending users is a fork.
- ``text``: a string known only at run time: a function argument, or a variable read (``var``) of
  what a ``gen`` / ``select`` produced.

Values compare by name and type. Names are unique within one function (SSA) and are printed with a
``%`` sigil that is not part of the stored name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

# Characters a value name may hold; the printer and the lark grammar agree on this set.
VALUE_NAME_RE = re.compile(r"[A-Za-z0-9_.$]+")


class ValueType(str, Enum):
    """The type of an SSA value."""

    STATE = "state"
    TEXT = "text"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Value:
    """One SSA value: ``name`` (without the ``%``) and its ``type``."""

    name: str
    type: ValueType

    def __str__(self) -> str:
        return "%" + self.name


def is_value_name(name: str) -> bool:
    """True if ``name`` can be printed as ``%name`` and parsed back."""
    return VALUE_NAME_RE.fullmatch(name) is not None
