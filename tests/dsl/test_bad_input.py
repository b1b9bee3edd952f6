"""Bad input: each mistake raises a typed error that names the program, the line and the cause."""

from __future__ import annotations

import inspect

import pytest

import llmir_lang as llmir
from llmir_lang.dsl import (
    DSLError,
    ForkError,
    InvalidAppendError,
    NoBackendError,
    ProgramArgumentError,
    ProgramDefinitionError,
    ProgramExecutionError,
    RoleError,
    UnknownVariableError,
    VariableRedefinedError,
)
from llmir_lang.errors import ProgramError
from llmir_lang.optimizer import PassPipelineError

HERE = "test_bad_input.py"


def _line_of(fn, needle: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if needle in line)


def _check(err: DSLError, program: str, line: int, *words: str) -> None:
    text = str(err)
    assert isinstance(err, ProgramError)
    assert f"program {program!r}" in text, text
    assert f"{HERE}:{line}" in text, text
    for w in words:
        assert w in text, text


def test_first_parameter_must_be_s():
    def bad(state, question):
        state += question

    with pytest.raises(ProgramDefinitionError) as e:
        llmir.function(bad)
    _check(e.value, "bad", bad.__code__.co_firstlineno, "'s'", "'state'")
    with pytest.raises(ProgramDefinitionError):
        llmir.function(lambda: None)


def test_reading_a_variable_never_produced(fake):
    def prog(s):
        s += "x" + llmir.gen("answer", max_tokens=2)
        s += s["anser"]  # typo

    with pytest.raises(UnknownVariableError) as e:
        llmir.function(prog).run(backend=fake)
    _check(e.value, "prog", _line_of(prog, "anser"), "'anser'", "answer")


def test_nested_roles(fake):
    def prog(s):
        with s.user():
            s += "hi"
            s += llmir.assistant("nested")

    with pytest.raises(RoleError) as e:
        llmir.function(prog).run(backend=fake)
    _check(e.value, "prog", _line_of(prog, "nested"), "nest", "'user'")


def test_errors_in_with_blocks_point_at_the_users_line(fake):
    def nested(s):
        with s.user():
            with s.assistant():  # the nested role
                s += "x"

    with pytest.raises(RoleError) as e:
        llmir.function(nested).run(backend=fake)
    _check(e.value, "nested", _line_of(nested, "the nested role"), "'user'")

    def scope_twice(s):
        s += llmir.gen("x", max_tokens=2)
        with s.var_scope("x"):  # the name is taken
            s += "y"

    with pytest.raises(VariableRedefinedError) as e:
        llmir.function(scope_twice).run(backend=fake)
    _check(e.value, "scope_twice", _line_of(scope_twice, "the name is taken"), "'x'")


def test_a_role_block_left_by_an_exception_is_closed(fake):
    @llmir.function
    def prog(s):
        try:
            with s.user():
                s += "hi"
                raise ValueError("caught below")
        except ValueError:
            pass
        s += llmir.assistant(llmir.gen("r", max_tokens=2))

    st = prog.run(backend=fake)
    assert [m["role"] for m in st.messages()] == ["user", "assistant"]


def test_variables_from_var_scope_and_join_cannot_be_overwritten(fake):
    def scoped(s):
        with s.var_scope("json"):
            s += "{" + llmir.gen("n", max_tokens=2) + "}"
        s["json"] = "overwritten"

    with pytest.raises(VariableRedefinedError) as e:
        llmir.function(scoped).run(backend=fake)
    _check(e.value, "scoped", _line_of(scoped, "overwritten"), "'json'")

    def joined(s):
        forks = s.fork(2)
        forks += llmir.gen("x", max_tokens=2)
        forks.join()
        s["x"] = "over"

    with pytest.raises(VariableRedefinedError) as e:
        llmir.function(joined).run(backend=fake)
    _check(e.value, "joined", _line_of(joined, '"over"'), "'x'")


def test_closing_a_role_that_is_not_open(fake):
    def prog(s):
        s += llmir.user_end()

    with pytest.raises(RoleError) as e:
        llmir.function(prog).run(backend=fake)
    _check(e.value, "prog", _line_of(prog, "user_end"), "no role")


def test_joining_a_group_twice(fake):
    def prog(s):
        s += "text"
        forks = s.fork(2)
        forks.join()
        forks.join()

    with pytest.raises(ForkError) as e:
        llmir.function(prog).run(backend=fake)
    lines, start = inspect.getsourcelines(prog)
    second = start + [i for i, line in enumerate(lines) if "forks.join()" in line][1]
    _check(e.value, "prog", second, "already joined")


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_fork_needs_a_positive_integer(fake, n):
    def prog(s):
        s += "text"
        s.fork(n)

    with pytest.raises(ForkError) as e:
        llmir.function(prog).run(backend=fake)
    _check(e.value, "prog", _line_of(prog, "s.fork"), ">= 1")


def test_fork_list_of_wrong_length(fake):
    def prog(s):
        s += "text"
        forks = s.fork(3)
        forks += ["a", "b"]

    with pytest.raises(ForkError) as e:
        llmir.function(prog).run(backend=fake)
    _check(e.value, "prog", _line_of(prog, '["a", "b"]'), "2 values", "3 branches")


def test_gen_name_reused(fake):
    def prog(s):
        for _ in range(2):
            s += "Step:" + llmir.gen("step", max_tokens=2)

    with pytest.raises(VariableRedefinedError) as e:
        llmir.function(prog).run(backend=fake)
    _check(e.value, "prog", _line_of(prog, 'gen("step"'), "'step'", "already defined")


@pytest.mark.parametrize("value", [42, 3.5, {"a": 1}, None, object()])
def test_non_string_appended(fake, value):
    def prog(s):
        s += value

    with pytest.raises(InvalidAppendError) as e:
        llmir.function(prog).run(backend=fake)
    _check(e.value, "prog", _line_of(prog, "s += value"), type(value).__name__, "str(")


def test_exception_inside_the_program(fake):
    def prog(s, n):
        s += "x" + llmir.gen("a", max_tokens=1)
        s += str(n / 0)

    with pytest.raises(ProgramExecutionError) as e:
        llmir.function(prog).run(n=1, backend=fake)
    _check(e.value, "prog", _line_of(prog, "n / 0"), "ZeroDivisionError")
    assert isinstance(e.value.__cause__, ZeroDivisionError)


def test_an_exception_raised_inside_a_library_names_the_users_line(fake):
    import json

    def prog(s):
        s += "x" + llmir.gen("a", max_tokens=1)
        s += json.loads("{not json")  # raises inside the json module

    with pytest.raises(ProgramExecutionError) as e:
        llmir.function(prog).run(backend=fake)
    _check(e.value, "prog", _line_of(prog, "json.loads"), "JSONDecodeError")


def test_bad_gen_arguments_point_at_the_gen_line(fake):
    def prog(s):
        s += "x"
        s += llmir.gen("a", max_tokens=2, min_tokens=5)

    with pytest.raises(DSLError) as e:
        llmir.function(prog).run(backend=fake)
    _check(e.value, "prog", _line_of(prog, "min_tokens=5"), "min_new_tokens")
    with pytest.raises(DSLError, match="several constraints"):
        llmir.gen("a", regex="[0-9]+", choices=["1", "2"])
    assert llmir.select("a", ["x", "y", "x"]).choices == ["x", "y", "x"]  # SGLang accepts repeats
    with pytest.raises(DSLError, match="choices_method"):
        llmir.select("a", ["x", "y"], choices_method="vote")


def test_run_arguments(fake):
    @llmir.function
    def prog(s, question):
        s += question

    with pytest.raises(ProgramArgumentError, match="question"):
        prog.run(backend=fake)
    with pytest.raises(ProgramArgumentError, match="'qestion'"):
        prog.run(qestion="x", backend=fake)
    with pytest.raises(ProgramArgumentError, match="item 1"):
        prog.run_batch([{"question": "a"}, {"nope": 1}], backend=fake)
    with pytest.raises(ProgramArgumentError, match="temperature"):
        prog.run(question="x", temperature=-1.0, backend=fake)
    with pytest.raises(ProgramArgumentError, match="not parameters"):
        prog.bind(other=1)
    with pytest.raises(PassPipelineError, match="unknown pass"):
        prog.run(question="x", backend=fake, passes="canonicalize,warp-speed")


def test_no_backend():
    @llmir.function
    def prog(s):
        s += "x"

    llmir.set_default_backend(None)
    with pytest.raises(NoBackendError, match="set_default_backend"):
        prog.run()


def test_state_is_read_only_after_the_run(fake):
    @llmir.function
    def prog(s):
        s += "x"

    st = prog.run(backend=fake)
    with pytest.raises(DSLError, match="read-only"):
        st += "more"


def test_malformed_constraint_is_reported_at_the_gen_line():
    def prog():
        return llmir.gen("x", json_schema='{"type": "object", ')

    with pytest.raises(DSLError) as e:
        prog()
    assert f"{HERE}:{_line_of(prog, 'json_schema')}" in str(e.value) and "JSON" in str(e.value)
