"""Printer and parser: exact round trips on hand-written programs, string escapes, syntax errors."""

from __future__ import annotations

import pytest

from llmir_lang.errors import IRParseError
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
    %12 = select %11 "ok" {choices = ["yes", "no"], choices_method = "greedy"}
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
    text = QA.replace("temperature = 0.0", "temperature = 1e-05, top_k = 3, top_p = inf")
    gen = parse_ir(text).functions[0].ops[9]
    assert gen.attrs["temperature"] == 1e-05 and gen.attrs["top_p"] == float("inf")
    assert isinstance(gen.attrs["top_k"], int)
    assert print_ir(parse_ir(text)) == text


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
    # A constraint that would be dangerous if evaluated stays an inert string.
    payload = "__import__('os').system('false')"
    text = QA.replace("temperature = 0.0", f'grammar = "{payload}"')
    gen = parse_ir(text).functions[0].ops[9]
    assert gen.attrs["grammar"] == payload
