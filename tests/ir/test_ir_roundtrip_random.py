"""Random programs (hypothesis): parse(print(p)) == p and print(parse(text)) == text."""

from __future__ import annotations

import json
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmir_lang.executor.constraints.spec import escape_regex
from llmir_lang.ir import FunctionBuilder, Module, ModuleBuilder, parse_ir, print_ir, verify
from llmir_lang.ir.attrs import CHOICES_METHODS, ROLES
from llmir_lang.ir.reasoning import FORMATS
from llmir_lang.ir.values import Value

# Any code point, surrogates included: the printer escapes everything outside printable ASCII.
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True)
# Parameter names as Python programs spell them: ASCII, or any identifier (``café``, ``数量``).
PARAM_NAMES = st.one_of(NAMES, st.text(min_size=1, max_size=4).filter(str.isidentifier))
FLOATS = st.floats(allow_nan=False)
ATTR_LEAF = st.one_of(TEXT, st.integers(-(2**70), 2**70), FLOATS, st.booleans())
ATTR = st.recursive(
    ATTR_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(NAMES, TEXT.filter(bool)), inner, max_size=3),
    ),
    max_leaves=6,
)
# Sampling values in the engine's ranges (the verifier checks them); floats of every sign and
# size, infinities included, round-trip in the nested attribute test below.
SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(0, 4096),
        "stop": st.lists(TEXT.filter(bool), max_size=2),
        "temperature": st.floats(0, 1e300),
        "top_p": st.floats(0, 1, exclude_min=True),
        "frequency_penalty": st.floats(-2, 2),
        "top_k": st.integers(-1, 50),
        "seed": st.integers(-(2**63), 2**63),
        "ignore_eos": st.booleans(),
        "stop_token_ids": st.lists(st.integers(0, 10**6), max_size=3),
    },
)
# Constraints the verifier accepts (it compiles them as the run path does): any Unicode text
# (no lone surrogate) as a literal regex, a JSON-schema const, distinct choices.
UNICODE = st.text(st.characters(codec="utf-8", exclude_categories=()), max_size=12)
CONSTRAINT = st.one_of(
    st.just({}),
    UNICODE.map(lambda t: {"regex": escape_regex(t)}),
    st.sampled_from([r"[0-9]+", r"(yes|no)\.?", r"\p{L}{1,4}", ""]).map(lambda r: {"regex": r}),
    UNICODE.map(lambda t: {"json_schema": json.dumps({"const": t}, ensure_ascii=False)}),
    st.sampled_from(['start: "a"+', 'start: x\nx: "yes" | "no"']).map(lambda g: {"grammar": g}),
    st.lists(UNICODE.filter(bool), min_size=1, max_size=3, unique=True).map(lambda c: {"choices": c}),
    st.sampled_from(["int", "float", "bool", "str"]).map(lambda d: {"dtype": d}),
)
ANNOTATIONS = st.fixed_dictionaries(
    {}, optional={"pin": NAMES, "pin_users": st.integers(1, 9), "branch_of": NAMES}
)
# separate_reasoning's format: the op also defines ``<name>_reasoning_content``
REASONING = st.fixed_dictionaries({}, optional={"reasoning": st.sampled_from(sorted(FORMATS))})


def _defined(name: str, attrs: dict) -> list[str]:
    return [name, f"{name}_reasoning_content"] if "reasoning" in attrs else [name]


KINDS = ["text", "role", "append", "gen", "select", "chain", "fork", "join", "var", "start"]


@st.composite
def modules(draw: st.DrawFn) -> Module:
    mb = ModuleBuilder()
    used_vars = iter(range(10**6))  # globally unique variable names keep every scope valid
    for fi in range(draw(st.integers(1, 3))):
        name = draw(st.one_of(NAMES, TEXT.filter(bool))) + f".{fi}"
        params = draw(st.lists(PARAM_NAMES, max_size=2, unique=True))
        _draw_function(draw, mb.function(name, params), params, used_vars)
    return mb.build()


def _draw_function(draw: st.DrawFn, f: FunctionBuilder, params: list[str], used_vars: Iterator[int]) -> None:
    states: list[Value] = [f.start()]
    parent: dict[str, str | None] = {states[0].name: None}
    defined: dict[str, list[str]] = {states[0].name: []}
    # The open role of each state, as the verifier tracks it ("?": unknown, after a start).
    role: dict[str, str | None] = {states[0].name: "?"}

    def add(new: Value, base: Value, names: list[str], opened: str | None | bool = False) -> None:
        states.append(new)
        parent[new.name] = base.name
        defined[new.name] = defined[base.name] + names
        role[new.name] = role[base.name] if opened is False else opened  # type: ignore[assignment]

    for _ in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from(KINDS))
        s = draw(st.sampled_from(states))
        if kind == "start":
            s = f.start()
            states.append(s)
            parent[s.name], defined[s.name], role[s.name] = None, [], "?"
        elif kind == "text":
            add(f.text(s, draw(TEXT)), s, [])
        elif kind == "role":
            open_role = role[s.name]
            begin = open_role is None or (open_role == "?" and draw(st.booleans()))
            if begin:
                name = draw(st.sampled_from(ROLES))
                add(f.role_begin(s, name), s, [], name)
            else:  # close the open role (or, at a chain's unknown start, any role)
                closed = open_role if open_role != "?" else draw(st.sampled_from(ROLES))
                add(f.role_end(s, closed), s, [], None)
        elif kind == "append":
            sources = [f.param(p) for p in params] + (
                [f.var(s, defined[s.name][0])] if defined[s.name] else []
            )
            if sources:
                add(f.append(s, draw(st.sampled_from(sources))), s, [])
        elif kind == "gen":
            var = f"v{next(used_vars)}"
            attrs = {**draw(SAMPLING), **draw(CONSTRAINT), **draw(ANNOTATIONS), **draw(REASONING)}
            add(f.op("gen", [s], var, attrs)[0], s, _defined(var, attrs))
        elif kind == "select":
            var = f"v{next(used_vars)}"
            choices = draw(st.lists(TEXT.filter(bool), min_size=1, max_size=4, unique=True))
            fmt = draw(REASONING).get("reasoning")
            sel = f.select(s, var, choices, draw(st.sampled_from(CHOICES_METHODS)), fmt)
            add(sel, s, _defined(var, {"reasoning": fmt} if fmt else {}))
        elif kind == "chain":
            a, b = f"v{next(used_vars)}", f"v{next(used_vars)}"
            last = {**draw(CONSTRAINT), **draw(REASONING)}  # (only a chain's last gen may split)
            segs = [{"gen": a, **draw(SAMPLING)}, {"text": draw(TEXT)}, {"gen": b, **last}]
            add(f.op("gen.chain", [s], None, {"segments": segs})[0], s, [a, *_defined(b, last)])
        elif kind == "fork":
            for r in f.fork(s, draw(st.integers(1, 3))):
                add(r, s, [])
        elif kind == "join":
            descendants = [v for v in states if _descends(v.name, s.name, parent)]
            if descendants:
                branches = draw(st.lists(st.sampled_from(descendants), min_size=1, max_size=3, unique=True))
                j = f.op("join", [s, *branches], None, {"mode": draw(st.sampled_from(["gather", "concat"]))})[
                    0
                ]
                add(j, s, [])
        elif kind == "var" and defined[s.name]:
            f.var(s, draw(st.sampled_from(defined[s.name])))
    f.ret(*draw(st.lists(st.sampled_from(states), min_size=1, max_size=2)))


def _descends(name: str, ancestor: str, parent: dict[str, str | None]) -> bool:
    cur = parent[name]
    while cur is not None and cur != ancestor:
        cur = parent[cur]
    return cur == ancestor


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(modules())
def test_random_programs_round_trip(module: Module) -> None:
    verify(module)
    text = print_ir(module)
    # ASCII but for value names: strings are escaped, an identifier name is printed as it is
    names = "".join(p.name for fn in module.functions for p in fn.params)
    assert {ch for ch in text if not ch.isascii()} <= set(names)
    parsed = parse_ir(text)
    assert parsed == module
    assert print_ir(parsed) == text


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.fixed_dictionaries({"parent": st.integers(-5, 5), "text": TEXT, "extra": ATTR}), max_size=3)
)
def test_random_nested_attribute_values_round_trip(trie: list[dict[str, object]]) -> None:
    mb = ModuleBuilder()
    f = mb.function("f")
    s = f.op("select", [f.start()], "c", {"choices": ["a"], "trie": trie})[0]
    f.ret(s)
    module = mb.build()
    text = print_ir(module)
    assert parse_ir(text) == module
    assert print_ir(parse_ir(text)) == text


def test_renumber_keeps_every_field_of_an_op() -> None:
    """``renumber`` rebuilds ops field by field (not ``dataclasses.replace``): a new ``Op`` field
    must be carried there too."""
    from dataclasses import fields

    from llmir_lang.ir import Op, parse_ir, renumber

    assert [f.name for f in fields(Op)] == ["kind", "results", "operands", "label", "attrs", "line"]
    text = 'module {\n  func @f() {\n    %7 = start\n    %9 = text %7 "a" {pin = "p0", pin_users = 1}\n    return %9\n  }\n}\n'
    before = parse_ir(text).functions[0].ops[1]
    after = renumber(parse_ir(text)).functions[0].ops[1]
    assert (after.kind, after.label, after.attrs, after.line) == (before.kind, before.label, before.attrs, before.line)
    assert [v.name for v in after.results] == ["1"] and [v.name for v in after.operands] == ["0"]
