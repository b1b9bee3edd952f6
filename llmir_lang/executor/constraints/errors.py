"""Typed constraint errors. All subclass ``llmir_lang.errors.ConstraintError`` (a ``ValueError``).

Every one is raised before any model step: building a spec or compiling it. A constraint that
dead-ends while generating is not an exception; the matcher reports it through ``Matcher.error()``
and the engine ends that request with ``finish_reason="constraint_error"``.
"""

from __future__ import annotations

from llmir_lang.errors import ConstraintError

CONSTRAINT_ERROR_FINISH_REASON = "constraint_error"


class InvalidRegexError(ConstraintError):
    """A regex (``regex=`` or a schema ``pattern``) does not parse."""


class UnsupportedSchemaError(ConstraintError):
    """A JSON schema uses a keyword (or keyword value) that no engine can enforce.

    ``keyword`` is the keyword, ``path`` the JSON pointer of the schema object holding it.
    """

    def __init__(self, message: str, keyword: str = "", path: str = "") -> None:
        super().__init__(message)
        self.keyword = keyword
        self.path = path


class ReferenceLoopError(UnsupportedSchemaError):
    """A JSON schema whose ``$ref`` leads back to itself without passing through a keyword that
    checks a part of the value (``properties``, ``items``, ...): an infinite reference loop that
    constrains no part of the instance. JSON Schema leaves its meaning undefined and the
    ``jsonschema`` validator recurses until ``RecursionError`` on every value that reaches it, so
    no engine is given it (``schema_cycles``). ``keyword`` is ``"$ref"``, ``path`` the subschema whose ``$ref`` closes the loop,
    ``cycle`` the paths around it (first and last the same).
    """

    def __init__(self, message: str, path: str = "", cycle: tuple[str, ...] = ()) -> None:
        super().__init__(message, keyword="$ref", path=path)
        self.cycle = cycle


class InvalidSchemaError(ConstraintError):
    """A JSON schema is not valid JSON or not a valid JSON Schema document.

    ``keyword`` and ``path`` (the JSON pointer of the schema object holding it) name the faulty
    keyword where it is known; they are empty otherwise (text that is not JSON, say).
    """

    def __init__(self, message: str, keyword: str = "", path: str = "") -> None:
        super().__init__(message)
        self.keyword = keyword
        self.path = path


class UnsatisfiableConstraintError(ConstraintError):
    """The constraint admits no string at all (or none this tokenizer can spell)."""


class GrammarSyntaxError(ConstraintError):
    """A lark grammar does not parse; ``line`` and ``column`` are 1-based (0 when unknown)."""

    def __init__(self, message: str, line: int = 0, column: int = 0) -> None:
        super().__init__(message)
        self.line = line
        self.column = column


class UnsupportedGrammarError(GrammarSyntaxError):
    """A lark grammar that parses but that the engine would enforce otherwise than lark reads it
    (a lazy quantifier, a regex alternative lark's Python ``re`` never extends, a terminal that
    swallows all that can follow it, ...); ``feature`` names what, for a caller to branch on."""

    def __init__(self, message: str, feature: str = "", line: int = 0, column: int = 0) -> None:
        super().__init__(message, line, column)
        self.feature = feature


class InvalidChoicesError(ConstraintError):
    """``choices=`` is empty, has duplicates, or holds something other than strings."""


class UnknownDtypeError(ConstraintError):
    """``dtype=`` is not one of int, float, bool, str."""


class TokenizerVocabularyError(ConstraintError):
    """The tokenizer's vocabulary cannot be turned into bytes per token (unknown scheme, no EOS)."""
