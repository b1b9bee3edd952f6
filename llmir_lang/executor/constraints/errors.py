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


class ConstraintTooExpensiveError(ConstraintError):
    """Enforcing the constraint passes the engine's bounds on its work: llguidance's parser limits
    (Earley items per step or per row, lexer fuel and states, grammar size), or text the grammar
    forces that never ends (``"forced text"``: longer than ``forcing_guard.MAX_FORCED_BYTES``).
    ``limit`` names which. Raised when it happens before any model step
    (compiling); mid-generation the request ends with ``CONSTRAINT_ERROR_FINISH_REASON`` and the
    same message (``too_expensive_message``)."""

    limit: str = ""

    def __init__(self, message: str, limit: str = "") -> None:
        super().__init__(message)
        self.limit = limit


def too_expensive_message(detail: str, endless: bool = False) -> str:
    """What to tell a user whose constraint passed the engine's bounds (``detail``: the bound)."""
    if endless:
        return (
            f"the grammar forces text here that never ends ({detail}): a terminal takes the "
            "longest text it can, so it swallows what must follow it; end the terminal otherwise "
            "(a bounded repeat, another last character) or change what follows it. If the grammar "
            "does force text this long here, raise "
            "llmir_lang.executor.constraints.forcing_guard.MAX_FORCED_BYTES"
        )
    return (
        f"the constraint is too ambiguous or too expensive for the engine to enforce ({detail}); "
        "simplify it: give a grammar's texts one reading each (no rule like e: e e; recursion on "
        'the left, lists as item ("," item)*) and fewer, longer terminals, give a schema fewer '
        "anyOf branches, or split the output over several gen calls"
    )


# llguidance's error for passing each of its limits (in its first line), and the limit
_LIMIT_ERRORS = (
    ("Too many items", "step_max_items"),
    ("Current row has", "max_items_in_row"),
    ("too many expressions constructed", "step_lexer_fuel"),
    ("too many states", "max_lexer_states"),
    ("initial lexer configuration (grammar) too big", "initial_lexer_fuel"),
    ("grammar size (number of symbols) too big", "max_grammar_size"),
)


def limit_of(error: str) -> str | None:
    """The llguidance limit (an ``LLParserLimits`` field) that ``error`` reports passing, or None."""
    return next((limit for needle, limit in _LIMIT_ERRORS if needle in error), None)
