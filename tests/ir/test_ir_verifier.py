"""Verifier: each rule has a failing case with a message that names the problem."""

from __future__ import annotations

import pytest

from llmir_lang.errors import IRVerifyError
from llmir_lang.ir import ModuleBuilder, parse_ir


def _fn(body: str, params: str = "") -> str:
    lines = "\n".join("    " + line for line in body.strip().splitlines())
    return f"module {{\n  func @f({params}) {{\n{lines}\n  }}\n}}\n"


VALID = _fn(
    """
%0 = start
%1, %2 = fork %0
%3 = gen %1 "a"
%4 = gen %2 "a"
%5 = join %0, %3, %4 {mode = "gather"}
%6 = gen %5 "a"
%7 = var %3 "a"
%8 = append %6, %7
return %8
"""
)


def test_valid_program_with_same_name_in_separate_scopes() -> None:
    # Each fork branch, and the parent's chain after the join, is its own scope.
    parse_ir(VALID)


@pytest.mark.parametrize(
    ("body", "params", "fragment"),
    [
        ('%0 = start\n%1 = text %7 "a"\nreturn %1', "", "%7 is used before it is defined"),
        ('%0 = start\n%1 = text %2 "a"\n%2 = text %0 "b"\nreturn %1', "", "%2 is used before it is defined"),
        ("%0 = start\n%0 = start\nreturn %0", "", "%0 is defined twice"),
        ("%q = start\nreturn %q", "%q: text", "%q is defined twice"),
        (
            '%0 = start\n%1 = gen %0 "x"\n%2 = text %1 "!"\n%3 = select %2 "x" {choices = ["a"]}\nreturn %3',
            "",
            "variable 'x' is defined twice in one scope",
        ),
        (
            '%0 = start\n%1 = gen.chain %0 {segments = [{gen = "x"}, {text = "-"}, {gen = "x"}]}\nreturn %1',
            "",
            "defined twice in one scope",
        ),
        (
            '%0 = start\n%1 = start\n%2 = text %1 "b"\n%3 = join %0, %2 {mode = "gather"}\nreturn %3',
            "",
            "join of unrelated states",
        ),
        (
            '%0 = start\n%1, %2 = fork %0\n%3 = join %1, %2 {mode = "gather"}\nreturn %3',
            "",
            "join of unrelated states",
        ),
        (
            '%0 = start\n%1 = text %0 "a"\n%2 = join %1, %1 {mode = "gather"}\nreturn %2',
            "",
            "the join's parent itself",
        ),
        (
            '%0 = start\n%1 = text %0 "a"\n%2 = join %0, %1, %1 {mode = "gather"}\nreturn %2',
            "",
            "joined twice",
        ),
        ('%0 = start\n%1 = text %0 "a"\n%2 = join %0, %1 {mode = "zip"}\nreturn %2', "", "mode"),
        ('%0 = start\n%1 = var %0 "x"\nreturn %0', "", "variable 'x' is not defined in the scope of %0"),
        (
            '%0 = start\n%1, %2 = fork %0\n%3 = gen %1 "x"\n%4 = var %2 "x"\nreturn %0',
            "",
            "not defined in the scope",
        ),
        ('%0 = start\n%1 = text %0 "a"', "", "must end with `return"),
        ("%0 = start\nreturn %0\n%1 = start", "", "return must be the last op"),
        ("%0 = start\n%1 = append %0, %0\nreturn %1", "", "operand 1 (%0) is state but append needs text"),
        ("%0 = start\n%1 = text %q\nreturn %1", "%q: text", "needs a string argument"),
        ('%0 = start\n%1 = text %0 "a" "b"\nreturn %1', "", ""),
        ('%0 = start\n%1 = gen %0 "a" {max_token = 3}\nreturn %1', "", "unknown attribute 'max_token'"),
        ('%0 = start\n%1 = gen %0 "a" {max_tokens = "3"}\nreturn %1', "", "'max_tokens' must be int"),
        (
            '%0 = start\n%1 = gen %0 "a" {regex = "x", json_schema = "{}"}\nreturn %1',
            "",
            "several constraints",
        ),
        ('%0 = start\n%1 = gen %0 "a" {dtype = "complex"}\nreturn %1', "", "dtype must be one of"),
        ('%0 = start\n%1 = select %0 "a"\nreturn %1', "", "needs a 'choices'"),
        ('%0 = start\n%1 = select %0 "a" {choices = ["x", "x"]}\nreturn %1', "", "distinct"),
        ('%0 = start\n%1 = gen %0 ""\nreturn %1', "", "non-empty name"),
        (
            '%0 = start\n%1 = gen.chain %0 {segments = [{gen = "x"}, {text = "-"}]}\nreturn %1',
            "",
            "begin and end with a gen",
        ),
        ("%0 = start\nreturn", "", "at least 1 operand"),
        ("%0 = start %0\nreturn %0", "", "takes 0 operand"),
    ],
)
def test_verifier_errors(body: str, params: str, fragment: str) -> None:
    with pytest.raises(Exception) as info:
        parse_ir(_fn(body, params))
    if fragment:
        assert isinstance(info.value, IRVerifyError), info.value
        assert fragment in str(info.value), str(info.value)
        assert "in function @f" in str(info.value)


def test_error_names_the_line() -> None:
    with pytest.raises(IRVerifyError, match=r"\(line 4\): %7 is used before"):
        parse_ir(_fn('%0 = start\n%1 = text %7 "a"\nreturn %1'))


def test_duplicate_function_names() -> None:
    text = "module {\n  func @f() {\n    %0 = start\n    return %0\n  }\n  func @f() {\n    %0 = start\n    return %0\n  }\n}\n"
    with pytest.raises(IRVerifyError, match="@f is defined twice"):
        parse_ir(text)


def test_builder_rejects_bad_calls_immediately() -> None:
    mb = ModuleBuilder()
    f = mb.function("f", params=["q"])
    s = f.start()
    with pytest.raises(IRVerifyError, match="unknown parameter"):
        f.gen(s, "x", max_token=3)
    with pytest.raises(IRVerifyError, match="has no parameter 'r'"):
        f.param("r")
    with pytest.raises(IRVerifyError, match="must be text"):
        f.append(s, s)
    with pytest.raises(IRVerifyError, match="NaN"):
        f.gen(s, "x", temperature=float("nan"))
    with pytest.raises(IRVerifyError, match="omit a key"):
        f.gen(s, "x", seed=None)
    with pytest.raises(IRVerifyError, match="defined twice in this module"):
        mb.function("f")
    with pytest.raises(IRVerifyError, match="no return"):
        mb.build()
    s = f.gen(s, "x")
    f.gen(s, "x")  # recorded; the duplicate name is a verifier (scope) error at build
    f.ret(s)
    with pytest.raises(IRVerifyError, match="defined twice in one scope"):
        mb.build()
    with pytest.raises(IRVerifyError, match="already returned"):
        f.start()
