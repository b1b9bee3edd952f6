"""SSA values of the program IR.

A value is a name and a type. There are two types:

- ``state``: the text of a program so far. Every append op consumes one state value and yields the
  next; a state value with several extending users is a fork.
- ``text``: a string known only at run time: a function argument, or a variable read (``var``) of
  what a ``gen`` / ``select`` produced.

Values compare by name and type. Names are unique within one function (SSA) and are printed with a
``%`` sigil that is not part of the stored name, as they are: a name is ASCII letters, digits,
``_``, ``.`` and ``$``, or any non-ASCII character a Python identifier may hold, so that every
parameter name a Python program can have (``café``, ``数量``) is a value name. The builder, the
verifier and the lark grammar (which reads any non-ASCII run and lets the parser check it) all
apply ``is_value_name``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

# The ASCII characters a value name may hold (all of most names: the fast path).
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
    """True if ``name`` can be printed as ``%name`` and parsed back (see the module docstring)."""
    if VALUE_NAME_RE.fullmatch(name) is not None:
        return True
    # A character may continue a Python identifier iff "_" + it is one (XID_Continue); every
    # character of an identifier may, so str.isidentifier() names all pass.
    return name != "" and all(
        VALUE_NAME_RE.fullmatch(ch) is not None or (ch > "\x7f" and ("_" + ch).isidentifier()) for ch in name
    )
