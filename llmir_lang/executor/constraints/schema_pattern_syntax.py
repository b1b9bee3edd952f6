"""A schema ``pattern`` read as llguidance reads it (Rust ``regex`` syntax), for ``schema_pattern_nul``.

``parse(pattern)`` gives a small tree: alternations of sequences of items, each item an atom (one
character of a set: a literal, a class, a Perl or Unicode escape, ``.``), a group, or a zero-width
item (an anchor, a flag setter), with its quantifier and its span in the text. Of each atom's set
only the characters that matter to JSON quoting are known (``CritSet``: U+0000-U+001F, ``"``,
``\\``), each as in, out or unknown (a Unicode property whose table is not at hand).
``shorthand_escapes(pattern)``: where each ``\\d \\D \\w \\W \\s \\S`` stands, in which union of
class items, and whether the set holds that union's characters (``schema_pattern_shorthand``).

``PatternInvalid``: the text uses what Rust's syntax refuses (look-around, a backreference, an
unknown escape, an unbalanced group or class); the engine then refuses the pattern itself.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace

from llmir_lang.executor.constraints.schema_pattern_sets import (
    CRITICAL,
    EMPTY,
    PERL_SETS,
    POSIX_SETS,
    CritSet,
    property_set,
)


class PatternInvalid(ValueError):
    """Rust's regex syntax would refuse this pattern (the message says where and why)."""


@dataclass(frozen=True, slots=True)
class Shorthand:
    """A ``\\d``-like escape at ``start:end``, one of the items of union ``union`` (a class's items
    between set operators, or the escape alone outside a class). ``polarity``: 1 where the set
    holds the union's characters, -1 where it holds the others (``[^...]``, right of ``--``), 0
    where neither (under ``~~``)."""

    start: int
    end: int
    letter: str
    union: int
    polarity: int


@dataclass(slots=True)
class Atom:
    """One character out of a set: ``text`` as written, ``chars`` its critical characters,
    ``char`` the code point when it is one literal character."""

    text: str
    chars: CritSet
    char: int | None = None


@dataclass(slots=True)
class Zero:
    """A zero-width item: an anchor (``^``, ``$``, ``\\A``, ``\\z``, ...) or a flag setter ``(?i)``."""

    text: str
    anchor: bool


@dataclass(slots=True)
class Group:
    """``opener`` (``(``, ``(?:``, ``(?P<n>``, ``(?i:``) and the alternation inside, up to ``)``."""

    opener: str
    body: Alt


@dataclass(slots=True)
class Item:
    node: Atom | Zero | Group
    text: str  # the item as written, quantifier included
    quant: str = ""  # the quantifier as written ("" for none)
    low: int = 1
    high: int | None = 1  # None: unbounded


@dataclass(slots=True)
class Alt:
    branches: list[list[Item]] = field(default_factory=list)


_HEX = re.compile(r"x([0-9a-fA-F]{2})|x\{([0-9a-fA-F]{1,8})\}|u([0-9a-fA-F]{4})|u\{([0-9a-fA-F]{1,8})\}"
                  r"|U([0-9a-fA-F]{8})|U\{([0-9a-fA-F]{1,8})\}")  # fmt: skip
_SIMPLE = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "a": 0x07}
_COUNTED = re.compile(r"\{\s*(\d+)\s*(?:(,)\s*(\d*)\s*)?\}")
_FLAGS = re.compile(r"\(\?([imsUuxR-]*)(:|\))")
_NAMED = re.compile(r"\(\?P?<([A-Za-z_][A-Za-z0-9_.\[\]]*)>")
_POSIX_CLASS = re.compile(r"\[:(\^?)([a-z]+):\]")
_ANCHORS = {"A": r"\A", "z": r"\z", "b": r"\b", "B": r"\B", "<": r"\<", ">": r"\>"}


class _Reader:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.verbose = [False]  # (?x) per group level
        self.multiline = False  # some (?m): '^' / '$' may match at line ends
        self.shorthands: list[Shorthand] = []
        self.union: tuple[int, int] | None = None  # (id, polarity) of the class items being read
        self.unions = itertools.count()

    def fail(self, why: str) -> PatternInvalid:
        return PatternInvalid(f"{why} at offset {self.i} of {self.s!r}")

    def skip_blank(self) -> None:
        while self.verbose[-1] and self.i < len(self.s):
            c = self.s[self.i]
            if c.isspace():
                self.i += 1
            elif c == "#":
                end = self.s.find("\n", self.i)
                self.i = len(self.s) if end < 0 else end + 1
            else:
                return

    def alternation(self, depth: int) -> Alt:
        alt = Alt([self.sequence(depth)])
        while self.i < len(self.s) and self.s[self.i] == "|":
            self.i += 1
            alt.branches.append(self.sequence(depth))
        return alt

    def sequence(self, depth: int) -> list[Item]:
        items: list[Item] = []
        while True:
            self.skip_blank()
            if self.i >= len(self.s) or self.s[self.i] in "|)":
                if self.i < len(self.s) and self.s[self.i] == ")" and depth == 0:
                    raise self.fail("unopened group")
                return items
            start = self.i
            node = self.atom(depth)
            item = Item(node, self.s[start : self.i])
            while True:
                self.skip_blank()
                quant_start = self.i
                counts = self.quantifier()
                if counts is None:
                    break
                if isinstance(node, Zero):
                    # a repeated anchor is read as one; one that may be left out anchors nothing
                    node = Zero(node.text, node.anchor and counts[0] > 0)
                elif item.quant:
                    # a repeated repetition (a**): one more group around the first
                    node = Group("(?:", Alt([[item]]))
                    item = Item(node, "(?:" + item.text + ")")
                quant = self.s[quant_start : self.i]
                item = Item(node, item.text + quant, quant, *counts)
            items.append(item)

    def quantifier(self) -> tuple[int, int | None] | None:
        s, i = self.s, self.i
        if i >= len(s) or s[i] not in "*+?{":
            return None
        if s[i] == "{":
            m = _COUNTED.match(s, i)
            if m is None:
                raise self.fail("bad counted repetition")
            low = int(m.group(1))
            high = None if m.group(2) and not m.group(3) else int(m.group(3) or low)
            if high is not None and high < low:
                raise self.fail("repetition range reversed")
            self.i = m.end()
        else:
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[s[i]]
            self.i = i + 1
        if self.i < len(s) and s[self.i] == "?":
            self.i += 1  # lazy: the same language
        return low, high

    def atom(self, depth: int) -> Atom | Zero | Group:
        s, i = self.s, self.i
        c = s[i]
        if c in "*+?{":
            raise self.fail("repetition of nothing")
        if c == "(":
            return self.group(depth)
        if c == "[":
            self.i += 1
            negated = s.startswith("^", self.i)
            self.i += negated
            chars = self.class_body(-1 if negated else 1)
            return Atom(s[i : self.i], ~chars if negated else chars)
        self.i += 1
        if c == ".":
            return Atom(".", CritSet(CRITICAL - {0x0A, 0x0D}, frozenset()))
        if c in "^$":
            return Zero(c, True)
        if c == "\\":
            return self.escape(in_class=False)
        return Atom(c, CritSet.of({ord(c)}), ord(c))

    def group(self, depth: int) -> Group | Zero:
        s, start = self.s, self.i
        if s.startswith(("(?=", "(?!", "(?<=", "(?<!"), start):
            raise self.fail("look-around")
        m = _FLAGS.match(s, start) if s.startswith("(?", start) else None
        named = _NAMED.match(s, start) if m is None else None
        if s.startswith("(?", start) and m is None and named is None:
            raise self.fail("unknown group")
        verbose = self.verbose[-1]
        if m is not None:
            on, _, off = m.group(1).partition("-")
            self.multiline = self.multiline or "m" in on
            verbose = True if "x" in on else False if "x" in off else verbose
            self.i = m.end()
            if m.group(2) == ")":  # a flag setter: the rest of the enclosing group
                self.verbose[-1] = verbose
                return Zero(s[start : self.i], False)
        else:
            self.i = named.end() if named is not None else start + 1
        opener = s[start : self.i]
        self.verbose.append(verbose)
        body = self.alternation(depth + 1)
        self.verbose.pop()
        if self.i >= len(s) or s[self.i] != ")":
            raise self.fail("unclosed group")
        self.i += 1
        return Group(opener, body)

    def escape(self, in_class: bool) -> Atom | Zero:
        """After a backslash (``self.i`` on the escaped character)."""
        s, start = self.s, self.i - 1
        if self.i >= len(s):
            raise self.fail("trailing backslash")
        c = s[self.i]
        m = _HEX.match(s, self.i)
        if m is not None:
            self.i = m.end()
            point = int(next(g for g in m.groups() if g is not None), 16)
            return Atom(s[start : self.i], CritSet.of({point}), point)
        self.i += 1
        if c in _SIMPLE:
            return Atom(s[start : self.i], CritSet.of({_SIMPLE[c]}), _SIMPLE[c])
        if c.lower() in PERL_SETS:
            union, polarity = self.union or (next(self.unions), 1)
            self.shorthands.append(Shorthand(start, self.i, c, union, polarity))
            chars = PERL_SETS[c.lower()]
            return Atom(s[start : self.i], ~chars if c.isupper() else chars)
        if c in "pP":
            if s.startswith("{", self.i):
                end = s.find("}", self.i)
                if end < 0:
                    raise self.fail("unclosed \\p{")
                name, self.i = s[self.i + 1 : end], end + 1
            elif self.i < len(s):
                name, self.i = s[self.i], self.i + 1
            else:
                raise self.fail("\\p without a name")
            negated = (c == "P") != name.startswith("^")
            chars = property_set(name.lstrip("^"))
            return Atom(s[start : self.i], ~chars if negated else chars)
        if not in_class and c in _ANCHORS:
            if c == "b" and s.startswith("{", self.i):
                self.i = s.find("}", self.i) + 1 or len(s)
            return Zero(s[start : self.i], True)
        if c.isascii() and not c.isalnum() and (in_class or c not in "<>"):
            return Atom(s[start : self.i], CritSet.of({ord(c)}), ord(c))
        raise self.fail(f"escape \\{c} (no octal, backreference or {c!r} escape in Rust's syntax)")

    def class_body(self, polarity: int) -> CritSet:
        """After ``[`` (and ``^``): the set up to the matching ``]``, which it consumes; ``polarity``
        of its items as ``Shorthand`` tells."""
        s = self.s
        result: CritSet | None = None
        op = ""
        union = EMPTY
        first = True
        outer, inside, symmetric = self.union, len(self.shorthands), False
        self.union = (next(self.unions), polarity)
        while True:
            if self.verbose[-1]:
                while self.i < len(s) and s[self.i].isspace():
                    self.i += 1
            if self.i >= len(s):
                raise self.fail("unclosed class")
            if s[self.i] == "]" and not first:
                self.i += 1
                self.union = outer
                if symmetric:  # each character of either side in or out by the other: no polarity
                    self.shorthands[inside:] = [replace(h, polarity=0) for h in self.shorthands[inside:]]
                return union if result is None else _apply(result, op, union)
            if s.startswith(("&&", "--", "~~"), self.i) and not first:
                result = union if result is None else _apply(result, op, union)
                op, union = s[self.i : self.i + 2], EMPTY
                self.union = (next(self.unions), -polarity if op == "--" else polarity)
                symmetric = symmetric or op == "~~"
                self.i += 2
                first = True
                continue
            union = union | self.class_item(first)
            first = False

    def class_item(self, first: bool) -> CritSet:
        s, i = self.s, self.i
        posix = _POSIX_CLASS.match(s, i)
        if posix is not None and posix.group(2) in POSIX_SETS:
            self.i = posix.end()
            chars = POSIX_SETS[posix.group(2)]
            return ~chars if posix.group(1) else chars
        if s[i] == "[":
            self.i += 1
            negated = s.startswith("^", self.i)
            self.i += negated
            inner = self.class_body((self.union[1] if self.union else 1) * (-1 if negated else 1))
            return ~inner if negated else inner
        low = self.class_char()
        if isinstance(low, CritSet):
            return low
        if s.startswith("-", self.i) and not s.startswith(("-]", "--"), self.i):
            self.i += 1
            high = self.class_char()
            if isinstance(high, CritSet) or high < low:
                raise self.fail("bad class range")
            return CritSet.of({p for p in CRITICAL if low <= p <= high})
        return CritSet.of({low})

    def class_char(self) -> int | CritSet:
        if self.i >= len(self.s):
            raise self.fail("unclosed class")
        c = self.s[self.i]
        self.i += 1
        if c != "\\":
            return ord(c)
        atom = self.escape(in_class=True)
        if isinstance(atom, Zero):
            raise self.fail("anchor in a class")
        return atom.char if atom.char is not None else atom.chars


def _apply(left: CritSet, op: str, right: CritSet) -> CritSet:
    return left & right if op == "&&" else left - right if op == "--" else left ^ right


def _read(pattern: str) -> tuple[_Reader, Alt]:
    if (len(pattern) - len(pattern.rstrip("\\"))) % 2:
        pattern = pattern[:-1]  # the engine drops a last, lone backslash (llguidance.regex_to_lark)
    reader = _Reader(pattern)
    alt = reader.alternation(0)
    if reader.i != len(pattern):
        raise reader.fail("unopened group")
    return reader, alt


def parse(pattern: str) -> tuple[Alt, bool]:
    """The tree of ``pattern`` (module doc) and whether a ``(?m)`` flag makes ``^`` / ``$`` line
    anchors; ``PatternInvalid`` where Rust's syntax refuses it. The items' texts spell what the
    engine reads, which a rewrite may put together anew."""
    reader, alt = _read(pattern)
    return alt, reader.multiline


def shorthand_escapes(pattern: str) -> list[Shorthand]:
    """Every ``\\d \\D \\w \\W \\s \\S`` of ``pattern`` in order (``Shorthand``); ``PatternInvalid``
    as ``parse``."""
    return _read(pattern)[0].shorthands
