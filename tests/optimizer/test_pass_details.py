"""Pass details the golden files do not pin down: trie invariants, annotation hand-over."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llmir_lang.ir import parse_ir
from llmir_lang.optimizer import PassManager
from llmir_lang.optimizer.prefix_tree import clean_cut
from llmir_lang.optimizer.select_trie import choice_trie

WORDS = st.sampled_from(["the", " the", " cat", "cat", " sat", "\n", "yes", "ter", "day", " ", "é"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(WORDS, min_size=1, max_size=4).map("".join), min_size=1, max_size=6, unique=True))
def test_choice_trie_spells_each_choice_and_cuts_cleanly(choices: list[str]) -> None:
    nodes, ends = choice_trie(choices)
    assert len(ends) == len(choices)
    for i, choice in enumerate(choices):
        parts, n = [], ends[i]
        while n != -1:
            parent, text = nodes[n]
            assert parent < n  # preorder
            parts.append(text)
            n = parent
        assert "".join(reversed(parts)) == choice
    for n, (_parent, text) in enumerate(nodes):
        assert text != ""
        has_children = any(p == n for p, _ in nodes)
        if has_children:  # a shared node ends at a clean cut for every child
            for _, child in (x for x in nodes if x[0] == n):
                assert clean_cut(text[-1], child[0])


def test_clean_cut() -> None:
    assert clean_cut("a", " ") and clean_cut("\n", "a") and clean_cut(("dyn", 0, "1"), "a")
    assert not clean_cut("a", "b") and not clean_cut(" ", " ") and not clean_cut("\n", "\n")


def test_fused_chain_takes_head_and_tail_annotations() -> None:
    text = """\
module {
  func @f() {
    %0 = start
    %1, %2 = fork %0 {group = "g0"}
    %3 = gen %1 "a" {branch_of = "g0"}
    %4 = text %3 "-"
    %5 = gen %4 "b" {pin = "p0", pin_users = 2}
    %6 = text %5 "x"
    %7 = text %5 "y"
    %8 = gen %2 "c" {branch_of = "g0"}
    return %6, %7, %8
  }
}
"""
    out = PassManager("fuse-constants").run(parse_ir(text))
    chain = out.functions[0].ops[2]
    assert chain.kind == "gen.chain"
    assert chain.attrs["branch_of"] == "g0" and chain.attrs["pin"] == "p0" and chain.attrs["pin_users"] == 2
    assert chain.defined_names() == ("a", "b")


def test_prefix_share_counts_users_through_forks_and_splits_unicode() -> None:
    text = """\
module {
  func @a() {
    %0 = start
    %1 = text %0 "caf\\u00e9 au lait"
    %2, %3 = fork %1
    %4 = gen %2 "x"
    %5 = gen %3 "y"
    return %4, %5
  }
  func @b() {
    %0 = start
    %1 = text %0 "caf\\u00e9 noir"
    %2 = gen %1 "x"
    return %2
  }
}
"""
    out = PassManager("prefix-share").run(parse_ir(text))
    a, b = out.functions
    assert a.ops[1].label == "caf\u00e9" and a.ops[1].attrs == {"pin": "p0", "pin_users": 2}
    assert a.ops[2].label == " au lait" and a.ops[2].attrs == {"pin": "p1", "pin_users": 2}
    assert b.ops[1].label == "caf\u00e9" and b.ops[1].attrs["pin"] == "p0"
