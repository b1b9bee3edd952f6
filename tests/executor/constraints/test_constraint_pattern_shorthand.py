"""``\\d \\D \\w \\W \\s \\S`` in schema patterns (``schema_pattern_shorthand``).

llguidance 1.9 read ``\\d`` / ``\\w`` in a schema pattern as ASCII (ECMA-262) and ``\\s`` as Rust's
White_Space, so ``^\\W$`` took ``"é"`` and ``^\\D$`` took ``"٣"``, which the ``jsonschema`` validator
(Python's ``re``) rejects. Now a value the compiled constraint accepts passes both the validator
and an ECMA-262 reading (spelled here as a Python regex of ASCII classes and ECMA's white space),
and every character both readings take is accepted, except those Python's Unicode tables leave
unassigned (category Cn), whose letters and digits in the engine's newer tables stay out of
``\\W`` / ``\\D``.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from llmir_lang.executor.constraints import spec_from_json_schema
from llmir_lang.executor.constraints.schema_pattern_shorthand import narrow_shorthands
from llmir_lang.executor.constraints.testing import accepts_text

# ECMA-262's \s (WhiteSpace and LineTerminator) as the body of a Python class
ECMA_SPACE = "\t\n\x0b\x0c\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"


def _text(value: Any) -> str:
    # llguidance writes U+007F escaped (its JSON strings take no raw DEL); json.dumps does not
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("\x7f", "\\u007f")


def _sample() -> list[str]:
    """Latin-1, the white space of either reading, and from each general category its first and
    last 8 code points and 24 spread between (no surrogates: JSON text cannot carry them)."""
    by_category: dict[str, list[int]] = {}
    for point in range(sys.maxunicode + 1):
        by_category.setdefault(unicodedata.category(chr(point)), []).append(point)
    points = set(range(0x100)) | {p for p in range(0x3001) if chr(p).isspace()} | {0xFEFF, 0x180E}
    points |= {0x0345, 0x017F, 0x212A, 0x0663, 0xFF10, 0x11F50, 0x1C89, 0x10FFFF}
    for category, members in by_category.items():
        if category != "Cs":
            step = max(1, len(members) // 24)
            points |= {*members[:8], *members[-8:], *members[::step]}
    return [chr(p) for p in sorted(points) if not 0xD800 <= p <= 0xDFFF]


SAMPLE = _sample()

# (schema pattern, the same pattern as ECMA-262 reads it, in Python's syntax)
CASES = [
    ("^\\d$", "^[0-9]$"),
    ("^\\D$", "^[^0-9]$"),
    ("^\\w$", "^[A-Za-z0-9_]$"),
    ("^\\W$", "^[^A-Za-z0-9_]$"),
    ("^\\s$", f"^[{ECMA_SPACE}]$"),
    ("^\\S$", f"^[^{ECMA_SPACE}]$"),
    ("^[^\\d]$", "^[^0-9]$"),
    ("^[^\\w]$", "^[^A-Za-z0-9_]$"),
    ("^[\\W_]$", "^[^A-Za-z0-9]$"),
    ("^[\\s\\S]$", "^(?s:.)$"),
    ("^[\\d\\D]$", "^(?s:.)$"),
    ("^[^\\s]$", f"^[^{ECMA_SPACE}]$"),
    ("^[^\\S]$", f"^[{ECMA_SPACE}]$"),
    ("^[\\d\\s]$", f"^[0-9{ECMA_SPACE}]$"),
    ("^[^\\W\\d]$", "^[A-Za-z_]$"),
    ("^[\\d\\W]$", "^[^A-Za-z_]$"),
    ("^[a\\D]$", "^[^0-9]$"),
    ("^[^a\\s]$", f"^[^a{ECMA_SPACE}]$"),
]


def _python(pattern: str, value: str) -> bool:
    return Draft202012Validator({"type": "string", "pattern": pattern}).is_valid(value)


def _ecma(oracle: str, value: str) -> bool:
    return re.search(re.sub(r"\$$", r"\\Z", oracle), value) is not None


@pytest.mark.parametrize(("pattern", "oracle"), CASES)
def test_each_character_accepted_passes_both_readings(compiler, bpe_hf, pattern, oracle):
    compiled = compiler.compile(spec_from_json_schema({"type": "string", "pattern": pattern}))
    both_count = 0
    for c in SAMPLE:
        both = _python(pattern, c) and _ecma(oracle, c)
        both_count += both
        accepted = accepts_text(compiled, bpe_hf, _text(c)).accepted
        assert both or not accepted, (pattern, c, hex(ord(c)), "accepted, yet a reading rejects it")
        if unicodedata.category(c) != "Cn":
            assert accepted == both, (pattern, c, hex(ord(c)), "taken by both readings, yet rejected")
    assert 0 < both_count < len(SAMPLE) or pattern in ("^[\\s\\S]$", "^[\\d\\D]$"), pattern


@pytest.mark.parametrize(
    ("pattern", "values"),
    [
        ("^\\w+@\\w+\\.\\w{2,}$", ["a_1@b.cd", "é@b.cd", "a@b.c", "a@٣.cd", "ab@cd.ef"]),
        ("^\\S+\\s\\S+$", ["ab cd", "ab\tcd", "ab\x1ccd", "ab\x85cd", "ab\ufeffcd", "ab\xa0cd", "a b c"]),
        ("^\\D*\\d\\D*$", ["ab1cd", "a٣1", "ab", "12", "é1!"]),
        ("^[\\W_]+$", ["!_-", "_é", "?", "a!"]),
    ],
)
def test_strings_pass_both_readings(compiler, bpe_hf, pattern, values):
    compiled = compiler.compile(spec_from_json_schema({"type": "string", "pattern": pattern}))
    # ECMA-262's reading: \d / \w as Python's re.ASCII reads them, \s (outside classes here) spelled
    ecma = pattern.replace("\\S", f"[^{ECMA_SPACE}]").replace("\\s", f"[{ECMA_SPACE}]")
    for value in values:
        python_ok = _python(pattern, value)
        both = python_ok and re.search(ecma, value, re.ASCII) is not None
        assert accepts_text(compiled, bpe_hf, _text(value)).accepted == both, (pattern, value)


def test_pattern_property_names(compiler, bpe_hf):
    schema = {"type": "object", "patternProperties": {"^\\W+$": {"type": "integer"}}}
    schema["additionalProperties"] = False
    compiled = compiler.compile(spec_from_json_schema(schema))
    for name, valid in (("!?", True), ("é", False), ("٣", False), ("a", False), ("\u2028", True)):
        assert Draft202012Validator(schema).is_valid({name: 1}) == valid
        assert accepts_text(compiled, bpe_hf, _text({name: 1})).accepted == valid, name


@pytest.mark.parametrize(
    ("written", "engine_gets"),
    [
        ("^\\d+\\w$", "^\\d+\\w$"),  # the engine's ASCII reading is the narrower one
        ("\\D", "[^\\p{Nd}]"),
        ("\\W", "[^\\p{L}\\p{N}_]"),
        ("[^\\d]", "[^[\\p{Nd}]]"),
        ("[^\\D]", "[^\\D]"),
        ("[\\s\\S]", "[[\\x00-\\x{10FFFF}]]"),
        ("[\\W_]", "[[^\\p{L}\\p{N}_]_]"),
        ("[\\w--\\d]", "[\\w--[\\p{Nd}]]"),
        ("[\\d~~a]", "[\\d~~a]"),  # no polarity: left as the engine reads it
        ("\\\\d", "\\\\d"),  # a backslash, then 'd'
        ("(?=\\D)", "(?=\\D)"),  # the engine refuses it, naming it
    ],
)
def test_rewrites_take_the_documented_forms(written, engine_gets):
    assert narrow_shorthands(written) == engine_gets


@pytest.mark.parametrize(("shorthand", "python_class"), [("\\W", r"\w"), ("\\D", r"\d")])
def test_no_code_point_of_pythons_class_is_taken(compiler, bpe_hf, shorthand, python_class):
    """Over every code point (these two lean on the engine's Unicode tables): the characters
    Python's ``re`` puts in ``\\w`` / ``\\d``, as one string, all pass the complement of the
    rewritten class, so none of them is in it. (The matcher is walked by ``advance`` alone: the
    masks of ~10^5 steps would take half a minute.)"""
    inside = re.compile(python_class)
    points = [chr(p) for p in range(sys.maxunicode + 1) if not 0xD800 <= p <= 0xDFFF]
    text = "".join(c for c in points if inside.match(c))
    pattern = f"^[^{narrow_shorthands(shorthand)}]*$"
    matcher = compiler.compile(spec_from_json_schema({"type": "string", "pattern": pattern})).new_matcher()
    ids = bpe_hf.encode(_text(text), add_special_tokens=False)
    assert all(matcher.advance(t) for t in ids) and matcher.is_accepting()
