"""The state tree of one function and its variable scopes, for the verifier, in linear time.

Every state value is a node of a tree: ``start`` results are roots, and the results of any other
op that takes a state as operand 0 (extending ops, fork, join) are its children. The variables
visible in a state are those its ancestors (and it) define (``verifier``'s module docstring says
which: gen / select / gen.chain names, and the names a join takes from its branches).

Scopes are checked by one walk of the tree with one dict of visible names, added on the way down
and removed on the way up: a dict per state (copied at every definition) cost time quadratic in
the number of variables along a chain. A join needs to know whether a branch descends from its
parent (``descends``: jump pointers, logarithmic in the depth) and which names its branches
defined after the fork (``gathered``: the states on the way up that define names, only those).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from llmir_lang.ir import ops as K
from llmir_lang.ir.ops import Op


@dataclass(slots=True)
class ScopeProblem:
    """The first scope error of a function: the op (``index`` in its body) and what is wrong."""

    index: int
    op: Op
    message: str


@dataclass(slots=True)
class StateTree:
    """The states of one function (see the module docstring); filled by the verifier in body
    order, which is SSA order: a state's parent is added before it."""

    parent: dict[str, str | None] = field(default_factory=dict)
    depth: dict[str, int] = field(default_factory=dict)
    jump: dict[str, str] = field(default_factory=dict)  # an ancestor, for descends() in log steps
    index: dict[str, int] = field(default_factory=dict)  # the body index of the op defining it
    children: dict[str, list[str]] = field(default_factory=dict)
    roots: list[str] = field(default_factory=list)
    # names the op defining the state adds to the scope: (name, the op that defined it there)
    own: dict[str, list[tuple[str, Op]]] = field(default_factory=dict)
    named: dict[str, str | None] = field(default_factory=dict)  # nearest ancestor-or-self with own
    reads: dict[str, list[tuple[int, Op]]] = field(default_factory=dict)  # state -> its var reads

    def add(self, name: str, parent: str | None, index: int, own: list[tuple[str, Op]]) -> None:
        self.parent[name] = parent
        self.index[name] = index
        if parent is None:
            self.roots.append(name)
            self.depth[name] = 0
            self.jump[name] = name
        else:
            self.children.setdefault(parent, []).append(name)
            self.depth[name] = self.depth[parent] + 1
            # skew-binary jump pointers (Myers): the jump of a node is its parent's jump's jump
            # when the two jumps above the parent are equally long, else its parent
            j = self.jump[parent]
            same = self.depth[parent] - self.depth[j] == self.depth[j] - self.depth[self.jump[j]]
            self.jump[name] = self.jump[j] if same else parent
        if own:
            self.own[name] = own
        self.named[name] = name if own else (self.named[parent] if parent is not None else None)

    def descends(self, state: str, ancestor: str) -> bool:
        """True if ``state`` is a strict descendant of ``ancestor`` (both in the tree)."""
        target = self.depth[ancestor]
        if self.depth[state] <= target:
            return False
        node = state
        while self.depth[node] > target:
            j = self.jump[node]
            node = j if self.depth[j] >= target else self.parent[node]  # type: ignore[assignment]
        return node == ancestor

    def gathered(self, join: Op) -> list[tuple[str, Op]]:
        """The names the branches of ``join`` (each a descendant of its parent) defined after the
        fork, each once, bound to the join."""
        top = self.depth[join.operands[0].name]
        out: dict[str, Op] = {}
        for b in join.operands[1:]:
            node = self.named[b.name]
            while node is not None and self.depth[node] > top:
                for name, _ in self.own[node]:
                    out.setdefault(name, join)
                up = self.parent[node]
                node = self.named[up] if up is not None else None
        return list(out.items())

    def add_read(self, state: str, index: int, op: Op) -> None:
        self.reads.setdefault(state, []).append((index, op))


def first_scope_problem(tree: StateTree, describe: Callable[[Op], str]) -> ScopeProblem | None:
    """The scope error of the op earliest in the body, or None (``describe`` prints an op)."""
    best: ScopeProblem | None = None
    visible: dict[str, Op] = {}
    stack: list[tuple[str, list[str] | None]] = [(r, None) for r in reversed(tree.roots)]
    while stack:
        state, added = stack.pop()
        if added is not None:  # leaving the state: its names go out of scope
            for name in added:
                del visible[name]
            continue
        if best is not None and tree.index[state] >= best.index:
            continue  # every op at or below this state comes later in the body
        names: list[str] = []
        problem = None
        for name, definer in tree.own.get(state, ()):
            first = visible.get(name)
            if first is None:
                visible[name] = definer
                names.append(name)
            elif definer.kind != K.JOIN:  # a name a branch redefined is reported in the branch
                problem = ScopeProblem(tree.index[state], definer, _twice(name, first, describe))
                break
        if problem is not None:  # and so is every op below the state: later in the body
            if best is None or problem.index < best.index:
                best = problem
            for name in names:
                del visible[name]
            continue
        for index, op in tree.reads.get(state, ()):  # in body order: the first problem is earliest
            message = _read_problem(op, visible, describe)
            if message is not None:
                if best is None or index < best.index:
                    best = ScopeProblem(index, op, message)
                break
        stack.append((state, names))
        stack.extend((c, None) for c in reversed(tree.children.get(state, ())))
    return best


def _twice(name: str, first: Op, describe: Callable[[Op], str]) -> str:
    if first.kind == K.JOIN:
        return (
            f"variable {name!r} was already defined in the branches of `{describe(first)}`; "
            "after a join its branches' variables belong to the parent (as in the DSL), "
            "so give this one another name"
        )
    return (
        f"variable {name!r} is defined twice in one scope (first by `{describe(first)}`); "
        "give one another name, or fork first so each branch has its own scope"
    )


def _read_problem(op: Op, visible: dict[str, Op], describe: Callable[[Op], str]) -> str | None:
    definer = visible.get(op.label or "")
    if definer is not None and definer.kind == K.JOIN:
        return (
            f"variable {op.label!r} was defined in the branches of `{describe(definer)}`, "
            "and a join keeps its parent's variables; read it from a branch state"
        )
    if definer is None:
        names = ", ".join(sorted(k for k, v in visible.items() if v.kind != K.JOIN)) or "none"
        return (
            f"variable {op.label!r} is not defined in the scope of {op.state} "
            f"(visible: {names}); read it from a state after its gen/select"
        )
    return None
