"""A plain lark grammar rewritten so that llguidance reads it as lark does, line for line.

llguidance reads a lark grammar in its own dialect. Two differences change which texts a grammar
allows, and both are a matter of spelling, so they are rewritten rather than refused:

- ``%import common.ESCAPED_STRING``: llguidance's takes a raw line break inside the quotes, lark's
  (``".*?..."``, ``.`` stops at a line break) does not. The import becomes lark's language spelled
  without a lazy quantifier or a look-behind; so does ``C_COMMENT``'s (llguidance already agrees on
  it, but lark's own spelling is lazy, which ``lark_checks`` refuses in a user's regex).
- ``\\w \\d \\s`` (and ``\\W \\D \\S``) in a regex: lark's are Python's (``str.isalnum``, ``isdecimal``,
  ``isspace``), llguidance's Rust's, which take combining marks (the vowel signs of Devanagari:
  ``"हिन्दी"`` is one ``\\w+`` to llguidance, not to Python), joiners and the letters of newer Unicode
  versions. Each becomes the explicit ranges of Python's class, which both read alike.

One more is llguidance's parser alone: it refuses a repeat range written right after a
case-insensitive literal (``"x"i~1..2``: "error parsing signed integer"), so a ``~`` gets a space
before it (``space_repeat_ranges``).

Definitions are appended and an import line is emptied, so every line keeps its number and an
error's position is still the user's.
"""

from __future__ import annotations

import functools
import re
import sys

# lark's own token for a regex literal (lark/load_grammar.py), and its flags
_REGEX_LITERAL = re.compile(r"/(?!/)(\\/|\\\\|[^/])*?/[imslux]*")
_STRING_LITERAL = re.compile(r'"(\\\\|\\"|[^"\n])*?"i?')

# lark's languages of these terminals, spelled greedily (one way to match each text)
_EXACT_COMMON = {
    "ESCAPED_STRING": r'/"([^"\\\n]|\\.)*"/',
    "C_COMMENT": r"/\/\*([^*]|\*+[^*\/])*\*+\//",
}
_IMPORT_ONE = re.compile(r"^(\s*)%import\s+common\.(\w+)(?:\s*->\s*(\w+))?\s*(//[^\n]*)?$")
_IMPORT_LIST = re.compile(r"^(\s*)%import\s+common\s*\(([^)]*)\)\s*(//[^\n]*)?$")


def rewrite_for_engine(text: str) -> str:
    """``text`` (a grammar lark's parser reads) with the rewrites above; the same text when none
    applies."""
    return _rewrite_imports(_rewrite_class_escapes(space_repeat_ranges(text)))


def space_repeat_ranges(text: str) -> str:
    """``text`` with a space before each lark repeat operator ``~`` that follows a character
    (``"x"i~1..2`` -> ``"x"i ~1..2``); strings, regexes and comments untouched."""
    if "~" not in text:
        return text
    out, last = [], 0
    for start, end in _code_spans(text):
        for i in range(start, end):
            if text[i] == "~" and i > 0 and not text[i - 1].isspace():
                out.append(text[last:i] + " ")
                last = i
    out.append(text[last:])
    return "".join(out)


def _code_spans(text: str) -> list[tuple[int, int]]:
    """The spans of ``text`` outside its literals and comments."""
    spans, start = [], 0
    for a, b in _literal_spans(text, with_strings=True):
        spans.append((start, a))
        start = b
    spans.append((start, len(text)))
    return spans


def _rewrite_imports(text: str) -> str:
    lines = text.split("\n")
    defined: list[str] = []
    for i, line in enumerate(lines):
        one = _IMPORT_ONE.match(line)
        if one and one.group(2) in _EXACT_COMMON:
            defined.append(f"{one.group(3) or one.group(2)}: {_EXACT_COMMON[one.group(2)]}")
            lines[i] = ""
            continue
        many = _IMPORT_LIST.match(line)
        if many:
            names = [n.strip() for n in many.group(2).split(",") if n.strip()]
            kept = [n for n in names if n not in _EXACT_COMMON]
            if len(kept) < len(names):
                defined += [f"{n}: {_EXACT_COMMON[n]}" for n in names if n in _EXACT_COMMON]
                lines[i] = f"{many.group(1)}%import common ({', '.join(kept)})" if kept else ""
    if not defined:
        return text
    return "\n".join(lines) + "\n" + "\n".join(defined) + "\n"


def regex_literals(text: str) -> list[tuple[int, int]]:
    """The (start, end) spans of the ``/regex/flags`` literals of a lark grammar, found as lark's
    lexer finds them: strings and comments skipped."""
    return _literal_spans(text, with_strings=False)


def _literal_spans(text: str, with_strings: bool) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i) or c == "#":
            j = text.find("\n", i)
            end = n if j < 0 else j
            if with_strings:
                spans.append((i, end))
            i = end
        elif c == '"':
            m = _STRING_LITERAL.match(text, i)
            end = m.end() if m else i + 1
            if with_strings:
                spans.append((i, end))
            i = end
        elif c == "/":
            m = _REGEX_LITERAL.match(text, i)
            if m is None:
                i += 1
                continue
            spans.append((i, m.end()))
            i = m.end()
        else:
            i += 1
    return spans


def _rewrite_class_escapes(text: str) -> str:
    spans = regex_literals(text)
    if not any(re.search(r"\\[wWdDsS]", text[a:b]) for a, b in spans):
        return text
    out, last = [], 0
    for a, b in spans:
        out.append(text[last:a])
        out.append(_rewrite_regex(text[a:b]))
        last = b
    out.append(text[last:])
    return "".join(out)


def _rewrite_regex(literal: str) -> str:
    """One ``/body/flags`` literal with Python's ``\\w \\d \\s`` (and negations) spelled out; a
    body with an inline flag group is left alone (``(?a)`` makes them ASCII in Python only)."""
    end = literal.rindex("/")
    body, flags = literal[1:end], literal[end:]
    if "(?" in body and re.search(r"\(\?[a-zA-Z-]*a", body):
        return literal
    out: list[str] = []
    i, in_class, class_start = 0, False, -1
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            e = body[i + 1]
            if e in "wWdDsS":
                ranges = _class_ranges(e)
                out.append(ranges if in_class else f"[{ranges}]")
            else:
                out.append(body[i : i + 2])
            i += 2
            continue
        if not in_class and c == "[":
            in_class, class_start = True, i
        elif in_class and c == "]" and i > class_start + 1 and body[class_start + 1 : i] != "^":
            in_class = False  # a "]" right after "[" or "[^" is a member, in Python and Rust
        out.append(c)
        i += 1
    return "/" + "".join(out) + flags


@functools.lru_cache(maxsize=6)
def _class_ranges(escape: str) -> str:
    """Python's class for ``\\<escape>`` as ``\\UXXXXXXXX`` ranges (Python and Rust both read that
    form; surrogates, which no text holds and Rust's classes refuse, left out)."""
    member = {"w": lambda ch: ch.isalnum() or ch == "_", "d": str.isdecimal, "s": str.isspace}[escape.lower()]
    negate = escape.isupper()
    parts: list[str] = []
    start = None
    for code in range(sys.maxunicode + 2):
        inside = code <= sys.maxunicode and not 0xD800 <= code <= 0xDFFF and member(chr(code)) != negate
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            last = code - 1
            parts.append(f"\\U{start:08X}" if start == last else f"\\U{start:08X}-\\U{last:08X}")
            start = None
    return "".join(parts)
