"""Audit regressions of the passes: long prompts, long chains, nested forks and big selects cost
time linear in the program (each of these was quadratic, or hit Python's recursion limit)."""

from __future__ import annotations

import time

from llmir_lang.ir import Module, ModuleBuilder
from llmir_lang.ir.semantics import evaluate
from llmir_lang.optimizer import PASS_REGISTRY
from llmir_lang.optimizer.select_trie import choice_trie


def _timed(pass_name: str, module: Module, limit: float) -> Module:
    started = time.perf_counter()
    out = PASS_REGISTRY[pass_name].fn(module)
    assert time.perf_counter() - started < limit
    return out


def test_canonicalize_merges_a_prompt_of_20000_lines_in_linear_time() -> None:
    # a prompt built line by line in a loop: the merged label was rebuilt and the renames
    # followed to the end of the chain for each line (about 15 s)
    mb = ModuleBuilder()
    f = mb.function("f")
    s = f.start()
    lines = [f"row {i:05d} " + "x" * 90 + "\n" for i in range(20_000)]
    for line in lines:
        s = f.text(s, line)
    f.ret(f.gen(s, "a", max_tokens=1))
    out = _timed("canonicalize", mb.build(verify=False), 2)
    assert [op.label for op in out.functions[0].ops if op.kind == "text"] == ["".join(lines)]


def test_fuse_constants_fuses_a_chain_of_40000_gens_in_linear_time() -> None:
    # the chain so far was copied at each gen (about 6 s)
    mb = ModuleBuilder()
    f = mb.function("f")
    s = f.start()
    for i in range(40_000):
        s = f.gen(f.text(s, f" {i}:"), f"v{i}", max_tokens=1)
    f.ret(s)
    out = _timed("fuse-constants", mb.build(verify=False), 3)
    (chain,) = [op for op in out.functions[0].ops if op.kind == "gen.chain"]
    assert len(chain.attrs["segments"]) == 2 * 40_000 - 1


def test_prefix_share_counts_users_of_pins_nested_thousands_deep_in_linear_time() -> None:
    # a fork at every step: each call's prompt holds every pin above it, and a set of them per
    # call made the count quadratic (about 9 s)
    mb = ModuleBuilder()
    f = mb.function("f")
    s = f.start()
    n = 10_000
    for i in range(n):
        s = f.text(s, f" step {i}")
        a, _ = f.fork(s, 2)
        s = f.join(s, [f.gen(a, f"v{i}", max_tokens=2)])
    f.ret(s)
    out = _timed("prefix-share", mb.build(verify=False), 4)
    pins = [op.attrs for op in out.functions[0].ops if "pin" in op.attrs]
    assert len(pins) == n
    # the pin before gen i is in the prompt of gens i, i + 1, ..., n - 1
    assert sorted(a["pin_users"] for a in pins) == list(range(1, n + 1))


def test_a_pin_that_occurs_twice_on_one_chain_counts_each_call_once() -> None:
    from llmir_lang.ir import parse_ir
    from llmir_lang.optimizer.prefix_share import recount_pin_users

    module = parse_ir(
        """module {
  func @f() {
    %0 = start
    %1 = text %0 "a" {pin = "p0"}
    %2 = text %1 "b" {pin = "p1"}
    %3 = text %2 "c" {pin = "p0"}
    %4 = gen %3 "x"
    %5 = gen %1 "y"
    return %4, %5
  }
}
"""
    )
    ops = recount_pin_users(module).functions[0].ops
    users = {op.result.name: op.attrs.get("pin_users") for op in ops if op.results}
    assert (users["1"], users["2"], users["3"]) == (2, 1, 2)


def test_select_trie_of_choices_nested_a_thousand_deep_does_not_recurse() -> None:
    # "w", "w w", "w w w", ...: one trie level per choice, RecursionError at about 1,000
    choices = [" ".join(["w"] * k) for k in range(1, 1_500)]
    nodes, ends = choice_trie(choices)
    for i, choice in enumerate(choices):
        text, node = "", ends[i]
        while node != -1:
            parent, piece = nodes[node]
            text, node = piece + text, parent
        assert text == choice


def test_select_trie_of_3000_choices_is_not_quadratic() -> None:
    # every choice was compared with every other (about 3 s)
    choices = [f"option number {i}" for i in range(3_000)]
    started = time.perf_counter()
    nodes, ends = choice_trie(choices)
    assert time.perf_counter() - started < 0.5
    assert nodes[:2] == [(-1, "option number"), (0, " 0")]
    assert len(nodes) == 3_001 and ends[7] == 8


def test_select_trie_on_a_select_with_many_nested_choices_keeps_its_meaning() -> None:
    mb = ModuleBuilder()
    f = mb.function("f")
    s = f.text(f.start(), "Pick:")
    f.ret(f.select(s, "pick", [" ".join(["w"] * k) for k in range(1, 1_200)]))
    module = mb.build()

    class Model:
        def select(self, prompt: str, name: str, choices: tuple[str, ...], method: str) -> str:
            return choices[len(choices) // 2]

        def generate(self, prompt: str, name: str, params: object) -> str:
            raise AssertionError

    out = _timed("select-trie", module, 5)
    assert evaluate(out, Model())["f"].returned[0].text == evaluate(module, Model())["f"].returned[0].text
