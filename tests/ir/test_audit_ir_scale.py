"""Audit regressions of the IR: attribute values of numeric subclasses print as IR literals, and
verification stays linear in the size of a program (no scope copied per variable)."""

from __future__ import annotations

import enum
import time

import numpy as np

from llmir_lang.ir import Function, Module, ModuleBuilder, Op, Value, ValueType, parse_ir, print_ir, verify


class _Level(int, enum.Enum):
    LOW = 3


class _Word(str, enum.Enum):
    STOP = "END"


def test_numpy_and_enum_attribute_values_print_as_plain_literals() -> None:
    mb = ModuleBuilder()
    f = mb.function("f")
    s = f.start()
    s = f.gen(s, "x", temperature=np.float64(0.5), max_tokens=_Level.LOW, stop=[_Word.STOP])
    f.ret(s)
    module = mb.build()
    attrs = module.functions[0].ops[1].attrs
    assert [type(attrs[k]) for k in ("temperature", "max_tokens")] == [float, int]
    assert type(attrs["stop"][0]) is str
    text = print_ir(module)
    assert '{max_tokens = 3, stop = ["END"], temperature = 0.5}' in text
    assert parse_ir(text) == module


def test_an_op_built_directly_with_a_numpy_float_prints_a_literal() -> None:
    s0, s1 = Value("0", ValueType.STATE), Value("1", ValueType.STATE)
    op = Op("gen", (s1,), (s0,), "x", {"temperature": np.float64(0.25), "max_tokens": _Level.LOW})
    module = Module((Function("f", (), (Op("start", (s0,)), op, Op("return", (), (s1,)))),))
    verify(module)
    assert "{max_tokens = 3, temperature = 0.25}" in print_ir(module)
    assert parse_ir(print_ir(module)) == module


def _chain_of_gens(n: int) -> Module:
    mb = ModuleBuilder()
    f = mb.function("f")
    s = f.start()
    for i in range(n):
        s = f.gen(f.text(s, f"Q{i}: "), f"v{i}", max_tokens=4)
    f.ret(s)
    return mb.build(verify=False)


def _forks_joined_at_each_step(n: int) -> Module:
    mb = ModuleBuilder()
    f = mb.function("f")
    s = f.start()
    for i in range(n):
        s = f.text(s, f" step {i}")
        a, _ = f.fork(s, 2)
        s = f.join(s, [f.gen(a, f"v{i}", max_tokens=2)])
    f.ret(s)
    return mb.build(verify=False)


def test_verifying_thousands_of_variables_along_a_chain_is_linear() -> None:
    # each definition copied the scope so far: 60,000 ops took about 13 s, now well under 1 s
    module = _chain_of_gens(30_000)
    started = time.perf_counter()
    verify(module)
    assert time.perf_counter() - started < 4


def test_verifying_a_join_at_each_step_is_linear() -> None:
    # each join walked its branch's whole scope: 50,000 ops took about 7 s
    module = _forks_joined_at_each_step(10_000)
    started = time.perf_counter()
    verify(module)
    assert time.perf_counter() - started < 3


def test_joins_of_far_branches_check_descent_in_few_steps() -> None:
    # a branch 30,000 states below the join's parent, joined 5,000 times: the walk up was
    # 150 million steps (about 10 s); jump pointers make each check logarithmic
    mb = ModuleBuilder()
    f = mb.function("f")
    root = f.start()
    s = root
    for _ in range(30_000):
        s = f.text(s, "x")
    for _ in range(5_000):
        f.join(root, [s])
    f.ret(root)
    module = mb.build(verify=False)
    started = time.perf_counter()
    verify(module)
    assert time.perf_counter() - started < 3
