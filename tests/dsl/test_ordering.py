"""Call order inside a function: body order, except across branches of grouped forks."""

from __future__ import annotations

from llmir_lang.dsl.ordering import CallOrder, branch_paths, independent
from llmir_lang.ir import parse_ir

IR = """
module {
  func @f() {
    %0 = start
    %1 = text %0 "x"
    %2, %3 = fork %1 {group = "g0"}
    %4 = gen %2 "a"
    %5, %6 = fork %4 {group = "g1"}
    %7 = gen %5 "b"
    %8 = gen %6 "c"
    %9 = gen %3 "d"
    %10 = join %1, %7, %8, %9 {mode = "gather"}
    %11 = gen %10 "e"
    return %11
  }
}
"""


def test_branch_paths_and_independence():
    fn = parse_ir(IR).functions[0]
    paths = branch_paths(fn)
    by_label = {fn.ops[i].label: p for i, p in paths.items()}
    assert by_label == {
        "a": (("g0", 0),),
        "b": (("g0", 0), ("g1", 0)),
        "c": (("g0", 0), ("g1", 1)),
        "d": (("g0", 1),),
        "e": (),
    }
    assert independent(by_label["b"], by_label["c"]) and independent(by_label["a"], by_label["d"])
    assert not independent(by_label["a"], by_label["b"])  # b is after a on a's branch
    assert not independent(by_label["e"], by_label["d"])


def test_call_order():
    fn = parse_ir(IR).functions[0]
    index = {op.label: i for i, op in enumerate(fn.ops) if op.kind == "gen"}
    order = CallOrder(fn)
    assert order.may_start(index["a"]) and order.may_start(index["d"])
    assert not order.may_start(index["b"])
    order.finish(index["a"])
    assert order.may_start(index["b"]) and order.may_start(index["c"])
    assert not order.may_start(index["e"])
    for k in "bcd":
        order.finish(index[k])
    assert order.may_start(index["e"])


def test_without_groups_calls_are_sequential():
    fn = parse_ir(IR.replace(' {group = "g0"}', "").replace(' {group = "g1"}', "")).functions[0]
    order = CallOrder(fn)
    index = {op.label: i for i, op in enumerate(fn.ops) if op.kind == "gen"}
    assert order.may_start(index["a"]) and not order.may_start(index["d"])
