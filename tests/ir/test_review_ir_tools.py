"""The IR as a user meets it (review): deep fork nesting, what ``parse_ir`` / ``print_ir`` /
``verify`` say about wrong inputs, and the parser's messages for common hand-written mistakes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmir_lang.errors import IRError, IRParseError, IRVerifyError
from llmir_lang.ir import Module, ModuleBuilder, Op, parse_ir, print_ir, verify
from llmir_lang.ir.module import Function, fork_transparent_users
from llmir_lang.optimizer import DEFAULT_PIPELINE, PassManager


def _nested_forks(depth: int) -> tuple[Module, str]:
    """A shared prefix read by a gen ``depth`` single-branch forks down and by a gen beside them."""
    mb = ModuleBuilder()
    f = mb.function("f")
    shared = f.text(f.start(), "A shared prefix, long enough to be planned. ")
    s = shared
    for _ in range(depth):
        (s,) = f.fork(s, 1)
    f.ret(f.gen(s, "x", max_tokens=1), f.gen(shared, "y", max_tokens=1))
    return mb.build(), shared.name


def test_forks_nested_thousands_deep_are_looked_through_without_recursion() -> None:
    # A program that forks in a loop: prefix-share's user count recursed once per fork level and
    # raised RecursionError past ~1000 levels (and took seconds, quadratic, well before that).
    module, shared = _nested_forks(3000)
    users = fork_transparent_users(module.functions[0])
    assert [op.label for op in users[shared]] == ["x", "y"]
    optimized = PassManager(DEFAULT_PIPELINE).run(module)
    assert 'pin = "p0", pin_users = 2' in print_ir(optimized)
    assert parse_ir(print_ir(optimized)) == optimized


def _reference_users(fn: Function) -> dict[str, list[Op]]:
    """``fork_transparent_users`` as its docstring defines it, recursively (small inputs only)."""
    direct: dict[str, list[Op]] = {}
    for op in fn.ops:
        if op.operands:
            direct.setdefault(op.operands[0].name, []).append(op)

    def collect(name: str) -> list[Op]:
        out: list[Op] = []
        for op in direct.get(name, []):
            if op.kind == "fork":
                out.extend(x for r in op.results for x in collect(r.name))
            else:
                out.append(op)
        return out

    return {name: collect(name) for name in direct}


@st.composite
def _forky_functions(draw: st.DrawFn) -> Function:
    mb = ModuleBuilder()
    f = mb.function("f")
    states = [f.start()]
    for i in range(draw(st.integers(1, 12))):
        s = draw(st.sampled_from(states))
        kind = draw(st.sampled_from(["text", "fork", "gen"]))
        if kind == "fork":
            states.extend(f.fork(s, draw(st.integers(1, 3))))
        elif kind == "gen":
            states.append(f.gen(s, f"v{i}", max_tokens=1))
        else:
            states.append(f.text(s, "t"))
    f.ret(*draw(st.lists(st.sampled_from(states), min_size=1, max_size=2)))
    return mb.build().functions[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_forky_functions())
def test_fork_transparent_users_keeps_its_meaning_and_order(fn: Function) -> None:
    assert fork_transparent_users(fn) == _reference_users(fn)


def test_parse_ir_reads_utf8_bytes() -> None:
    text = "module {\n  func @f(%café: text) {\n    %0 = start\n    %1 = append %0, %café\n    return %1\n  }\n}\n"
    assert parse_ir(text.encode("utf-8")) == parse_ir(text)  # a file read in binary mode
    assert parse_ir(b"\xef\xbb\xbf" + text.encode("utf-8")) == parse_ir(text)  # with a byte order mark
    with pytest.raises(IRParseError, match=r"line 2: byte \d+ \(b'\\xff'\) is not UTF-8"):
        parse_ir(b"module {\n\xff\n}\n")


@pytest.mark.parametrize("value", [None, 42, ["module {", "}"]])
def test_parse_ir_of_something_else_than_text_says_what_it_got(value: object) -> None:
    with pytest.raises(IRParseError, match=f"takes the IR text as a str .*got {type(value).__name__}"):
        parse_ir(value)  # type: ignore[arg-type]


def test_print_ir_and_verify_of_something_else_than_a_module_say_what_to_pass() -> None:
    module = parse_ir("module {\n  func @f() {\n    %0 = start\n    return %0\n  }\n}\n")
    for wrong, hint in (
        (module.functions[0], r"a Function; wrap it: Module\(\(fn,\)\)"),
        (print_ir(module), r"a str; parse_ir\(text\)"),
        (None, "NoneType None"),
    ):
        with pytest.raises(IRError, match="print_ir takes a Module, got " + hint):
            print_ir(wrong)  # type: ignore[arg-type]
        with pytest.raises(IRVerifyError, match="verify takes a Module, got " + hint):
            verify(wrong)  # type: ignore[arg-type]


def test_print_ir_of_a_program_says_to_trace_it() -> None:
    import llmir_lang as llmir

    @llmir.function
    def prog(s):
        s += "hi"

    with pytest.raises(IRError, match=r"an @llmir.function program; trace it first: print_ir\(f.trace"):
        print_ir(prog)  # type: ignore[arg-type]


def test_a_string_left_open_is_named_as_such() -> None:
    text = 'module {\n  func @f() {\n    %0 = start\n    %1 = text %0 "Q: what\n    return %1\n  }\n}\n'
    with pytest.raises(IRParseError) as info:
        parse_ir(text)
    message = str(info.value)
    assert message.startswith("line 4, column 18: this string is not closed on its line"), message
    assert "\\n for a line break" in message
    # a closed string where none may stand is still "unexpected"
    with pytest.raises(IRParseError, match="unexpected") as info:
        parse_ir('module {\n  func @f("x") {\n  }\n}\n')
    assert "not closed" not in str(info.value)


@pytest.mark.parametrize("text", ["", "\n\n", "  \t\n", "\ufeff"])
def test_empty_text_is_called_empty(text: str) -> None:
    with pytest.raises(IRParseError, match="the IR text is empty; a module is written 'module {'"):
        parse_ir(text)
