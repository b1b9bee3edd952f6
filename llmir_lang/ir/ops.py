"""Operations of the program IR and the signature of each op kind.

Every op has one generic shape, which is also its printed form::

    %r0, %r1 = kind %operand0, %operand1 "label" {key = value, ...}

``label`` is the op's one string argument (a text literal, a role, or a variable name). The op
kinds, with their operands -> results:

=============  ==========================  ========  =============================================
kind           operands                    results   meaning
=============  ==========================  ========  =============================================
start          -                           state     a new, empty program state
text           state                       state     append the literal ``label`` (may be empty)
role.begin     state                       state     open the chat role ``label`` (until rendered)
role.end       state                       state     close the chat role ``label``
append         state, text                 state     append a run-time text value
gen            state                       state     generate; defines variable ``label``
select         state                       state     pick one of ``choices``; defines ``label``
gen.chain      state                       state     fused gens + forced text (fuse-constants)
fork           state                       state *n  n copies of the state, one per branch (n >= 1)
join           state, state+               state     continue the parent after its branches end
var            state                       text      read variable ``label`` visible in the state
return         state+                      -         end of the function; its result state(s)
=============  ==========================  ========  =============================================

Extending ops (text, role.*, append, gen, select, gen.chain) consume a state and yield the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmir_lang.ir.attrs import Attrs
from llmir_lang.ir.reasoning import reasoning_variable
from llmir_lang.ir.values import Value, ValueType

START = "start"
TEXT = "text"
ROLE_BEGIN = "role.begin"
ROLE_END = "role.end"
APPEND = "append"
GEN = "gen"
SELECT = "select"
GEN_CHAIN = "gen.chain"
FORK = "fork"
JOIN = "join"
VAR = "var"
RETURN = "return"

# Ops that consume operand 0 (a state) and yield the next state of the same chain.
EXTENDING_KINDS = frozenset({TEXT, ROLE_BEGIN, ROLE_END, APPEND, GEN, SELECT, GEN_CHAIN})
# Ops whose output the program cannot know before running the model or its arguments.
DYNAMIC_KINDS = frozenset({APPEND, GEN, SELECT, GEN_CHAIN, JOIN})


@dataclass(frozen=True, slots=True)
class OpSignature:
    """Shape rules of one op kind, checked by the verifier and used by the parser for types.

    ``operands`` are the fixed leading operand types; ``variadic`` (if set) is the type of the
    further operands, of which there must be at least ``min_variadic``. ``results`` is the result
    type, ``n_results`` the exact count (``None`` = one or more, for fork). ``label`` is "none",
    "any" (a string, possibly empty) or "name" (a non-empty string).
    """

    operands: tuple[ValueType, ...]
    variadic: ValueType | None
    min_variadic: int
    results: ValueType | None
    n_results: int | None
    label: str

    def operand_type(self, index: int) -> ValueType | None:
        if index < len(self.operands):
            return self.operands[index]
        return self.variadic


_S, _T = ValueType.STATE, ValueType.TEXT

SIGNATURES: dict[str, OpSignature] = {
    START: OpSignature((), None, 0, _S, 1, "none"),
    TEXT: OpSignature((_S,), None, 0, _S, 1, "any"),
    ROLE_BEGIN: OpSignature((_S,), None, 0, _S, 1, "name"),
    ROLE_END: OpSignature((_S,), None, 0, _S, 1, "name"),
    APPEND: OpSignature((_S, _T), None, 0, _S, 1, "none"),
    GEN: OpSignature((_S,), None, 0, _S, 1, "name"),
    SELECT: OpSignature((_S,), None, 0, _S, 1, "name"),
    GEN_CHAIN: OpSignature((_S,), None, 0, _S, 1, "none"),
    FORK: OpSignature((_S,), None, 0, _S, None, "none"),
    JOIN: OpSignature((_S,), _S, 1, _S, 1, "none"),
    VAR: OpSignature((_S,), None, 0, _T, 1, "name"),
    RETURN: OpSignature((), _S, 1, None, 0, "none"),
}


@dataclass(frozen=True, slots=True)
class Op:
    """One operation. Immutable: passes build new ops (``dataclasses.replace``).

    ``line`` is the source line when the op was parsed from text; it is used in error messages
    only and never compared.
    """

    kind: str
    results: tuple[Value, ...] = ()
    operands: tuple[Value, ...] = ()
    label: str | None = None
    attrs: Attrs = field(default_factory=dict)
    line: int | None = field(default=None, compare=False, repr=False)

    @property
    def result(self) -> Value:
        """The single result (every op but fork and return has exactly one)."""
        if len(self.results) != 1:
            raise ValueError(f"{self.kind} op has {len(self.results)} results, not one")
        return self.results[0]

    @property
    def state(self) -> Value:
        """The state operand this op consumes (operand 0)."""
        return self.operands[0]

    @property
    def extends(self) -> bool:
        """True if this op consumes operand 0 and yields the next state of its chain."""
        return self.kind in EXTENDING_KINDS

    def defined_names(self) -> tuple[str, ...]:
        """Program variable names (not SSA names) this op defines: gen/select label, chain gens,
        and after each of them its ``<name>_reasoning_content`` when it has a ``reasoning``."""
        if self.kind in (GEN, SELECT) and self.label is not None:
            if "reasoning" in self.attrs:
                return (self.label, reasoning_variable(self.label))
            return (self.label,)
        if self.kind == GEN_CHAIN:
            segments = self.attrs.get("segments", ())
            names: list[str] = []
            if isinstance(segments, tuple):
                for s in segments:
                    if isinstance(s, dict) and isinstance(s.get("gen"), str):
                        names.append(s["gen"])
                        if "reasoning" in s:
                            names.append(reasoning_variable(s["gen"]))
            return tuple(names)
        return ()
