"""What a pattern's character sets hold of the characters that matter to JSON quoting
(U+0000-U+001F, ``"``, ``\\``): ``CritSet`` (each in, out or unknown), the sets of Perl, POSIX
and Unicode-property classes, for ``schema_pattern_syntax``'s reader."""

from __future__ import annotations

import re
from dataclasses import dataclass

CONTROLS = frozenset(range(0x20))
CRITICAL = CONTROLS | {0x22, 0x5C}  # what JSON escapes: controls, '"', '\'


@dataclass(frozen=True, slots=True)
class CritSet:
    """The critical characters surely in (``yes``) and surely out of (``no``) a set."""

    yes: frozenset[int]
    no: frozenset[int]

    @staticmethod
    def of(points: set[int] | frozenset[int]) -> CritSet:
        inside = frozenset(points) & CRITICAL
        return CritSet(inside, CRITICAL - inside)

    def __or__(self, other: CritSet) -> CritSet:
        return CritSet(self.yes | other.yes, self.no & other.no)

    def __and__(self, other: CritSet) -> CritSet:
        return CritSet(self.yes & other.yes, self.no | other.no)

    def __sub__(self, other: CritSet) -> CritSet:
        return CritSet(self.yes & other.no, self.no | other.yes)

    def __xor__(self, other: CritSet) -> CritSet:
        return (self - other) | (other - self)

    def __invert__(self) -> CritSet:
        return CritSet(self.no, self.yes)


UNKNOWN = CritSet(frozenset(), frozenset())
EMPTY = CritSet.of(set())
ALL = CritSet.of(CRITICAL)
_SPACE = CritSet.of(set(range(0x09, 0x0E)))  # Rust's \s (Unicode or ASCII) and [[:space:]]
_QUOTES = CritSet.of({0x22, 0x5C})
PERL_SETS = {"d": EMPTY, "w": EMPTY, "s": _SPACE}
POSIX_SETS = {
    "alnum": EMPTY, "alpha": EMPTY, "digit": EMPTY, "lower": EMPTY, "upper": EMPTY, "xdigit": EMPTY,
    "word": EMPTY, "graph": _QUOTES, "print": _QUOTES, "punct": _QUOTES, "blank": CritSet.of({0x09}),
    "space": _SPACE, "cntrl": CritSet.of(set(CONTROLS)), "ascii": ALL,
}  # fmt: skip
# General categories (and a few binary properties): the controls are Cc, '"' and '\' are Po; every
# other category holds none of the critical characters.
_CATEGORY_SETS = {
    "cc": CONTROLS, "control": CONTROLS, "cntrl": CONTROLS, "c": CONTROLS, "other": CONTROLS,
    "po": {0x22, 0x5C}, "otherpunctuation": {0x22, 0x5C}, "p": {0x22, 0x5C}, "punctuation": {0x22, 0x5C},
    "punct": {0x22, 0x5C}, "any": CRITICAL, "ascii": CRITICAL, "assigned": CRITICAL,
    "whitespace": set(range(0x09, 0x0E)), "wspace": set(range(0x09, 0x0E)), "space": set(range(0x09, 0x0E)),
}  # fmt: skip
_OTHER_CATEGORIES = set(
    "l lc lu ll lt lm lo m mn mc me n nd nl no pc pd ps pe pi pf s sm sc sk so z zs zl zp cf cs co cn "
    "letter casedletter uppercaseletter lowercaseletter titlecaseletter modifierletter otherletter mark "
    "combiningmark nonspacingmark spacingmark enclosingmark number decimalnumber digit letternumber "
    "othernumber connectorpunctuation dashpunctuation openpunctuation closepunctuation "
    "initialpunctuation finalpunctuation symbol mathsymbol currencysymbol modifiersymbol othersymbol "
    "separator spaceseparator lineseparator paragraphseparator format surrogate privateuse "
    "unassigned".split()
)


def property_set(name: str) -> CritSet:
    """``\\p{name}``'s critical characters, as far as they are known here (else ``UNKNOWN``)."""
    key = re.sub(r"[\s_-]", "", name).lower()
    m = re.fullmatch(r"([a-z]*)(!=|=|:)(.*)", key)
    kind, value = (m.group(1), m.group(3)) if m else ("", key)
    chars = _property_value(kind, value)
    return ~chars if m and m.group(2) == "!=" else chars


def _property_value(kind: str, value: str) -> CritSet:
    if kind in ("sc", "script", "scx", "scriptextensions"):
        return ALL if value in ("common", "zyyy") else EMPTY  # every critical character is Common
    if kind not in ("", "gc", "generalcategory"):
        return UNKNOWN
    for name in (value, value[2:] if value.startswith("is") else value):
        if name in _CATEGORY_SETS:
            return CritSet.of(set(_CATEGORY_SETS[name]))
        if name in _OTHER_CATEGORIES:
            return EMPTY
        if not kind and name in ("common", "zyyy"):
            return ALL
    return UNKNOWN
