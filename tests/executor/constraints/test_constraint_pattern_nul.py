"""Schema patterns with a character set llguidance 1.9 quoted wrong (``schema_pattern_nul``).

A set holding every control character (or all but U+000A) and not both '"' and '\\' let them
through escaped: under ``^[^"]*$`` the JSON text ``"a\\"b"`` was accepted, whose value the
validator rejects. Now every such ``pattern`` / ``patternProperties`` name compiles to a matcher
that accepts the JSON text of a string exactly when the pattern matches it, or is refused naming
itself. The oracle is Python's ``re`` on patterns both dialects read alike (``$`` as ``\\Z``:
Python's ``$`` also matches before a final newline, Rust's does not).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import validators

from llmir_lang.executor.constraints import (
    InvalidRegexError,
    UnsupportedSchemaError,
    spec_from_json_schema,
    spec_from_regex,
)
from llmir_lang.executor.constraints.schema_pattern_nul import PatternFix, exact_pattern, may_quote_wrong
from llmir_lang.executor.constraints.schema_pattern_syntax import parse
from llmir_lang.executor.constraints.testing import accepts_text, sample_text

# '"', '\', controls (U+0000 too), a letter the patterns name, non-ASCII, a line separator
CHARS = ['"', "\\", "\x00", "\x01", "\n", "\t", "\x1f", " ", "a", "b", ",", "é", "😀", "\u2028"]


def _text(value: Any) -> str:
    # llguidance writes U+007F escaped (its JSON strings take no raw DEL); json.dumps does not
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("\x7f", "\\u007f")


def _matches(pattern: str, s: str) -> bool:
    return re.search(re.sub(r"\$$", r"\\Z", pattern), s) is not None


def _strings(n: int = 240, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = {"", *CHARS, *(a + b for a in CHARS for b in CHARS), *(f"a{c}b" for c in CHARS)}
    out |= {f"{c}{c}a{c}" for c in CHARS} | {f"{c}{d}a{c}{d}" for c in CHARS for d in '"a'}
    out |= {f"a{c}a{d}b" for c in CHARS for d in '"\\\x00b'}
    while len(out) < n + len(CHARS) ** 2:
        out.add("".join(rng.choice(CHARS) for _ in range(rng.randint(3, 7))))
    return sorted(out)


@pytest.fixture(scope="module")
def chars(bpe_hf) -> set[int]:
    return {t for t in range(len(bpe_hf)) if len(bpe_hf.decode([t])) == 1}


def _agrees(compiled, tok, pattern: str, strings: list[str], oracle: str | None = None) -> None:
    verdicts = set()
    for s in strings:
        valid = _matches(oracle or pattern, s)
        verdicts.add(valid)
        assert accepts_text(compiled, tok, _text(s)).accepted == valid, (pattern, s, valid)
    assert verdicts == {True, False}, pattern


@pytest.mark.parametrize(
    ("written", "quoted_wrong"),
    [
        ('[^"]', True), ("[^\\\\]", True), ('[^"\\\\]', True), ("[\\x00-\\x1f]", True), ('[^"\\n]', True),
        ("\\p{Cc}", True), ("[[:cntrl:]]", True), ("\\P{Po}", True), ('[[^"]&&[^a]]', True),
        ('[^"\\x01]', False), ('[^"\\x00]', False), ('[^"\\r]', False), ("\\S", False), (".", False),
        ("\\D", False), ("\\W", False), ("[^a]", False), ('[\\x00-\\x1f"\\\\]', False),
        ("\\p{sc=Greek}", False), ('[[^"]--[\\x00]]', False),
    ],
)  # fmt: skip
def test_sets_the_engine_quotes_wrong_are_told_apart(written, quoted_wrong):
    atom = parse(written)[0].branches[0][0].node
    assert may_quote_wrong(atom.chars) is quoted_wrong


@pytest.mark.parametrize(
    ("pattern", "fix"),
    [
        ('^[^"]*$', PatternFix('^(?:[[^"]--\\x00]|\\x00[[^"]--\\x00]*)*$')),
        ('^a[^"]b$', PatternFix('^a(?:[[^"]--\\x00]b|\\x00b)$')),
        ('x[^"]', PatternFix('x(?:[[^"]--\\x00]|\\x00(?s:.)*)')),
        ('^[^"]{1,255}$', PatternFix('^(?:[[^"]--\\x00]|\\x00[[^"]--\\x00]*)*$', 1, 255)),
        ('^[^"\\x00]*$', None),
        ("^\\S+$", None),
    ],
)
def test_patterns_take_the_documented_forms(pattern, fix):
    assert exact_pattern(pattern, True) == fix


PATTERNS = [
    '^[^"]*$', "^[^\\\\]+$", '^a[^"]b$', '^[^"]{1,3}$', '^a[^"]{0,2}b$', 'a[^"]', '^a[^"]$', '^a[^"]?$',
    '^(?:[^"\\\\]|\\\\.)*$', '^([^,"]+,)*[^,"]+$', "[\\x00-\\x1f]", '^[^"]{2}a[^"]{1,2}$', '^[^"]{2,}a$',
    '[^"]|a', '^(?:[^"]|\\x00)*$', '^(?:a[^"]|b)a$', '(?x) ^ [^"] {0,2} \\x2c $', "^(?:a[^\\\\]){2}b$", '^(?:a[^"])?b$',
]  # fmt: skip


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_accept_exactly_the_strings_they_match(compiler, bpe_hf, pattern):
    compiled = compiler.compile(spec_from_json_schema({"type": "string", "pattern": pattern}))
    _agrees(compiled, bpe_hf, pattern, _strings())


@pytest.mark.parametrize("additional", [False, {"type": "string"}, None])
def test_pattern_property_names(compiler, bpe_hf, additional):
    schema: dict[str, Any] = {"type": "object", "patternProperties": {'^a[^"]*b$': {"type": "integer"}}}
    if additional is not None:
        schema["additionalProperties"] = additional
    compiled = compiler.compile(spec_from_json_schema(schema))
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    verdicts = set()
    for s in _strings(120):
        for value in (1, "x"):
            valid = cls(schema).is_valid({s: value})
            verdicts.add(valid)
            assert accepts_text(compiled, bpe_hf, _text({s: value})).accepted == valid, (s, value)
    assert verdicts == {True, False}


@pytest.mark.parametrize(
    ("pattern", "oracle"),
    [("^\\p{Cc}+$", "^[\\x00-\\x1f\\x7f-\\x9f]+$"), ("^[[:cntrl:]]*a$", "^[\\x00-\\x1f\\x7f]*a$")],
)
def test_unicode_and_posix_classes_of_controls(compiler, bpe_hf, pattern, oracle):
    """Python's ``re`` reads neither ``\\p{...}`` nor ``[[:cntrl:]]``: the oracle spells the set."""
    compiled = compiler.compile(spec_from_json_schema({"type": "string", "pattern": pattern}))
    _agrees(compiled, bpe_hf, pattern, _strings(120), oracle)


@pytest.mark.parametrize(
    ("schema", "keyword", "path", "pattern"),
    [
        ({"properties": {"p": {"type": "string", "pattern": '^(?:a[^"])+$'}}}, "pattern", "#/properties/p",
         '^(?:a[^"])+$'),
        ({"patternProperties": {'^a[^"]$': {}}, "additionalProperties": False}, "patternProperties", "#",
         '^a[^"]$'),
        ({"type": "string", "pattern": '^[a-z]+[^"]{1,9}$'}, "pattern", "#", '^[a-z]+[^"]{1,9}$'),
        # the engine lifts the shared b+ and merges what follows into one set holding U+0000
        ({"type": "string", "pattern": '^(?:x|b+[^"\\x00]|b+\\x00)$'}, "pattern", "#",
         '^(?:x|b+[^"\\x00]|b+\\x00)$'),
    ],
)  # fmt: skip
def test_no_exact_rewrite_is_refused_naming_the_pattern(compiler, schema, keyword, path, pattern):
    with pytest.raises(UnsupportedSchemaError) as e:
        compiler.compile(spec_from_json_schema(schema))
    assert (e.value.keyword, e.value.path) == (keyword, path)
    assert repr(pattern) in str(e.value) and "\\x00" in str(e.value)


@pytest.mark.parametrize(
    ("written", "fix"),
    [
        ('(?x) [^"] * # any', '(?x)(?:[[^"]--\\x00]|\\x00[[^"]--\\x00]*)*'),
        ('[]"]a**[^"]*', '[]"](?:a*)*(?:[[^"]--\\x00]|\\x00[[^"]--\\x00]*)*'),  # ']' first: a character
        ('a[^"]\\', 'a(?:[[^"]--\\x00]|\\x00(?s:.)*)'),  # the engine drops a last, lone backslash
        ('(?P<n>[^"])b', '(?:(?:[[^"]--\\x00])b|\\x00b)'),  # a named group may be written twice
    ],
)
def test_syntax_is_read_as_the_engine_reads_it(written, fix):
    result = exact_pattern(written, True)
    assert (result.pattern if isinstance(result, PatternFix) else result) == fix


def test_sets_quoted_right_are_left_as_written(compiler):
    for pattern in ('^[^"\\x00]*$', "^\\S+$", "^.*$", "^[^a]+$"):
        compiled = compiler.compile(spec_from_json_schema({"type": "string", "pattern": pattern}))
        assert not [note for note in compiled.meta.rewrites if "U+0000" in note], pattern


def test_a_pattern_the_engine_refuses_keeps_its_own_error(compiler):
    with pytest.raises(InvalidRegexError, match=r"pattern '\^\[\^\"\]\(\?=x\)' at # .*look-around"):
        compiler.compile(spec_from_json_schema({"type": "string", "pattern": '^[^"](?=x)'}))


def test_regex_constraints_are_raw_text_and_unaffected(compiler, bpe_hf):
    compiled = compiler.compile(spec_from_regex('a[^"]*b'))
    assert not accepts_text(compiled, bpe_hf, 'a"b').accepted
    assert accepts_text(compiled, bpe_hf, "a\\b").accepted
    assert accepts_text(compiled, bpe_hf, "a\x00b").accepted


# --- random patterns and strings ----------------------------------------------------------------
_CLASSES = ['[^"]', "[^\\\\]", '[^"\\\\]', "[\\x00-\\x1f]", '[^,"]', '[^a"]']
_QUANTS = ["", "?", "*", "+", "{2}", "{0,2}", "{1,3}", "{2,}"]
_LITERALS = ["a", "b", ",", "\\\\.", "(?:a|b)"]


@st.composite
def _patterns(draw) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            part = draw(st.sampled_from(_CLASSES)) + draw(st.sampled_from(_QUANTS))
        else:
            part = draw(st.sampled_from(_LITERALS))
        if draw(st.integers(0, 5)) == 0:
            other = draw(st.sampled_from(_LITERALS + _CLASSES))
            part = f"(?:{part}|{other})" + draw(st.sampled_from(_QUANTS))
        parts.append(part)
    return draw(st.sampled_from(["", "^"])) + "".join(parts) + draw(st.sampled_from(["", "$"]))


_STRINGS = st.lists(st.text(st.sampled_from([*CHARS, "\x7f"]), max_size=7), min_size=30, max_size=30)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_patterns(), _STRINGS)
def test_random_patterns_match_as_python_reads_them_or_are_refused(compiler, bpe_hf, chars, pattern, strings):
    try:
        compiled = compiler.compile(spec_from_json_schema({"type": "string", "pattern": pattern}))
    except UnsupportedSchemaError as e:
        assert e.keyword == "pattern" and "U+0000" in str(e), e
        return
    for s in strings + CHARS:
        valid = _matches(pattern, s)
        assert accepts_text(compiled, bpe_hf, _text(s)).accepted == valid, (pattern, s, valid)
    for i in range(3):
        out = sample_text(compiled, bpe_hf, random.Random(i), chars, 40, 0.3 if i else None)
        if out is not None:
            assert _matches(pattern, json.loads(out)), (pattern, out)
