"""``\\d \\D \\w \\W \\s \\S`` in a schema pattern spelled as the characters both readings put there.

JSON Schema names ECMA-262 for ``pattern``, where ``\\d`` is ``[0-9]``, ``\\w`` is ``[A-Za-z0-9_]``
and ``\\s`` is WhiteSpace and LineTerminator; the ``jsonschema`` validator reads the pattern with
Python's ``re``, where ``\\d`` is every Unicode decimal digit (Nd), ``\\w`` every character
``str.isalnum()`` takes (L and N) and ``_``, and ``\\s`` every character ``str.isspace()`` takes.
llguidance 1.9 reads ``\\d`` / ``\\w`` as ECMA-262 does and ``\\s`` as Rust's White_Space, so
``^\\W$`` took ``"é"`` and ``^\\D$`` took ``"٣"``, which the validator rejects.

Each union of class items holding shorthands (a class's items between set operators, or one
escape outside a class) is spelled anew where that changes what the engine reads: as the
characters both readings put in it where the set holds them, and as those either reading puts in
it where the set holds the others (``[^\\d]``, the right of ``--``). So every character the set
takes is one both readings take, and a union both read alike (``[\\s\\S]``, every character) keeps
all of it. Code points fall into eight regions that each shorthand, in each reading, takes whole
or not at all (``_ECMA``, ``_PYTHON``); the spelling is of regions. Characters the engine's
Unicode tables (16.0) assign that Python's (14.0 in 3.11) do not count as Rust reads them: their
letters and digits stay out of ``\\W`` and ``\\D``. Under ``~~`` (symmetric difference, no
polarity) the escapes are left as the engine reads them.
"""

from __future__ import annotations

import functools
import re

from llmir_lang.executor.constraints.schema_pattern_syntax import PatternInvalid, Shorthand, shorthand_escapes

# Regions: A [0-9], B other Nd, C [A-Za-z_], D other letters and numbers (L, N), E the space
# characters of both readings, F of Python's only, G of ECMA-262's only, H every other character.
_SPELLING = {
    "A": "0-9",
    "B": r"[\p{Nd}--0-9]",
    "C": "A-Za-z_",
    "D": r"[[\p{L}\p{N}]--[\p{Nd}A-Za-z]]",
    "E": r"\t-\r\x20\xA0\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}",
    "F": r"\x1C-\x1F\x{85}",
    "G": r"\x{FEFF}",
}
_SHORTER = ((frozenset("ABCD"), r"\p{L}\p{N}_"), (frozenset("AB"), r"\p{Nd}"))
_ALL = frozenset("ABCDEFGH")
_ECMA = {"d": "A", "w": "AC", "s": "EG"}
_PYTHON = {"d": "AB", "w": "ABCD", "s": "EF"}
_SHORTHAND = re.compile(r"\\[dDwWsS]")


def _regions(table: dict[str, str], letter: str) -> frozenset[str]:
    own = frozenset(table[letter.lower()])
    return _ALL - own if letter.isupper() else own


def _spelled(regions: frozenset[str]) -> str:
    """A class of exactly ``regions``, as Rust's syntax reads it (no ``\\d``-like escape, which
    the engine would read again)."""
    if regions == _ALL:
        return r"[\x00-\x{10FFFF}]"
    negated = "H" in regions
    rest = (_ALL - regions) if negated else regions
    items = []
    for whole, text in _SHORTER:
        if whole <= rest:
            items.append(text)
            rest -= whole
    items += [_SPELLING[r] for r in sorted(rest)]
    return f"[{'^' if negated else ''}{''.join(items)}]"


@functools.lru_cache(maxsize=1024)
def narrow_shorthands(pattern: str) -> str:
    """``pattern`` with its shorthands spelled as the module doc says; as written where nothing
    changes or Rust's syntax refuses it (the engine then names it)."""
    if not _SHORTHAND.search(pattern):
        return pattern
    try:
        found = shorthand_escapes(pattern)
    except PatternInvalid:
        return pattern
    unions: dict[int, list[Shorthand]] = {}
    for escape in found:
        unions.setdefault(escape.union, []).append(escape)
    edits: list[tuple[int, int, str]] = []
    for escapes in unions.values():
        polarity = escapes[0].polarity
        letters = {e.letter for e in escapes}
        ecma = frozenset().union(*(_regions(_ECMA, c) for c in letters))
        python = frozenset().union(*(_regions(_PYTHON, c) for c in letters))
        regions = ecma & python if polarity > 0 else ecma | python
        if polarity == 0 or (regions == ecma and not letters & set("sS")):
            continue  # the engine's ASCII \d / \w are already exact here
        edits.append((escapes[0].start, escapes[0].end, _spelled(regions)))
        edits += [(e.start, e.end, "") for e in escapes[1:]]
    for start, end, text in sorted(edits, reverse=True):
        pattern = pattern[:start] + text + pattern[end:]
    return pattern
