"""Verifier: each rule has a failing case with a message that names the problem."""

from __future__ import annotations

import re

import pytest

from llmir_lang.errors import IRVerifyError
from llmir_lang.ir import (
    SAMPLING_TO_ENGINE,
    Module,
    ModuleBuilder,
    Op,
    Value,
    ValueType,
    parse_ir,
    print_ir,
    verify,
)
from llmir_lang.ir.attrs import AttrValue, sampling_problem
from llmir_lang.ir.module import Function


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
%6 = gen %5 "b"
%7 = var %3 "a"
%8 = append %6, %7
return %8
"""
)


def test_valid_program_with_same_name_in_separate_scopes() -> None:
    # Each fork branch is its own scope; after the join the parent's chain is another one.
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
        # attribute values the engine or the interpreter would reject at run time
        (
            '%0 = start\n%1 = select %0 "a" {choices = ["x"], choices_method = "bogus"}\nreturn %1',
            "",
            "choices_method must be one of",
        ),
        ('%0 = start\n%1 = gen %0 "a" {max_tokens = -5}\nreturn %1', "", "max_tokens must be >= 0, got -5"),
        (
            '%0 = start\n%1 = gen %0 "a" {top_p = 7.0}\nreturn %1',
            "",
            "top_p must be finite and in (0, 1], got 7.0",
        ),
        ('%0 = start\n%1 = gen %0 "a" {temperature = -1.0}\nreturn %1', "", "temperature must be"),
        ('%0 = start\n%1 = gen %0 "a" {temperature = inf}\nreturn %1', "", "temperature must be finite"),
        (
            '%0 = start\n%1 = gen %0 "a" {max_tokens = 2, min_tokens = 3}\nreturn %1',
            "",
            "min_tokens (3) is larger",
        ),
        ('%0 = start\n%1 = gen %0 "a" {stop = ["x", ""]}\nreturn %1', "", "stop strings must not be empty"),
        ('%0 = start\n%1 = gen %0 "a" {stop_token_ids = [-1]}\nreturn %1', "", "stop_token_ids must be"),
        (
            '%0 = start\n%1 = gen.chain %0 {segments = [{gen = "x", top_p = 0.0}, {text = "-"}, {gen = "y"}]}\n'
            "return %1",
            "",
            "gen segment 0: top_p must be",
        ),
        ('%0 = start\n%1 = text %0 "x" {pin = "zz", pin_users = -3}\nreturn %1', "", "pin_users"),
        # roles: known names, no nesting, an end closes the open role
        ('%0 = start\n%1 = role.begin %0 "wizard"\nreturn %1', "", "unknown role 'wizard'"),
        (
            '%0 = start\n%1 = role.begin %0 "user"\n%2 = role.begin %1 "assistant"\nreturn %2',
            "",
            "role 'assistant' opened inside role 'user'",
        ),
        (
            '%0 = start\n%1 = role.begin %0 "user"\n%2 = role.end %1 "system"\nreturn %2',
            "",
            "role 'system' closed but role 'user' is open",
        ),
        (
            '%0 = start\n%1 = role.end %0 "user"\n%2 = role.end %1 "user"\nreturn %2',
            "",
            "role 'user' closed but no role is open",
        ),
        (
            '%0 = start\n%1 = role.begin %0 "user"\n%2, %3 = fork %1\n%4 = text %2 "a"\n'
            '%5 = join %1, %4 {mode = "gather"}\n%6 = role.begin %5 "system"\nreturn %6',
            "",
            "opened inside role 'user'",
        ),
        # a variable a joined branch defined is taken in the join's chain (as in the DSL)
        (
            '%0 = start\n%1, %2 = fork %0\n%3 = gen %1 "a"\n%4 = gen %2 "a"\n'
            '%5 = join %0, %3, %4 {mode = "gather"}\n%6 = gen %5 "a"\nreturn %6',
            "",
            "variable 'a' was already defined in the branches of `%5 = join",
        ),
        (
            '%0 = start\n%1, %2 = fork %0\n%3 = gen %1 "a"\n%4 = text %2 "b"\n'
            '%5 = join %0, %3, %4 {mode = "concat"}\n%6 = text %5 "c"\n'
            '%7 = select %6 "a" {choices = ["x"]}\nreturn %7',
            "",
            "already defined in the branches",
        ),
        (
            '%0 = start\n%1 = fork %0\n%2, %3 = fork %1\n%4 = gen %2 "a"\n'
            '%5 = join %1, %4 {mode = "gather"}\n%6 = join %0, %5 {mode = "gather"}\n'
            '%7, %8 = fork %6\n%9 = gen.chain %8 {segments = [{gen = "b"}, {text = "-"}, {gen = "a"}]}\n'
            "return %9",
            "",
            "already defined in the branches of `%6 = join",  # the inner join's, gathered again
        ),
        (
            '%0 = start\n%1 = fork %0\n%2 = gen %1 "a"\n%3 = join %0, %2 {mode = "gather"}\n'
            '%4 = var %3 "a"\nreturn %3',
            "",
            "read it from a branch state",
        ),
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


@pytest.mark.parametrize(
    "body",
    [
        # a DSL segment after a sync point starts with `start` and the text so far, maybe inside a role
        '%0 = start\n%1 = text %0 "<user>Q"\n%2 = role.end %1 "user"\n%3 = role.begin %2 "assistant"\nreturn %3',
        # a branch may close the parent's role; the join continues the parent's (still open) role
        '%0 = start\n%1 = role.begin %0 "user"\n%2, %3 = fork %1\n%4 = role.end %2 "user"\n'
        '%5 = text %3 "x"\n%6 = join %1, %4, %5 {mode = "gather"}\n%7 = role.end %6 "user"\nreturn %7',
        # the same variable name in sibling branches, and read from a branch after the join
        '%0 = start\n%1, %2 = fork %0\n%3 = gen %1 "a"\n%4 = gen %2 "a"\n%5 = join %0, %3, %4 {mode = "gather"}\n'
        '%6 = var %4 "a"\n%7 = append %5, %6\nreturn %7',
        # engine ranges: the edges are allowed
        '%0 = start\n%1 = gen %0 "a" {max_tokens = 0, min_tokens = 0, top_p = 1.0, min_p = 0.0, '
        "frequency_penalty = -2.0, presence_penalty = 2.0, temperature = 0.0, top_k = -1, seed = -3}\nreturn %1",
        '%0 = start\n%1 = select %0 "a" {choices = ["x"], choices_method = "sum_logprob"}\nreturn %1',
        '%0 = start\n%1 = select %0 "a" {choices = ["x"]}\nreturn %1',  # default method
    ],
)
def test_verifier_accepts(body: str) -> None:
    parse_ir(_fn(body))


def _module(params: tuple[Value, ...], ops: tuple[Op, ...]) -> Module:
    return Module((Function("f", params, ops),))


S0, S1 = Value("0", ValueType.STATE), Value("1", ValueType.STATE)


@pytest.mark.parametrize(
    ("module", "fragment"),
    [
        (
            _module(
                (Value("a b", ValueType.TEXT),),
                (
                    Op("start", (S0,)),
                    Op("append", (S1,), (S0, Value("a b", ValueType.TEXT))),
                    Op("return", (), (S1,)),
                ),
            ),
            "'a b' is not a valid value name",
        ),
        (
            _module(
                (),
                (
                    Op("start", (Value("x%y", ValueType.STATE),)),
                    Op("return", (), (Value("x%y", ValueType.STATE),)),
                ),
            ),
            "'x%y' is not a valid value name",
        ),
        (
            _module(
                (),
                (
                    Op("start", (S0,)),
                    Op("gen", (S1,), (S0,), "a", {"seed": 10**5000}),
                    Op("return", (), (S1,)),
                ),
            ),
            "more than 4300 digits",
        ),
        (
            _module(
                (),
                (
                    Op("start", (S0,)),
                    Op("select", (S1,), (S0,), "a", {"choices": ("x",), "trie": ({"p": float("nan")},)}),
                    Op("return", (), (S1,)),
                ),
            ),
            "NaN",
        ),
    ],
)
def test_verifier_rejects_what_would_not_print_and_parse_back(module: Module, fragment: str) -> None:
    with pytest.raises(IRVerifyError, match=re.escape(fragment)):
        verify(module)


def test_verifier_rejects_attribute_values_nested_too_deep_without_recursing() -> None:
    value: AttrValue = ()
    for _ in range(5000):  # deeper than Python's recursion limit
        value = (value,)
    select = Op("select", (S1,), (S0,), "a", {"choices": ("x",), "trie": value})
    with pytest.raises(IRVerifyError, match="nest more than 64 deep"):
        verify(_module((), (Op("start", (S0,)), select, Op("return", (), (S1,)))))


def test_verified_modules_with_unicode_names_round_trip() -> None:
    q = Value("caf\u00e9", ValueType.TEXT)
    module = _module((q,), (Op("start", (S0,)), Op("append", (S1,), (S0, q)), Op("return", (), (S1,))))
    verify(module)
    assert parse_ir(print_ir(module)) == module


def test_builder_checks_roles_methods_and_sampling_ranges_at_once() -> None:
    f = ModuleBuilder().function("f", params=["caf\u00e9"])
    s = f.start()
    with pytest.raises(IRVerifyError, match="unknown role 'wizard'"):
        f.role_begin(s, "wizard")
    with pytest.raises(IRVerifyError, match="unknown choices_method 'bogus'"):
        f.select(s, "x", ["a"], "bogus")
    with pytest.raises(IRVerifyError, match="max_tokens must be >= 0"):
        f.gen(s, "x", max_tokens=-5)
    with pytest.raises(IRVerifyError, match="top_p must be finite and in"):
        f.gen(s, "x", top_p=7)
    with pytest.raises(IRVerifyError, match="not a valid value name"):
        ModuleBuilder().function("g", params=["a b"])


# Values around every edge of the engine's ranges, per sampling parameter.
_PROBES: dict[str, list[object]] = {
    "max_tokens": [-1, 0, 5],
    "min_tokens": [-1, 0, 5],
    "top_logprobs_num": [-1, 0, 3],
    "temperature": [-0.5, 0.0, 0.7, 1e300, float("inf"), float("-inf")],
    "top_p": [-0.1, 0.0, 1e-9, 0.5, 1.0, 1.01, float("inf")],
    "min_p": [-0.1, 0.0, 1.0, 1.01],
    "frequency_penalty": [-2.01, -2.0, 0.0, 2.0, 2.01, float("inf")],
    "presence_penalty": [-2.01, -2.0, 2.0, 2.01],
    "repetition_penalty": [-1.0, 0.0, 1e-9, 1.0, float("inf")],
    "top_k": [-5, 0, 5],
    "seed": [-(2**70), 0, 2**70],
    "stop": [(), ("x",), ("",), ("x", "")],
    "stop_token_ids": [(), (0, 5), (-1,)],
}


def test_sampling_ranges_agree_with_the_engine() -> None:
    """The IR cannot import the executor; this keeps ``sampling_problem`` in step with it."""
    from llmir_lang.errors import InvalidRequestError
    from llmir_lang.executor.sampling_params import SamplingParams

    def engine_accepts(attrs: dict[str, object]) -> bool:
        kwargs = {SAMPLING_TO_ENGINE[k]: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}
        kwargs.setdefault("max_new_tokens", 10**9)  # the engine's default (128) is no IR rule
        try:
            SamplingParams(**kwargs)
        except InvalidRequestError:
            return False
        return True

    cases: list[dict[str, object]] = [{k: v} for k, values in _PROBES.items() for v in values]
    cases += [{"min_tokens": lo, "max_tokens": hi} for lo in (0, 3, 4) for hi in (0, 3)]
    for attrs in cases:
        assert (sampling_problem(attrs) is None) == engine_accepts(attrs), attrs  # type: ignore[arg-type]
