"""A reference evaluator: what a module means, with the model abstracted as a ``Backend``.

Executes ops in body order, one call per gen / select (``gen.chain``: one call per gen segment,
its text segments appended between them). It defines the IR's semantics for tests: a pass is
correct when ``evaluate`` gives the same results before and after it, for any backend. It is not
the interpreter that runs programs fast (that one lowers to engine requests).

Semantics: a state is (text, visible variables). ``start`` is ("", {}); extending ops append to
the text; ``gen`` / ``select`` append what the backend returns and bind it to their name; a fork's
results equal their operand; ``join`` (gather) continues the parent unchanged, (concat) appends
what each branch added after the parent, in order, and keeps the parent's variables; ``var``
reads a visible variable; role markers render through ``roles`` (an object with
``begin(role)`` / ``end(role)``), or raise if none is given. A gen or select with a ``reasoning``
format binds its name to the answer split from what the backend returned, binds
``<name>_reasoning_content`` to the reasoning, and appends the answer (``reasoning``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmir_lang.errors import IRError
from llmir_lang.ir import ops as K
from llmir_lang.ir.attrs import AttrValue, without_annotations
from llmir_lang.ir.module import Function, Module
from llmir_lang.ir.reasoning import reasoning_variable, split_reasoning


class Backend(Protocol):
    """The model, as the evaluator sees it."""

    def generate(self, prompt: str, name: str, params: Mapping[str, AttrValue]) -> str: ...

    def select(self, prompt: str, name: str, choices: tuple[str, ...], method: str) -> str: ...


@dataclass(slots=True)
class State:
    text: str
    variables: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Evaluation:
    """The result of one function: its returned states and every backend call, in order."""

    returned: list[State]
    calls: list[tuple[str, str, str]]  # (kind, prompt, variable name)


def evaluate(
    module: Module, backend: Backend, args: Mapping[str, Mapping[str, str]] | None = None, roles: Any = None
) -> dict[str, Evaluation]:
    """Evaluate every function; ``args[function name][param]`` binds parameters."""
    args = args or {}
    return {fn.name: evaluate_function(fn, backend, args.get(fn.name, {}), roles) for fn in module.functions}


def evaluate_function(
    fn: Function, backend: Backend, args: Mapping[str, str], roles: Any = None
) -> Evaluation:
    states: dict[str, State] = {}
    texts: dict[str, str] = {}
    for p in fn.params:
        if p.name not in args:
            raise IRError(f"function @{fn.name}: no value bound for parameter %{p.name}")
        texts[p.name] = args[p.name]
    calls: list[tuple[str, str, str]] = []
    for op in fn.ops:
        if op.kind == K.START:
            states[op.result.name] = State("")
            continue
        if op.kind == K.RETURN:
            return Evaluation([states[v.name] for v in op.operands], calls)
        base = states[op.state.name]
        if op.kind == K.VAR:
            texts[op.result.name] = base.variables[op.label or ""]
            continue
        if op.kind == K.FORK:
            for r in op.results:
                states[r.name] = base
            continue
        if op.kind == K.JOIN:
            added = "".join(states[b.name].text[len(base.text) :] for b in op.operands[1:])
            text = base.text + added if op.attrs.get("mode") == "concat" else base.text
            states[op.result.name] = State(text, base.variables)
            continue
        text, variables = base.text, base.variables
        if op.kind == K.TEXT:
            text += op.label or ""
        elif op.kind in (K.ROLE_BEGIN, K.ROLE_END):
            if roles is None:
                raise IRError(f"function @{fn.name}: {op.kind} needs a role renderer; pass roles=")
            text += roles.begin(op.label) if op.kind == K.ROLE_BEGIN else roles.end(op.label)
        elif op.kind == K.APPEND:
            text += texts[op.operands[1].name]
        else:
            segments: tuple[Any, ...]
            if op.kind == K.GEN:
                segments = ({"gen": op.label, **op.attrs},)
            elif op.kind == K.SELECT:
                segments = ({"select": op.label, **op.attrs},)
            else:
                segments = tuple(op.attrs["segments"])  # type: ignore[arg-type]
            variables = dict(variables)
            for seg in segments:
                if "text" in seg:
                    text += seg["text"]
                    continue
                if "select" in seg:
                    name = seg["select"]
                    out = backend.select(text, name, seg["choices"], str(seg.get("choices_method", "")))
                    calls.append(("select", text, name))
                else:
                    name = seg["gen"]
                    params = without_annotations({k: v for k, v in seg.items() if k != "gen"})
                    out = backend.generate(text, name, params)
                    calls.append(("gen", text, name))
                if "reasoning" in seg:
                    reasoning, out = split_reasoning(str(seg["reasoning"]), out)
                    variables[reasoning_variable(name)] = reasoning
                variables[name] = out
                text += out
        states[op.result.name] = State(text, variables)
    raise IRError(f"function @{fn.name} has no return")
