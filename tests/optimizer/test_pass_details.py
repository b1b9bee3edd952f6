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
    %6 = gen %5 "x"
    %7 = gen %5 "y"
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
    # the users are the model calls whose prompt holds the pin: x and y below it in a, x in b
    assert a.ops[1].label == "caf\u00e9" and a.ops[1].attrs == {"pin": "p0", "pin_users": 3}
    assert a.ops[2].label == " au lait" and a.ops[2].attrs == {"pin": "p1", "pin_users": 2}
    assert b.ops[1].label == "caf\u00e9" and b.ops[1].attrs["pin"] == "p0"


# --- the compressed prefix tree against a plain one-symbol-per-node trie ---------------------
class _RefNode:
    def __init__(self, parent: _RefNode | None, symbol: object) -> None:
        self.parent, self.symbol, self.children = parent, symbol, {}
        self.depth = 0 if parent is None else parent.depth + 1

    def child(self, symbol: object) -> _RefNode:
        if symbol not in self.children:
            self.children[symbol] = _RefNode(self, symbol)
        return self.children[symbol]


def _ref_shared_paths(module: object, min_length: int) -> set[tuple]:
    """The shared points as symbol paths, by the definition: every node with two children or
    more, moved back while a cut after it is not clean for every child."""
    root, at = _RefNode(None, None), {}
    for fi, fn in enumerate(module.functions):  # type: ignore[attr-defined]
        for op in fn.ops:
            if op.kind == "start":
                at[(fi, op.result.name)] = root
            elif op.kind in ("var", "return"):
                continue
            elif op.kind == "fork":
                for r in op.results:
                    at[(fi, r.name)] = at[(fi, op.state.name)]
            elif op.kind == "text":
                node = at[(fi, op.state.name)]
                for ch in op.label:
                    node = node.child(ch)
                at[(fi, op.result.name)] = node
            elif op.kind in ("role.begin", "role.end"):
                at[(fi, op.result.name)] = at[(fi, op.state.name)].child((op.kind, op.label))
            else:
                at[(fi, op.result.name)] = at[(fi, op.state.name)].child(("dyn", fi, op.result.name))
    out, stack = set(), [root]
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if len(node.children) < 2:
            continue
        cut = node
        while cut.depth > 0 and not all(clean_cut(cut.symbol, s) for s in cut.children):
            cut = cut.parent
        if cut.depth >= max(min_length, 1):
            path = []
            while cut.parent is not None:
                path.append(cut.symbol)
                cut = cut.parent
            out.add(tuple(reversed(path)))
    return out


def _path(pos: tuple) -> tuple:
    node, d = pos
    parts: list[object] = []
    while node.parent is not None:
        parts.append(tuple(reversed(node.edge)) if isinstance(node.edge, str) else (node.edge,))
        node = node.parent
    symbols = [s for part in reversed(parts) for s in reversed(part)]
    return tuple(symbols[:d])


PIECES = st.sampled_from(["Q: ", "the", " cat", "\n", "A:", " ", "sat\n", "é", "<role>", "<gen>", "<fork>"])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(PIECES, min_size=1, max_size=8), min_size=1, max_size=5),
    st.integers(min_value=1, max_value=4),
)
def test_compressed_tree_finds_the_shared_points_of_a_plain_trie(
    programs: list[list[str]], min_length: int
) -> None:
    from llmir_lang.optimizer.prefix_share import prefix_share
    from llmir_lang.optimizer.prefix_tree import build_state_tree, shared_nodes

    lines = ["module {"]
    for fi, pieces in enumerate(programs):
        lines += [f"  func @f{fi}() {{", "    %0 = start"]
        n, cur, open_role, rets = 1, "%0", False, []
        for piece in pieces:
            if piece == "<role>":
                kind = "role.end" if open_role else "role.begin"
                lines.append(f'    %{n} = {kind} {cur} "user"')
                open_role = not open_role
            elif piece == "<gen>":
                lines.append(f'    %{n} = gen {cur} "g{n}"')
            elif piece == "<fork>":
                lines.append(f"    %{n}, %{n + 1} = fork {cur}")
                lines.append(f'    %{n + 2} = text %{n + 1} "side"')
                rets.append(f"%{n + 2}")
                cur, n = f"%{n}", n + 3
                continue
            else:
                lit = piece.replace("\n", "\\n").replace("é", "\\u00e9")
                lines.append(f'    %{n} = text {cur} "{lit}"')
            cur, n = f"%{n}", n + 1
        if open_role:
            lines.append(f'    %{n} = role.end {cur} "user"')
            cur = f"%{n}"
        lines += [f"    return {', '.join([cur, *rets])}", "  }"]
    lines.append("}")
    module = parse_ir("\n".join(lines) + "\n")
    tree = build_state_tree(module)
    got = {_path(p) for p in shared_nodes(tree, min_length)}
    assert got == _ref_shared_paths(module, min_length)
    # every state's position spells its text; the pass keeps every returned state's text
    out = prefix_share(module, min_length=min_length)
    for before, after in zip(module.functions, out.functions):
        assert _texts(before) == _texts(after)


def _texts(fn: object) -> list[str]:
    text: dict[str, str] = {}
    for op in fn.ops:  # type: ignore[attr-defined]
        if op.kind == "start":
            text[op.result.name] = ""
        elif op.kind == "fork":
            for r in op.results:
                text[r.name] = text[op.state.name]
        elif op.kind == "text":
            text[op.result.name] = text[op.state.name] + op.label
        elif op.kind == "return":
            return [text[v.name] for v in op.operands]
        elif op.results:
            text[op.result.name] = text[op.state.name] + f"<{op.kind}:{op.label}>"
    raise AssertionError("no return")


def test_prefix_share_leaves_no_tree_for_the_cyclic_collector() -> None:
    """The tree's parent/child cycles are broken after the pass: reference counting frees it."""
    import gc

    from llmir_lang.optimizer.prefix_share import prefix_share
    from llmir_lang.optimizer.prefix_tree import Node

    text = (
        "module {\n"
        + "".join(
            f'  func @f{i}() {{\n    %0 = start\n    %1 = text %0 "Shared words here. Item {i}"\n'
            f'    %2 = gen %1 "x"\n    return %2\n  }}\n'
            for i in range(5)
        )
        + "}\n"
    )
    module = parse_ir(text)
    gc.collect()
    gc.disable()
    try:
        out = prefix_share(module)
        assert any("pin" in op.attrs for op in out.functions[0].ops)
        assert not [o for o in gc.get_objects() if type(o) is Node]
    finally:
        gc.enable()
