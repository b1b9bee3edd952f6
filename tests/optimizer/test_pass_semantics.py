"""Every pass preserves meaning: random programs evaluate to the same texts, variables and model
calls (``ir.semantics.evaluate`` with a deterministic fake model) with and without the passes."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmir_lang.ir import FunctionBuilder, Module, ModuleBuilder, Value, parse_ir, print_ir
from llmir_lang.ir.attrs import AttrValue
from llmir_lang.ir.semantics import evaluate
from llmir_lang.optimizer import DEFAULT_PIPELINE, ChatTemplate, PassManager

ROLES = ChatTemplate({r: (f"<{r}>\n", f"</{r}>\n") for r in ("system", "user", "assistant")})
# Few distinct fragments, with spaces and newlines, so that programs share prefixes often.
FRAGMENTS = st.sampled_from(
    ["", "You are", " a bot.", "\n", "Q: ", "What is", " it?", "A:", " ", "x", "\n\n"]
)
PIPELINES = [
    "canonicalize",
    "prefix-share",
    "fork-join",
    "select-trie",
    "fuse-constants",
    DEFAULT_PIPELINE,
    "fuse-constants,prefix-share,canonicalize,fork-join",
]


class FakeModel:
    """Deterministic: the output depends on the whole prompt, so any change to a prompt shows."""

    def generate(self, prompt: str, name: str, params: Mapping[str, AttrValue]) -> str:
        h = zlib.crc32(prompt.encode("utf-8", "surrogatepass"))
        thought = f"<think> {h % 5} </think> " if h % 2 else ""  # for separate_reasoning to split
        return f"{thought}[{name}:{h % 997}]"

    def select(self, prompt: str, name: str, choices: tuple[str, ...], method: str) -> str:
        return choices[zlib.crc32(prompt.encode("utf-8", "surrogatepass")) % len(choices)]


@st.composite
def programs(draw: st.DrawFn) -> Module:
    mb = ModuleBuilder()
    counter = iter(range(10**6))
    for fi in range(draw(st.integers(1, 3))):
        f = mb.function(f"p.{fi}", ["q"])
        _draw_body(draw, f, counter)
    return mb.build()


def _draw_body(draw: st.DrawFn, f: FunctionBuilder, counter: object) -> None:
    states: list[Value] = [f.start()]
    parent: dict[str, str | None] = {states[0].name: None}
    scope: dict[str, list[str]] = {states[0].name: []}
    # the open role of each state (roles do not nest; an end closes the open role)
    role: dict[str, str | None] = {states[0].name: None}
    for _ in range(draw(st.integers(1, 16))):
        s = states[-1] if draw(st.booleans()) else draw(st.sampled_from(states))
        kind = draw(
            st.sampled_from(
                ["text", "text", "text", "role", "gen", "gen", "select", "fork", "join", "append"]
            )
        )
        new: list[Value] = []
        names: list[str] = []
        opened = role[s.name]
        if kind == "text":
            new = [f.text(s, draw(FRAGMENTS))]
        elif kind == "role":
            if opened is None:
                opened = draw(st.sampled_from(["system", "user", "assistant"]))
                new = [f.role_begin(s, opened)]
            else:
                new, opened = [f.role_end(s, opened)], None
        elif kind == "gen":
            names = [f"v{next(counter)}"]  # type: ignore[call-overload]
            split = draw(st.sampled_from([{}, {}, {"reasoning": "qwen3"}, {"reasoning": "deepseek-r1"}]))
            new = [f.gen(s, names[0], max_tokens=draw(st.integers(1, 9)), **split)]
            names += [f"{names[0]}_reasoning_content"] if split else []
        elif kind == "select":
            names = [f"v{next(counter)}"]  # type: ignore[call-overload]
            choices = draw(
                st.lists(
                    st.sampled_from(
                        ["yes", "no", "yes sir", "the cat", "the dog", "yesterday", "<think>x</think>no"]
                    ),
                    min_size=1,
                    max_size=4,
                    unique=True,
                )
            )
            fmt = draw(st.sampled_from([None, None, "qwen3"]))
            new = [f.select(s, names[0], choices, reasoning=fmt)]
            names += [f"{names[0]}_reasoning_content"] if fmt else []
        elif kind == "fork":
            new = list(f.fork(s, draw(st.integers(1, 3))))
        elif kind == "append":
            source = (
                f.var(s, draw(st.sampled_from(scope[s.name])))
                if scope[s.name] and draw(st.booleans())
                else f.param("q")
            )
            new = [f.append(s, source)]
        elif kind == "join":
            below = [v for v in states if _descends(v.name, s.name, parent)]
            if not below:
                continue
            branches = draw(st.lists(st.sampled_from(below), min_size=1, max_size=3, unique=True))
            new = [f.join(s, branches, draw(st.sampled_from(["gather", "concat"])))]
        for v in new:
            states.append(v)
            parent[v.name] = s.name
            scope[v.name] = scope[s.name] + names
            role[v.name] = opened
    f.ret(states[-1], *draw(st.lists(st.sampled_from(states), max_size=2)))


def _descends(name: str, ancestor: str, parent: dict[str, str | None]) -> bool:
    cur = parent[name]
    while cur is not None and cur != ancestor:
        cur = parent[cur]
    return cur == ancestor


def _meaning(
    module: Module,
) -> dict[str, tuple[list[tuple[str, dict[str, str]]], list[tuple[str, str, str]]]]:
    args = {fn.name: {"q": "Why?"} for fn in module.functions}
    result = evaluate(module, FakeModel(), args, roles=ROLES)
    return {
        name: ([(s.text, s.variables) for s in ev.returned], sorted(ev.calls)) for name, ev in result.items()
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), st.sampled_from(PIPELINES))
def test_passes_preserve_meaning(module: Module, pipeline: str) -> None:
    optimized = PassManager(pipeline, {"canonicalize": {"template": ROLES}}).run(module)
    assert _meaning(optimized) == _meaning(module)
    text = print_ir(optimized)
    assert parse_ir(text) == optimized and print_ir(parse_ir(text)) == text


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_default_pipeline_is_idempotent(module: Module) -> None:
    manager = PassManager(DEFAULT_PIPELINE, {"canonicalize": {"template": ROLES}})
    once = manager.run(module)
    assert manager.run(once) == once
