"""Schema patterns whose character sets llguidance quotes wrong, rewritten exactly or refused.

NOTE: llguidance 1.9 matches a ``pattern`` (and a ``patternProperties`` name) against the decoded
string by turning the regex into one over JSON text. A set of characters (a class, an escape such
as ``\\p{Cc}``, or the single characters of an alternation, which the engine merges into one set)
that holds every control character U+0000-U+001F, or all of them but U+000A, is turned into "any
escape" there, ``\\"`` and ``\\\\`` included, even where the set holds no ``"`` or ``\\``: under
``^[^"]*$`` the JSON text ``"a\\"b"`` went through, whose value ``a"b`` the validator rejects. A set
that lacks any other control character is turned right. So each such set X loses U+0000, Y being
``[X--\\x00]`` (an alternation loses its ``\\x00`` branches instead), and U+0000 comes back where
it is not a set's member but the first of a sequence, which the engine keeps apart:

- ``X*`` / ``X+`` as ``(?:Y|\\x00Y*)*`` / ``(?:Y|\\x00Y*)+`` (each U+0000 starts a piece, the Y
  after it in the same piece);
- ``X`` / ``X?`` before more of its sequence R as ``(?:YR|\\x00R)`` / ``(?:Y?R|\\x00R)``; a small
  count ``X{m,n}`` (n <= 4) as m times ``X`` and n - m times ``X?``; a group read once, without
  flags, whose branch ends in X takes R into each branch (``(?:a[^"]|b)c`` as ``(?:a[^"]c|bc)``);
- ``X`` / ``X?`` ending a pattern without ``$`` as ``(?:Y|\\x00(?s:.)*)`` (a search finds the same
  strings);
- in a ``pattern`` anchored at both ends whose other parts have fixed lengths, its one ``X{m,n}``
  (``X`` or ``X?`` before the ``$`` too) as ``(?:Y|\\x00Y*)*`` with ``minLength`` / ``maxLength``
  counting the ``m`` to ``n`` characters.

The engine also merges the branches of an alternation after a prefix they share
(``(?:b+[^"\\x00]|b+\\x00)``): such merges are found, and refused where they make a set like X.
Elsewhere (``^[a-z]+[^"]{2,9}$``, ``^(?:a[^"])+$``) there is no exact rewrite: ``exact_pattern`` says
why, and ``schema_pattern_rewrite`` refuses the schema naming the pattern, unless the engine refuses
the pattern anyway. Sets that hold ``"`` and ``\\`` (``.``, ``\\D``, ``\\W``) or lack a control
character (``\\S``, ``[^"\\x00]``) are left as written, and patterns of plain ``regex`` constraints
are never quoted.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from llmir_lang.executor.constraints.schema_pattern_sets import CONTROLS, EMPTY, CritSet
from llmir_lang.executor.constraints.schema_pattern_syntax import (
    Alt,
    Atom,
    Group,
    Item,
    PatternInvalid,
    Zero,
    parse,
)

# Only these spell a set that may hold U+0000: a negation, a Perl or Unicode class, a POSIX class
# of controls, or U+0000 itself. Other patterns are never parsed.
_MAY_HOLD_NUL = re.compile(
    r"\[\^|\[:\^|\\[DWSPp]|\[:(?:cntrl|ascii):\]|\x00|\\x00|\\x\{0+\}|\\u0000|\\u\{0+\}|\\U00000000|\\U\{0+\}"
)
_ANY = "(?s:.)"
_MAX_UNROLLED = 4  # X{2,4}: X X X? X?, each rewritten before the rest (which doubles it)
_MAX_GROWTH = 4  # a rewrite longer than 4 times the pattern (and 1 KiB) is refused as too long


def may_quote_wrong(chars: CritSet) -> bool:
    """True if the set may hold every control (but perhaps U+000A) and may lack '"' or '\\'."""
    controls = all(c not in chars.no for c in CONTROLS if c != 0x0A)
    return controls and not (0x22 in chars.yes and 0x5C in chars.yes)


def _without_nul(chars: CritSet) -> CritSet:
    return CritSet(chars.yes - {0}, chars.no | {0})


@dataclass(frozen=True, slots=True)
class PatternFix:
    """The rewritten pattern, and the string lengths it leaves to ``minLength`` / ``maxLength``."""

    pattern: str
    min_length: int = 0
    max_length: int | None = None


class _NoExactRewrite(Exception):
    pass


def _merged(alt: Alt) -> tuple[CritSet, CritSet]:
    """(the single-character branches of ``alt``, the sets the engine merges with them from
    nested groups, optional branches and after a prefix that branches share: the engine reads
    ``(?:x|b+[^"\x00]|b+\x00)`` as ``(?:x|b+(?:[^"\x00]|\x00))``)."""
    direct, extra = EMPTY, EMPTY
    branches = alt.branches
    heads: dict[str, list[list[Item]]] = {}
    for branch in branches:
        if len(branch) > 1:
            heads.setdefault(branch[0].text, []).append(branch)
    for group in heads.values():
        if len(group) > 1:
            lifted_direct, lifted_extra = _merged(Alt([b[1:] for b in group]))
            extra = extra | lifted_direct | lifted_extra
    for branch in branches:
        if len(branch) != 1 or branch[0].high == 0:
            continue
        item = branch[0]
        if isinstance(item.node, Atom) and not item.quant:
            direct = direct | item.node.chars
        elif isinstance(item.node, Atom) and item.low == 0 and item.high == 1:
            extra = extra | item.node.chars
        elif isinstance(item.node, Group) and not item.quant:
            nested_direct, nested_extra = _merged(item.node.body)
            extra = extra | nested_direct | nested_extra
    return direct, extra


def _hazard(item: Item) -> bool:
    if item.high == 0:
        return False
    if isinstance(item.node, Atom):
        return may_quote_wrong(item.node.chars)
    if isinstance(item.node, Group):
        direct, extra = _merged(item.node.body)
        return may_quote_wrong(direct | extra)
    return False


def _unrolled(item: Item) -> list[Item] | None:
    """``X{m,n}`` as ``m`` times ``X`` and ``n - m`` times ``X?`` (``X{m,}``: ``m - 1`` times ``X``
    and ``X+``), for small counts; None for other items."""
    one = item.text[: len(item.text) - len(item.quant)]
    if item.high is None and 2 <= item.low <= _MAX_UNROLLED + 1:
        return [Item(item.node, one)] * (item.low - 1) + [Item(item.node, one + "+", "+", 1, None)]
    if item.high is not None and 2 <= item.high <= _MAX_UNROLLED:
        optional = Item(item.node, one + "?", "?", 0, 1)
        return [Item(item.node, one)] * item.low + [optional] * (item.high - item.low)
    return None


def _spread(item: Item, rest: list[Item]) -> bool:
    """True if ``item`` is rewritten without ``minLength`` / ``maxLength``, ``rest`` following it."""
    if item.high is None and item.low <= 1:
        return True
    if not rest or _anchors(rest):
        return False
    return item.high == 1 or _unrolled(item) is not None


def _takes_rest(item: Item, rest: list[Item]) -> bool:
    """True if ``item`` is a group, read once and without flags of its own, with a branch ending
    in a set to rewrite: ``rest`` then goes into each branch, after the set."""
    node = item.node
    if not isinstance(node, Group) or item.quant or not rest or _anchors(rest) or _hazard(item):
        return False
    return _takes_after(node)


def _takes_after(node: Group) -> bool:
    """True if what follows ``node`` can go into its branches (no flags of its own, no flag
    setter that would reach it there) and one of them ends in a set to rewrite."""
    if _opener(node) != "(?:" or any(isinstance(i.node, Zero) for b in node.body.branches for i in b):
        return False
    return any(_ends_in_set(b) for b in node.body.branches)


def _group_copies(item: Item, rest: list[Item]) -> list[Item] | None:
    """A group ``_takes_rest`` would take but for its count, as copies it takes: ``(?:A){2}`` as
    ``(?:A)(?:A)``, ``(?:A)?`` as ``(?:A|)``."""
    node = item.node
    if not isinstance(node, Group) or not item.quant or not rest or _anchors(rest) or _hazard(item):
        return None
    if not _takes_after(node):
        return None
    if item.low == 0 and item.high == 1:
        return [Item(Group(node.opener, Alt([*node.body.branches, []])), item.text)]
    return _unrolled(item)


def _ends_in_set(branch: list[Item]) -> bool:
    last = branch[-1] if branch else None
    if last is None or (_hazard(last) and not _spread(last, [])):
        return last is not None
    return isinstance(last.node, Group) and not last.quant and _takes_after(last.node)


def _anchors(items: list[Item]) -> bool:
    for item in items:
        if isinstance(item.node, Zero) and item.node.anchor:
            return True
        if isinstance(item.node, Group) and any(_anchors(b) for b in item.node.body.branches):
            return True
    return False


def _split(items: list[Item]) -> tuple[list[Item], list[Item], list[Item]]:
    """(leading anchors and flag setters, the rest, trailing anchors) of a sequence."""
    start = 0
    while start < len(items) and isinstance(items[start].node, Zero):
        start += 1
    end = len(items)
    while end > start and isinstance(items[end - 1].node, Zero) and items[end - 1].node.anchor:
        end -= 1
    return items[:start], items[start:end], items[end:]


def _fixed_length(items: list[Item]) -> int | None:
    total = 0
    for item in items:
        if isinstance(item.node, Zero):
            continue
        if item.low != item.high:
            return None
        if isinstance(item.node, Atom):
            one: int | None = 1
        else:
            lengths = {_fixed_length(b) for b in item.node.body.branches}
            one = lengths.pop() if len(lengths) == 1 else None
        if one is None:
            return None
        total += one * item.low
    return total


def _one_character(item: Item) -> bool:
    if isinstance(item.node, Atom):
        return True
    branches = item.node.body.branches if isinstance(item.node, Group) else []
    return all(len(b) == 1 and isinstance(b[0].node, Atom) and not b[0].quant for b in branches)


def _opener(group: Group) -> str:
    # a capture group may be written twice (a name twice is an error); the engine reads none
    return group.opener if re.fullmatch(r"\(\?[imsUuxR-]*:", group.opener) else "(?:"


class _Writer:
    def __init__(self) -> None:
        self.changed = False
        self.sized: Item | None = None  # the one X{m,n} whose count minLength / maxLength keep
        self.min_length = 0
        self.max_length: int | None = None

    def top(self, alt: Alt, multiline: bool, lengths: bool) -> str:
        if len(alt.branches) > 1:
            whole = Item(Group("(?:", alt), "")
            if _hazard(whole):
                if _anchors([whole]):
                    raise _NoExactRewrite("an alternation of the whole pattern")
                return self.sequence([whole], True)
            return "|".join(self.sequence(b, not b or not _anchors(b[-1:])) for b in alt.branches)
        head, middle, tail = _split(alt.branches[0])
        if lengths and not multiline and _anchors(head) and tail:
            self._plan_lengths(middle)
        body = self.sequence(middle, not tail)
        return "".join(i.text for i in head) + body + "".join(i.text for i in tail)

    def _plan_lengths(self, middle: list[Item]) -> None:
        sized = [(i, it) for i, it in enumerate(middle) if _hazard(it) and not _spread(it, middle[i + 1 :])]
        if len(sized) != 1 or not _one_character(sized[0][1]):
            return
        index, item = sized[0]
        others = _fixed_length(middle[:index] + middle[index + 1 :])
        if others is None:
            return
        self.sized = item
        self.min_length = others + item.low
        self.max_length = None if item.high is None else others + item.high

    def sequence(self, items: list[Item], open_end: bool) -> str:
        items = list(items)
        out: list[str] = []
        j = 0
        while j < len(items):
            item = items[j]
            rest = items[j + 1 :]
            copies = _group_copies(item, rest)
            if copies is not None:
                items[j : j + 1] = copies
                continue
            if _takes_rest(item, rest):  # (?:a[^"]|b)c as (?:a[^"]c|bc): the class is followed
                assert isinstance(item.node, Group)
                branches = [self.sequence(b + rest, open_end) for b in item.node.body.branches]
                return "".join(out) + "(?:" + "|".join(branches) + ")"
            if not _hazard(item):
                out.append(self.item(item, open_end and j == len(items) - 1))
                j += 1
                continue
            self.changed = True
            copies = None if item is self.sized else _unrolled(item)
            if copies is not None:
                items[j : j + 1] = copies
                continue
            y = self.nul_free(item)
            if item is self.sized or (item.high is None and item.low <= 1):
                out.append(f"(?:{y}|\\x00{y}*){'+' if item.low == 1 and item is not self.sized else '*'}")
            elif item.high != 1:
                raise _NoExactRewrite(f"{item.text!r} repeats a counted number of times")
            elif rest and not _anchors(rest):
                after = self.sequence(rest, open_end)
                out.append(f"(?:{y}{'?' if item.low == 0 else ''}{after}|\\x00{after})")
                return "".join(out)
            elif not rest and open_end:
                out.append(f"(?:{y}|\\x00{_ANY}*){'?' if item.low == 0 else ''}")
            else:
                raise _NoExactRewrite(f"{item.text!r} ends a group or comes before '$'")
            j += 1
        return "".join(out)

    def item(self, item: Item, open_end: bool) -> str:
        node = item.node
        if not isinstance(node, Group):
            return item.text
        plain = item.low == item.high == 1 and open_end
        inner = "|".join(self.sequence(b, plain) for b in node.body.branches)
        return f"{_opener(node)}{inner}){item.quant}"

    def nul_free(self, item: Item) -> str:
        """The text of the set of ``item`` (one repetition) without U+0000."""
        node = item.node
        if isinstance(node, Atom):
            return f"[{node.text}--\\x00]"
        assert isinstance(node, Group)
        direct, extra = _merged(node.body)
        if may_quote_wrong(_without_nul(direct) | extra):
            raise _NoExactRewrite("characters of nested or optional branches merge into one set there")
        branches = []
        for branch in node.body.branches:
            first = branch[0] if len(branch) == 1 else None
            if first is None or not isinstance(first.node, Atom) or first.quant:
                branches.append(self.sequence(branch, False))
            elif first.node.char != 0:
                keep = first.node.char is not None or 0 in first.node.chars.no
                branches.append(first.text if keep else f"[{first.text}--\\x00]")
        return f"{_opener(node)}{'|'.join(branches)})"


def _engine_refuses(pattern: str) -> bool:
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "string", "pattern": pattern})
    is_error, _ = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return is_error


def _too_long(pattern: str) -> PatternFix | str | None:
    return None if _engine_refuses(pattern) else "its exact rewrite would be too long"


@functools.lru_cache(maxsize=1024)
def exact_pattern(pattern: str, lengths: bool) -> PatternFix | str | None:
    """``pattern`` rewritten (module doc): a ``PatternFix``; None where it needs no rewrite (or
    the engine refuses it anyway, naming it); else why no exact rewrite exists. ``lengths``: the
    count of one ``X{m,n}`` may move to ``minLength`` / ``maxLength`` (a ``pattern``, not a
    property name)."""
    if not _MAY_HOLD_NUL.search(pattern):
        return None
    try:
        alt, multiline = parse(pattern)
        whole = alt.branches[0] if len(alt.branches) == 1 else [Item(Group("(?:", alt), "")]
        if _anchors(_split(whole)[1]) and _engine_refuses(pattern):
            return None  # '^' / '$' / '\b' inside: the engine's own error names the pattern
        writer = _Writer()
        text = writer.top(alt, multiline, lengths)
    except (PatternInvalid, _NoExactRewrite) as e:
        if _engine_refuses(pattern):
            return None
        if isinstance(e, PatternInvalid):
            return f"it could not be read here to check its classes ({e})"
        return str(e)
    if not writer.changed:
        return None
    if len(text) > _MAX_GROWTH * len(pattern) + 1024:
        return _too_long(pattern)
    return PatternFix(text, writer.min_length, writer.max_length)

