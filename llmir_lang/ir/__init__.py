"""The program IR: SSA state values, ops, builder, printer, lark parser, verifier.

The builder API below is the contract the DSL records programs with; it is stable.

Model
-----
A ``Module`` holds ``Function``s; each function is one program instance (``run_batch`` puts one
function per program in one module, so passes can share prefixes across the batch). A function has
``text`` parameters (bound when it runs) and a body of ``Op``s in definition order, ending with
``return``. Values are SSA and typed: a ``state`` value is the program's text so far; a ``text``
value is a run-time string (a parameter or a ``var`` read). Every extending op (text, role.begin,
role.end, append, gen, select, gen.chain) consumes one state and yields the next; a state with
several extending users is a fork, and ``fork`` makes that explicit. Program variables (the names
of gens and selects) are scoped by state chain: visible in every state after their op, defined at
most once per chain. ``join`` continues its parent's chain and scope once its branches end; the
names its branches defined stay taken in that chain (as the DSL gathers them into the parent).
Value names are ASCII letters, digits, ``_ . $`` or non-ASCII identifier characters (``%café``).

Builder contract (``ModuleBuilder`` / ``FunctionBuilder``)
----------------------------------------------------------
``mb = ModuleBuilder()``; ``f = mb.function(name, params=[...])`` (names unique in the module);
then, each call validating its arguments at once and raising ``IRVerifyError`` with the cause:

- ``f.param(name) -> Value`` (text)
- ``f.start() -> state``                       a new empty program state
- ``f.text(s, literal) -> state``               append a constant (may be empty)
- ``f.role_begin(s, role)``, ``f.role_end(s, role) -> state``   role one of ``attrs.ROLES``
- ``f.append(s, text_value) -> state``          append a parameter or a ``var`` read
- ``f.gen(s, name, **params) -> state``         sampling params (``attrs.SAMPLING_ATTRS``: max_tokens,
  stop, temperature, top_p, ...; in the engine's ranges, ``attrs.sampling_problem``) and at most
  one constraint (regex / json_schema / choices / grammar / dtype), all plain strings, numbers,
  lists; the constraint must be one the run path compiles (``attrs.constraint_problem``);
  ``reasoning=`` a format of ``reasoning.FORMATS`` (``separate_reasoning``: the gen's value and
  appended text are the answer split off its output, ``<name>_reasoning_content`` the reasoning)
- ``f.select(s, name, choices, choices_method="token_length_normalized", reasoning=None) -> state``
  a repeated choice is scored once: ``choices`` holds each once, ``choices_given`` the list as
  given; ``reasoning`` as for a gen
- ``f.fork(s, n) -> tuple[state, ...]``         n branches starting from ``s``'s text
- ``f.join(parent, branches, mode="gather"|"concat") -> state``
- ``f.var(s, name) -> text``                    the value of variable ``name`` visible in ``s``
- ``f.ret(final_state, *other_states)``         ends the function; first state is the program's
- ``f.op(kind, operands, label, attrs, n_results)`` generic escape hatch used by the above

``mb.build()`` returns the verified ``Module``. Result names are ``0, 1, 2, ...`` in creation order.

Text form
---------
``print_ir(module) -> str`` and ``parse_ir(text) -> Module`` (lark grammar ``grammar.lark``) are
exact inverses on printer output; ``verify(module)`` raises ``IRVerifyError`` (use before
definition, join of unrelated states, a variable defined twice in one scope, bad attributes,
a constraint that does not compile, unbalanced roles, ...), so that every verified module prints
and parses back to itself; parse errors raise ``IRParseError`` with line and column.
``renumber(module)`` renames results to ``0, 1, ...`` (the canonical form passes print).

Notes: ``Module``, ``Function`` and ``Op`` are immutable and compare by value (``Op.line`` is not
compared); ``Value`` is hashable, ``Op`` is not (its attribute dict). ``ir.semantics.evaluate``
is a reference evaluator (the model abstracted as a callback) that defines what a program means;
tests use it to check that passes preserve meaning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmir_lang.ir.attrs import (
    ANNOTATION_ATTRS,
    CHOICES_METHODS,
    CONSTRAINT_ATTRS,
    ROLES,
    SAMPLING_ATTRS,
    SAMPLING_TO_ENGINE,
    AttrValue,
    annotations_of,
    without_annotations,
)
from llmir_lang.ir.builder import FunctionBuilder, ModuleBuilder
from llmir_lang.ir.module import Function, Module, renumber
from llmir_lang.ir.ops import DYNAMIC_KINDS, EXTENDING_KINDS, SIGNATURES, Op
from llmir_lang.ir.printer import format_op, print_ir, quote
from llmir_lang.ir.values import Value, ValueType
from llmir_lang.ir.verifier import verify

if TYPE_CHECKING:
    from llmir_lang.ir.parser import parse_ir

__all__ = [
    "ANNOTATION_ATTRS",
    "CHOICES_METHODS",
    "CONSTRAINT_ATTRS",
    "DYNAMIC_KINDS",
    "EXTENDING_KINDS",
    "ROLES",
    "SAMPLING_ATTRS",
    "SAMPLING_TO_ENGINE",
    "SIGNATURES",
    "AttrValue",
    "Function",
    "FunctionBuilder",
    "Module",
    "ModuleBuilder",
    "Op",
    "Value",
    "ValueType",
    "annotations_of",
    "format_op",
    "parse_ir",
    "print_ir",
    "quote",
    "renumber",
    "verify",
    "without_annotations",
]


def __getattr__(name: str) -> Any:
    # NOTE: the parser imports lark (40 ms of every process that runs a program, which is traced,
    # never parsed); it loads on first use
    if name == "parse_ir":
        from llmir_lang.ir.parser import parse_ir

        return parse_ir
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
