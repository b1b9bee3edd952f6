"""``grammar=`` against its oracle, lark itself: every text the engine completes under a plain lark
grammar parses with ``lark.Lark(grammar, parser="earley")``, and a grammar the engine would
enforce otherwise (or could not run) is refused up front, naming what (``lark_checks``)."""

from __future__ import annotations

import random

import lark
import numpy as np
import pytest

from llmir_lang.dsl.errors import DSLError
from llmir_lang.executor.constraints import (
    ConstraintSpec,
    GrammarSyntaxError,
    UnsatisfiableConstraintError,
    UnsupportedGrammarError,
    allocate_bitmask,
    spec_from_grammar,
)
from llmir_lang.executor.constraints.llguidance_backend import text_matches

# grammars a user writes, each in plain lark; all must keep working, and their outputs parse
GRAMMARS = {
    "arithmetic": """
        start: expr
        ?expr: expr "+" term | expr "-" term | term
        ?term: term "*" factor | factor
        ?factor: NUMBER | "(" expr ")" | "-" factor
        %import common.NUMBER
    """,
    "sql": """
        start: "SELECT"i cols "FROM"i CNAME [where]
        cols: "*" | CNAME ("," CNAME)*
        where: "WHERE"i CNAME OP (SIGNED_NUMBER | ESCAPED_STRING)
        OP: "=" | "<" | "<=" | ">" | ">=" | "!="
        %import common (CNAME, SIGNED_NUMBER, ESCAPED_STRING, WS)
        %ignore WS
    """,
    "json": """
        ?start: value
        ?value: object | array | ESCAPED_STRING | SIGNED_NUMBER -> number | "true" | "false" | "null"
        array: "[" [value ("," value)*] "]"
        object: "{" [pair ("," pair)*] "}"
        pair: ESCAPED_STRING ":" value
        %import common.ESCAPED_STRING
        %import common.SIGNED_NUMBER
        %import common.WS
        %ignore WS
    """,
    "csv": """
        start: row ("\\n" row)~0..2
        row: field ("," field)*
        field: FIELD?
        FIELD: /[^,\\n"]+/ | ESCAPED_STRING
        %import common.ESCAPED_STRING
    """,
    "shapes": """
        start: _item+ ["!"] "b"i~2..3 -> shaped
        _item: ITEM | "(" _item ")"
        ITEM: /[0-9]+(\\.[0-9]+)?/ | "x"i
    """,
    "unicode_words": """
        start: WORD ("→" WORD)~0..2
        WORD: /\\w+/
    """,
    "ambiguous_left_recursive": """
        start: e
        e: e "+" e | e e | "a" | empty "b"
        empty:
    """,
}


def _lark(text: str) -> lark.Lark:
    return lark.Lark(text, parser="earley")


def _walk(compiled, tokenizer, rng: random.Random, max_tokens: int = 40) -> str | None:
    """A random generation: any allowed token, EOS with some chance once the text is complete."""
    matcher = compiled.new_matcher()
    mask = allocate_bitmask(1, compiled.vocab_size)
    ids: list[int] = []
    for _ in range(max_tokens):
        if matcher.is_accepting() and (rng.random() < 0.3 or matcher.is_terminated()):
            return tokenizer.decode(ids)
        matcher.fill_bitmask(mask, 0)
        bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[: compiled.vocab_size]
        allowed = [t for t in np.flatnonzero(bits).tolist() if t not in compiled.eos_token_ids]
        if not allowed:
            return tokenizer.decode(ids) if matcher.is_accepting() else None
        token = rng.choice(allowed)
        assert matcher.advance(token)
        ids.append(token)
    return None


@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_every_completed_text_parses_with_lark(name, sp_info, sp_hf):
    from llmir_lang.executor.constraints import ConstraintCompiler

    text = GRAMMARS[name]
    oracle = _lark(text)
    compiled = ConstraintCompiler(sp_info).compile(spec_from_grammar(text))
    done = 0
    for seed in range(25):
        out = _walk(compiled, sp_hf, random.Random(f"{name}/{seed}"))
        if out is not None:
            done += 1
            oracle.parse(out)  # raises on a text lark rejects
    assert done >= 5


def test_a_repeat_range_right_after_a_case_insensitive_literal_parses():
    """llguidance's parser refused ``"x"i~1..2`` ("error parsing signed integer"), a lark grammar
    lark reads; a space before the ``~`` is all it needs."""
    for grammar in ('start: "b" "x"i~1..2\n', 'start: ("x"i)~2 "~" /~/  // a ~ comment\n'):
        spec = spec_from_grammar(grammar)
        assert text_matches(_engine(spec), "bxX" if "b" in grammar else "xX~~")


def test_escaped_string_is_lark_s_no_line_break_inside_the_quotes():
    """llguidance's common.ESCAPED_STRING took a raw line break inside the quotes; lark's does not
    (``.`` stops at one), so the engine generated strings lark then rejected."""
    for grammar in (
        "start: ESCAPED_STRING\n%import common.ESCAPED_STRING\n",
        "start: S\n%import common.ESCAPED_STRING -> S\n",
        "start: ESCAPED_STRING WS?\n%import common (WS, ESCAPED_STRING)\n",
    ):
        spec = spec_from_grammar(grammar)
        oracle = _lark(grammar)
        for text, ok in (('"a\nb"', False), ('"a\\"b\\\\"', True), ('"\\\n"', False), ('"é\\n"', True)):
            assert bool(text_matches(_engine(spec), text)) is ok, (grammar, text)
            assert _parses(oracle, text) is ok
        assert spec_from_grammar(spec.value) == spec  # the rewrite is lark too, and reads the same


def test_unicode_classes_are_python_s():
    """``\\w`` is Python's (lark's) class, not Rust's: no combining marks, nor joiners."""
    grammar = "start: W\nW: /\\w+/ /[\\d\\s]/\n"
    spec, oracle = spec_from_grammar(grammar), _lark(grammar)
    for text in ("abc_9 ", "héllo٣", "हिन्दी1", "e\u0301x ", "a\u200db1", "x²1", "x\x1c"):
        assert bool(text_matches(_engine(spec), text)) is _parses(oracle, text), text


@pytest.mark.parametrize(
    ("regex", "feature", "fixed"),
    [
        ("/a+?/", "lazy quantifier", "/a+/"),
        ('/"(.*?)"/', "lazy quantifier", '/"([^"]*)"/'),
        ("/a|ab/", "regex alternative order", "/ab|a/"),
        ("/<|<=|>|>=/", "regex alternative order", "/<=|<|>=|>/"),
        ("/[0-9]+|[0-9]+\\.[0-9]+/", "regex alternative order", "/[0-9]+\\.[0-9]+|[0-9]+/"),
        ("/[[:alpha:]]+/", "nested character class", "/[a-zA-Z]+/"),
        ("/[a-z&&[^aeiou]]+/", "nested character class", "/[b-df-hj-np-tv-z]+/"),
    ],
)
def test_a_regex_lark_reads_otherwise_is_refused(regex, feature, fixed):
    """The engine has no lazy quantifiers and takes a regex's longest match, where lark's Python
    ``re`` stops at the first; Rust reads ``[[`` / ``&&`` in a class as set syntax, Python as
    characters. Before, the grammar was accepted and texts lark rejects came out finished."""
    with pytest.raises(UnsupportedGrammarError) as e:
        spec_from_grammar(f"start: T\nT: {regex}\n")
    assert e.value.feature == feature
    spec_from_grammar(f"start: T\nT: {fixed}\n")  # the fix the message suggests is accepted


@pytest.mark.parametrize(
    ("grammar", "feature"),
    [
        ('start: "a" E "b"\nE: /x*/\n', "a terminal matching the empty text"),
        ('start: row\nrow: /[^,]*/ ("," /[^,]*/)*\n', "a terminal matching the empty text"),
        ("start: /\\p{L}+/\n", "a regex Python's re cannot read"),
        ('start: _pair+\n_pair: "k" "=" "v" -> pair\n', "a grammar lark refuses"),
    ],
)
def test_a_grammar_lark_refuses_is_refused_unless_marked_llguidance(grammar, feature):
    with pytest.raises(UnsupportedGrammarError, match="lark refuses") as e:
        spec_from_grammar(grammar)
    assert e.value.feature == feature and "%llguidance {}" in str(e.value)
    marked = "%llguidance {}\n" + grammar
    assert spec_from_grammar(marked).value == marked  # the engine's own dialect, as written


@pytest.mark.parametrize(
    "grammar",
    [
        'start: A "a"\nA: /a+/\n',
        'start: "y" | "x" A "a"\nA: /a+/\n',
        'start: X "-"\nX: /-+/\n',
        "start: A B\nA: /(ab)+/\nB: /a/\n",
        'start: "q" /a+/ "a"\n',
        'start: "x" A " "\nA: / +/\n',
        'start: A "a"\nA: "b" "a"*\n',
        'start: (A | "z") "a"\nA: /a+/\n',
        'start: "x" A A | "y"\nA: /a+/\n',  # the first A is never at the text's end
        'start: A+ "a"\nA: /a+/\n',
        "start: A r | r\nr: A A\nA: /a+/\n",
    ],
)
def test_a_terminal_that_swallows_its_follower_is_refused_not_hung(grammar, compiler):
    """llguidance's forced-bytes loop never ends on these: the first mask computed where the
    terminal is being read hung the engine (the compile's own check, or a step mid-generation)."""
    with pytest.raises(UnsupportedGrammarError) as e:
        spec_from_grammar(grammar)
    assert e.value.feature == "terminal swallowing its follower"
    with pytest.raises(UnsupportedGrammarError):  # a spec built by hand: the compiler checks too
        compiler.compile(ConstraintSpec("grammar", grammar))


@pytest.mark.parametrize(
    "grammar",
    [
        'start: A "a"?\nA: /a+/\n',  # the text may end after A: nothing is forced
        'start: A "a" | A "b"\nA: /a+/\n',  # "b" can follow
        'start: A "a" | B\nA: /a+/\nB: /a+b/\n',  # B may be what is being read
        "start: LINE+\nLINE: /-+/\n",
        'start: X A "a" | Y A "b"\nX: "ab"\nY: /[ab]+/\nA: /a+/\n',  # "b" may follow where "a" does
        'start: r r\nr: A | "b"\nA: /a+/\n',
        'start: A "a"\nA: /a+/\n%import common.WS\n%ignore WS\n',
    ],
)
def test_terminals_that_end_in_a_repeat_are_fine_otherwise(grammar, compiler):
    compiler.compile(spec_from_grammar(grammar))


def test_a_terminal_made_only_of_ignored_text_is_refused():
    """With ``%ignore WS``, llguidance skips the text a ``" "`` or ``NEWLINE`` would read, so it
    never produced one (the value ran to ``max_tokens``), and where lark's longest-run skipping
    differs, texts lark rejects came out (``start: " " " "?`` finished ``"  "``)."""
    for grammar in (
        'start: "a" " " "b"\n%import common.WS\n%ignore WS\n',
        "start: (WORD NEWLINE)+\n%import common (WORD, NEWLINE, WS)\n%ignore WS\n",
        'start: " " " "?\n%import common.WS\n%ignore WS\n',
        'start: "#" WORD\n%import common.WORD\nC: /#[^\\n]*\\n/\n%ignore C\n',
    ):
        with pytest.raises(UnsupportedGrammarError, match="%ignore") as e:
            spec_from_grammar(grammar)
        assert e.value.feature == "ignored terminal"
    spec_from_grammar(
        "start: (WORD NEWLINE)+\n%import common (WORD, NEWLINE, WS_INLINE)\n%ignore WS_INLINE\n"
    )
    spec_from_grammar('start: F ("," F)*\nF: /[^,]+/\n%import common.WS\n%ignore WS\n')  # not only spaces


def test_a_rule_that_never_finishes_is_refused():
    """As the start rule nothing completes (the engine generated until ``max_tokens``); elsewhere
    lark drops the alternatives using it, while llguidance let a value start down one, then
    failed it (or gave up: "Too many items"), where lark would have steered clear."""
    for grammar in ('start: "a" start\n', 'start: a\na: "x" a | "z" a\n'):
        with pytest.raises(UnsatisfiableConstraintError, match="never finishes"):
            spec_from_grammar(grammar)
    for grammar in ('start: "x" | "aa" r+\nr: r+ | r\n', 'start: "x" | "a" r\nr: "b" r\n'):
        with pytest.raises(UnsupportedGrammarError, match=r"\['r'\] never finish") as e:
            spec_from_grammar(grammar)
        assert e.value.feature == "rule that never finishes"


@pytest.mark.parametrize(
    ("grammar", "hint"),  # priorities and templates: UnsupportedGrammarError, a GrammarSyntaxError
    [
        ('start: a | b\na.2: "x"\nb: "y"\n', "remove the .N"),
        ('start: KW | NAME\nKW.2: "if"\nNAME: /[a-z]+/\n', "remove the .N"),
        ('start: l{"x"}\nl{i}: "[" i "]"\n', "write each use out"),
        ("start: NUMBER\n%import common.NUMBER\n%override NUMBER: /[0-9]/\n", "%override is not supported"),
        ('top: "a"\n', "the start symbol is the rule named 'start'"),
        ("start: NAME\n%import python.NAME\n", "only %import common.NAME"),
    ],
)
def test_lark_features_the_engine_lacks_say_what_to_write(grammar, hint):
    with pytest.raises(GrammarSyntaxError, match="hint: ") as e:
        spec_from_grammar(grammar)
    assert hint in str(e.value)
    assert isinstance(e.value, UnsupportedGrammarError) is ("start" not in hint), "a named feature"


def test_llguidance_extensions_go_through_unchanged():
    for grammar in (
        'start: "ab" X\nX: /[a-c]/ & /[d-f]/\n',
        'start: "Answer: " ans\nans: %json {"type": "integer"}\n',
        'start: "a"{2,3}\n',
    ):
        assert spec_from_grammar(grammar).value == grammar


def test_error_positions_stay_the_user_s_lines():
    """The rewrite empties an import line and appends its definition, so a later line keeps its
    number in llguidance's errors."""
    with pytest.raises(GrammarSyntaxError) as e:
        spec_from_grammar('start: S x\n%import common.ESCAPED_STRING -> S\nx: ( "c"\n')
    assert e.value.line == 3


def test_the_finished_value_check_reads_the_grammar_as_the_engine_enforced_it():
    from llmir_lang.dsl.lowering import unfinished_value

    grammar = "start: ESCAPED_STRING\n%import common.ESCAPED_STRING\n"
    assert unfinished_value("x", {"grammar": grammar}, '"a\nb"') is not None
    assert unfinished_value("x", {"grammar": grammar}, '"a b"') is None


def test_gen_refuses_at_its_line():
    import llmir_lang as llmir

    with pytest.raises(DSLError, match="lazy") as e:
        llmir.gen("x", grammar='start: /a+?/ "!"\n')
    assert isinstance(e.value.__cause__, UnsupportedGrammarError)


def _engine(spec: ConstraintSpec) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(spec.value)


def _parses(oracle: lark.Lark, text: str) -> bool:
    try:
        oracle.parse(text)
    except lark.exceptions.LarkError:
        return False
    return True
