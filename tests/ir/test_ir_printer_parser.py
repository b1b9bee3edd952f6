"""Printer and parser: exact round trips on hand-written programs, string escapes, syntax errors."""

from __future__ import annotations

import pytest

from llmir_lang.errors import IRParseError, IRVerifyError
from llmir_lang.ir import ModuleBuilder, Op, Value, ValueType, parse_ir, print_ir
from llmir_lang.ir.module import Function, Module

QA = """\
module {
  func @qa(%q: text) {
    %0 = start
    %1 = role.begin %0 "system"
    %2 = text %1 "You are terse."
    %3 = role.end %2 "system"
    %4 = role.begin %3 "user"
    %5 = text %4 "Question: "
    %6 = append %5, %q
    %7 = role.end %6 "user"
    %8 = role.begin %7 "assistant"
    %9 = gen %8 "answer" {max_tokens = 64, stop = ["\\n", "Q:"], temperature = 0.0}
    %10 = role.end %9 "assistant"
    return %10
  }
}
"""

FORKS = """\
module {
  func @tips() {
    %0 = start
    %1 = text %0 "Here are two tips.\\n"
    %2, %3 = fork %1
    %4 = text %2 "Tip 1: "
    %5 = gen %4 "tip" {max_tokens = 32, regex = "[A-Z][a-z ]+\\\\."}
    %6 = text %3 "Tip 2: "
    %7 = gen %6 "tip" {json_schema = "{\\"type\\": \\"string\\"}", max_tokens = 32}
    %8 = join %1, %5, %7 {mode = "concat"}
    %9 = var %5 "tip"
    %10 = text %8 "Best: "
    %11 = append %10, %9
    %12 = select %11 "ok" {choices = ["yes", "no"], choices_method = "greedy_token_selection"}
    return %12, %5
  }
  func @"f.0 weird"(%a: text, %b: text) {
    %0 = start
    %1 = append %0, %a
    %2 = gen.chain %1 {segments = [{gen = "x", max_tokens = 4}, {text = "\\u00e9"}, {dtype = "int", gen = "y"}]}
    %3 = gen %2 "z" {branch_of = "g0", pin = "p0", pin_users = 2, seed = -3, top_p = 0.9}
    return %3
  }
}
"""


@pytest.mark.parametrize("text", [QA, FORKS, "module {\n}\n"])
def test_print_parse_is_exact(text: str) -> None:
    module = parse_ir(text)
    assert print_ir(module) == text
    assert parse_ir(print_ir(module)) == module


def test_builder_output_round_trips() -> None:
    mb = ModuleBuilder()
    f = mb.function("qa", params=["q"])
    s = f.text(f.start(), "Q: ")
    s = f.append(s, f.param("q"))
    a, b = f.fork(s, 2)
    a = f.gen(a, "x", max_tokens=8, temperature=1, stop="\n\n")  # int -> float, str -> [str]
    b = f.select(b, "y", ["a", "b"])
    f.ret(f.join(s, [a, b]))
    module = mb.build()
    assert parse_ir(print_ir(module)) == module
    gen = module.functions[0].ops[4]
    assert gen.attrs["temperature"] == 1.0 and isinstance(gen.attrs["temperature"], float)
    assert gen.attrs["stop"] == ("\n\n",)


@pytest.mark.parametrize(
    "literal",
    [
        "",
        'quote " and \\ backslash',
        "new\nline\ttab\rcr",
        "caf\u00e9 \u4e2d\u6587 \U0001f600",
        "\x00\x7f\u2028",
        "\ud800",
    ],
)
def test_string_literals_round_trip(literal: str) -> None:
    fn = Function(
        "f",
        (),
        (
            Op("start", (Value("0", ValueType.STATE),)),
            Op("text", (Value("1", ValueType.STATE),), (Value("0", ValueType.STATE),), literal),
            Op("return", (), (Value("1", ValueType.STATE),)),
        ),
    )
    text = print_ir(Module((fn,)))
    assert text.isascii()
    assert parse_ir(text).functions[0].ops[1].label == literal


def test_float_and_int_attrs_keep_their_type() -> None:
    text = QA.replace("temperature = 0.0", "temperature = 1e-05, top_k = 3, top_p = 0.5")
    gen = parse_ir(text).functions[0].ops[9]
    assert gen.attrs["temperature"] == 1e-05 and gen.attrs["top_p"] == 0.5
    assert isinstance(gen.attrs["top_k"], int)
    assert print_ir(parse_ir(text)) == text
    # inf parses (the verifier, not the parser, says top_p must be finite)
    text = QA.replace("temperature = 0.0", "top_p = inf, temperature = -inf")
    gen = parse_ir(text, verify=False).functions[0].ops[9]
    assert gen.attrs["top_p"] == float("inf") and gen.attrs["temperature"] == float("-inf")


def test_hand_written_text_with_comments_and_blank_lines() -> None:
    text = '// a comment\nmodule {   // trailing\n\n  func @f() {\n    %x = start\n\n    %y = text %x "caf\u00e9"\n    return %y\n  }\n}'
    module = parse_ir(text)
    assert module.functions[0].ops[1].label == "caf\u00e9"
    assert parse_ir(print_ir(module)) == module


@pytest.mark.parametrize(
    ("text", "line", "column", "fragment"),
    [
        ("module {\n  func @f() {\n    %0 = start %\n    return %0\n  }\n}\n", 3, 16, "unexpected character"),
        ("module {\n  func @f() {\n    %0 = strat\n    return %0\n  }\n}\n", 3, 10, "unknown op 'strat'"),
        (
            'module {\n  func @f() {\n    %0 = start\n    %1 = text %0 "a\\qb"\n    return %1\n  }\n}\n',
            4,
            20,
            "invalid escape",
        ),
        ("module {\n  func @f() {\n    %0 = start\n", 3, 15, "end of input"),
        ('module {\n  func @f() {\n    %0 = gen %0 "a" {k = 1, k = 2}\n  }\n}\n', 3, 29, "given twice"),
        ("module {\n  func @f(%q: state) {\n  }\n}\n", 2, 15, "must be 'text'"),
        ("module {\n  func @f() {\n    %0 = start {a = [1, }\n  }\n}\n", 3, 25, "unexpected"),
    ],
)
def test_parse_errors_give_line_and_column(text: str, line: int, column: int, fragment: str) -> None:
    with pytest.raises(IRParseError) as info:
        parse_ir(text)
    message = str(info.value)
    assert message.startswith(f"line {line}, column {column}:"), message
    assert fragment in message


def test_parsing_never_evaluates() -> None:
    # A constraint that would be dangerous if evaluated stays an inert string; the verifier reads
    # it as the lark grammar text it claims to be, which it is not.
    payload = "__import__('os').system('false')"
    text = QA.replace("temperature = 0.0", f'grammar = "{payload}"')
    gen = parse_ir(text, verify=False).functions[0].ops[9]
    assert gen.attrs["grammar"] == payload
    with pytest.raises(IRVerifyError, match="gen 'answer': grammar does not compile"):
        parse_ir(text)


def _gen_with(attr_value: str) -> str:
    return (
        "module {\n  func @f() {\n    %0 = start\n"
        f'    %1 = gen %0 "a" {{max_tokens = {attr_value}}}\n'
        "    return %1\n  }\n}\n"
    )


def test_an_integer_too_long_to_convert_is_a_parse_error() -> None:
    with pytest.raises(IRParseError) as info:
        parse_ir(_gen_with("5" * 5000))
    message = str(info.value)
    assert message.startswith("line 4, column 35:"), message
    assert "integer of 5000 digits is too long" in message
    assert len(message) < 500  # the 5000-digit line is shown around the column only


@pytest.mark.parametrize("open_, close", [("[", "]"), ("{a = ", "}")])
def test_deeply_nested_attribute_values_are_a_parse_error(open_: str, close: str) -> None:
    with pytest.raises(IRParseError, match=r"^line 4, column \d+: lists and dicts nest more than 64 deep"):
        parse_ir(_gen_with(open_ * 3000 + "1" * (open_ != "[") + close * 3000), verify=False)


def test_nesting_up_to_the_limit_round_trips_and_one_more_is_refused() -> None:
    from llmir_lang.ir.attrs import MAX_ATTR_DEPTH

    deepest = "[" * MAX_ATTR_DEPTH + "]" * MAX_ATTR_DEPTH
    text = _gen_with("1").replace("max_tokens = 1", f"max_tokens = 1, trie_x = {deepest}")
    module = parse_ir(text, verify=False)
    assert print_ir(module) == text
    with pytest.raises(IRParseError, match="nest more than"):
        parse_ir(text.replace(deepest, "[" + deepest + "]"), verify=False)
    # the builder refuses what the parser would refuse, so that everything built prints and parses
    mb = ModuleBuilder()
    f = mb.function("f")
    value: object = []
    for _ in range(MAX_ATTR_DEPTH):
        value = [value]
    with pytest.raises(IRVerifyError, match="nest more than 64 deep"):
        f.op("select", [f.start()], "c", {"choices": ["a"], "trie": value})
    with pytest.raises(IRVerifyError, match="more than 4300 digits"):
        f.gen(f.start(), "x", seed=10**5000)


def test_a_leading_bom_and_cr_or_crlf_line_ends_are_accepted() -> None:
    module = parse_ir(QA)
    for text in (
        "\ufeff" + QA,
        QA.replace("\n", "\r\n"),
        QA.replace("\n", "\r"),
        "\ufeff" + QA.replace("\n", "\r"),
    ):
        assert parse_ir(text) == module
    # errors count lines the same way
    broken = QA.replace("%6 = append %5, %q", "%6 = append %5 %q").replace("\n", "\r")
    with pytest.raises(IRParseError, match=r"^line 9, column 20: unexpected"):
        parse_ir("\ufeff" + broken)


def test_unicode_identifier_value_names_round_trip() -> None:
    names = ["caf\u00e9", "\u6570\u91cf", "\u0939\u093f\u0928\u094d\u0926\u0940", "x\u0301", "q"]
    mb = ModuleBuilder()
    f = mb.function("f", params=names)
    s = f.start()
    for name in names:
        s = f.append(s, f.param(name))
    f.ret(s)
    module = mb.build()
    text = print_ir(module)
    assert "func @f(%caf\u00e9: text, %\u6570\u91cf: text," in text
    assert "%1 = append %0, %caf\u00e9" in text
    assert parse_ir(text) == module
    assert print_ir(parse_ir(text)) == text
    # hand-written: a non-ASCII result name too
    hand = "module {\n  func @f() {\n    %\u00e9tat = start\n    return %\u00e9tat\n  }\n}\n"
    assert print_ir(parse_ir(hand)) == hand


@pytest.mark.parametrize(("name", "bad"), [("a\u20acb", "\u20ac"), ("\u00a7", "\u00a7")])
def test_a_value_name_with_a_non_identifier_character_is_a_parse_error(name: str, bad: str) -> None:
    text = f"module {{\n  func @f(%{name}: text) {{\n    %0 = start\n    return %0\n  }}\n}}\n"
    with pytest.raises(IRParseError) as info:
        parse_ir(text)
    message = str(info.value)
    assert message.startswith("line 2, column 11:"), message
    assert f"{bad!r} cannot be in one" in message
