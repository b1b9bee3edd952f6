"""A rough estimate of what an outlines-core index build of a regex costs, read off its text.

outlines-core builds a DFA over the whole vocabulary up front. For most regexes that takes
milliseconds, but a counted repetition of a wide class multiplies the states the vocabulary walk
visits: ``\\w{60}`` takes 1.3 s with a 4k vocabulary and 3.7 s with a 32k one, ``\\w{1,200}`` ran
into the 5 s deadline before llguidance took over (the caller waited the whole deadline for
nothing), ``[a-z]{3000}`` 6 s. llguidance builds its lexer lazily and compiles all of these in
milliseconds, so such a regex goes to it directly.

The estimate: every class or character inside a counted repetition (``{n}``, ``{n,}``,
``{n,m}``) weighs by how wide the class is (its Unicode ranges make the UTF-8 automaton large:
``\\w`` and ``\\p{..}`` are hundreds of ranges), times the product of the enclosing repetitions'
largest counts. Atoms outside counted repetitions cost nothing here (a long alternation of
literal choices builds fast). The parser is lenient: text it cannot read is left to the engines,
which report syntax errors themselves. The estimate is linear and misses builds that grow faster
(an optional repetition of an alternation, such as a JSON string of bounded length): the
compiler's deadline on the build still catches those.
"""

from __future__ import annotations

# weights, calibrated on a 32k byte-level BPE vocabulary (about 0.3 ms per unit, in one thread)
_LITERAL = 1
_ASCII_CLASS = 8
_DIGIT = 15  # \d: 60-odd Unicode ranges
_SPACE = 8
_WIDE = 20  # ., \S, \D, negated classes, classes with non-ASCII ranges: few, long ranges
_UNICODE_TABLE = 200  # \w, \W, \p{..}, \P{..}: hundreds of ranges
# units a build may cost at a 32k vocabulary (well under a second); larger vocabularies get less
BUDGET_UNITS = 1000
_BUDGET_VOCAB = 32000

_CLASS_ESCAPES = {
    "d": _DIGIT,
    "D": _WIDE,
    "s": _SPACE,
    "S": _WIDE,
    "w": _UNICODE_TABLE,
    "W": _UNICODE_TABLE,
    "p": _UNICODE_TABLE,
    "P": _UNICODE_TABLE,
}
_ZERO_WIDTH = set("bBAzZ<>")


class _Unreadable(Exception):
    pass


# the parse: an atom's weight, a sequence / alternation of nodes, or a repetition of one node
_Node = tuple


def outlines_build_cost(regex: str) -> int:
    """Estimated cost units of an outlines-core index of ``regex`` (0 if it cannot be read)."""
    try:
        parser = _Parser(regex)
        tree = parser.alternation()
        if parser.pos != len(regex):
            return 0
        return _cost(tree, 1)
    except (_Unreadable, IndexError, ValueError, RecursionError):
        return 0


def too_costly_for_outlines(regex: str, vocab_size: int) -> str | None:
    """Why ``regex`` should skip outlines-core (its estimated build is too slow), or None."""
    cost = outlines_build_cost(regex)
    budget = BUDGET_UNITS * _BUDGET_VOCAB // max(vocab_size, _BUDGET_VOCAB)
    if cost <= budget:
        return None
    return (
        f"its counted repetitions would make outlines-core's index slow to build "
        f"(estimated {cost} units, over the {budget} allowed at this vocabulary size)"
    )


def _cost(node: _Node, mult: int) -> int:
    kind = node[0]
    if kind == "atom":
        return node[1] * mult if mult > 1 else 0
    if kind == "rep":
        return _cost(node[1], mult * max(node[2], 1))
    return sum(_cost(child, mult) for child in node[1])


class _Parser:
    """Reads Rust ``regex`` syntax far enough to weigh atoms and find counted repetitions."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def _peek(self, ahead: int = 0) -> str:
        i = self.pos + ahead
        return self.text[i] if i < len(self.text) else ""

    def alternation(self) -> _Node:
        branches = [self.sequence()]
        while self._peek() == "|":
            self.pos += 1
            branches.append(self.sequence())
        return ("seq", branches)

    def sequence(self) -> _Node:
        items: list[_Node] = []
        while self.pos < len(self.text) and self._peek() not in "|)":
            node = self.atom()
            while True:
                count = self.repetition_count()
                if count is None:
                    break
                node = ("rep", node, count)
            items.append(node)
        return ("seq", items)

    def repetition_count(self) -> int | None:
        """The largest count of a repetition after an atom: ``{n}``, ``{n,}`` -> n, ``{n,m}`` -> m;
        1 for ``*``, ``+``, ``?``; None when no repetition follows."""
        c = self._peek()
        if c in ("*", "+", "?"):
            self.pos += 1
            count = 1
        elif c == "{":
            close = self.text.index("}", self.pos)
            lo, _, hi = self.text[self.pos + 1 : close].replace(" ", "").partition(",")
            count = int(hi) if hi else int(lo)
            self.pos = close + 1
        else:
            return None
        if self._peek() == "?":  # lazy
            self.pos += 1
        return count

    def atom(self) -> _Node:
        c = self._peek()
        if c == "(":
            return self._group()
        if c == "[":
            return ("atom", self._class())
        self.pos += 1
        if c == ".":
            return ("atom", _WIDE)
        if c == "\\":
            return ("atom", self._escape())
        if c in ("^", "$"):
            return ("atom", 0)
        return ("atom", _LITERAL)

    def _group(self) -> _Node:
        self.pos += 1
        if self._peek() == "?":
            self.pos += 1
            if self.text.startswith("P<", self.pos) or self._peek() == "<":
                self.pos = self.text.index(">", self.pos) + 1
            else:
                while self._peek() not in (":", ")"):
                    if not self._peek():
                        raise _Unreadable
                    self.pos += 1
                self.pos += 1
                if self.text[self.pos - 1] == ")":  # (?flags) sets flags for the rest: no group
                    return ("atom", 0)
        inside = self.alternation()
        if self._peek() != ")":
            raise _Unreadable
        self.pos += 1
        return inside

    def _escape(self) -> int:
        """The weight of the escape after a backslash (``pos`` is past the backslash)."""
        c = self._peek()
        self.pos += 1
        if c in ("p", "P", "x", "u", "U") and self._peek() == "{":
            self.pos = self.text.index("}", self.pos) + 1
        elif c in ("p", "P"):
            self.pos += 1  # \pL
        if c in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[c]
        return 0 if c in _ZERO_WIDTH else _LITERAL

    def _class(self) -> int:
        """The weight of a bracketed class at ``pos`` (nested classes and set operations included)."""
        self.pos += 1
        weight = _ASCII_CLASS
        if self._peek() == "^":
            weight = _WIDE
            self.pos += 1
        if self._peek() == "]":  # a leading ] is a literal
            self.pos += 1
        while self._peek() != "]":
            c = self._peek()
            if not c:
                raise _Unreadable
            if c == "[" and self._peek(1) == ":":
                self.pos = self.text.index(":]", self.pos) + 2
            elif c == "[":
                weight = max(weight, self._class())
            elif c == "\\":
                self.pos += 1
                start = self.pos
                w = self._escape()
                if self.text[start] in _CLASS_ESCAPES:
                    weight = max(weight, w)
                elif (
                    self.text[start] in "xuU" and int(self.text[start + 1 : self.pos].strip("{}"), 16) >= 0x80
                ):
                    weight = max(weight, _WIDE)
            else:
                if ord(c) >= 0x80:
                    weight = max(weight, _WIDE)
                self.pos += 1
        self.pos += 1
        return weight
