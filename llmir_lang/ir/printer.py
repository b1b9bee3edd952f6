"""The one printed form of the IR (MLIR-like). ``parse_ir(print_ir(m)) == m`` for every module.

Layout::

    module {
      func @name(%q: text) {
        %0 = start
        %1 = text %0 "Q: "
        %2 = append %1, %q
        %3 = gen %2 "answer" {max_tokens = 16, stop = ["\\n"]}
        return %3
      }
    }

Strings are printed in double quotes with every character outside printable ASCII escaped
(``\\n \\t \\r \\" \\\\``, ``\\uXXXX``, ``\\UXXXXXXXX``), so a printed module is one op per line and pure
ASCII but for value names: ``%café`` is printed as it is (names are identifiers, ``values.py``;
an escape there would make them unreadable). Attribute keys are printed sorted, so the printed
form of a module is canonical.
"""

from __future__ import annotations

import math
import re

from llmir_lang.errors import IRError
from llmir_lang.ir.attrs import AttrValue
from llmir_lang.ir.module import Function, Module
from llmir_lang.ir.ops import Op

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_SYMBOL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.$\-]*")
_SIMPLE_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_PLAIN_RE = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII but the quote and the backslash


def quote(s: str) -> str:
    """``s`` as an IR string literal (pure ASCII; see the module docstring)."""
    if _PLAIN_RE.fullmatch(s):  # nothing to escape (most prompts): no loop over characters
        return '"' + s + '"'
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def format_attr(value: AttrValue) -> str:
    """One attribute value in printed form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    # int.__repr__ / float.__repr__: a subclass's own repr (np.float64(0.5), E.A) is no literal
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return float.__repr__(value)  # round-trips exactly and always has '.' or 'e'
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    if isinstance(value, dict):
        return format_attr_dict(value)
    raise TypeError(f"not an attribute value: {value!r}")


def format_attr_dict(attrs: dict[str, AttrValue]) -> str:
    items = [f"{_key(k)} = {format_attr(attrs[k])}" for k in sorted(attrs)]
    return "{" + ", ".join(items) + "}"


def _key(k: str) -> str:
    return k if _IDENT_RE.fullmatch(k) and k not in ("true", "false") else quote(k)


def format_symbol(name: str) -> str:
    return "@" + (name if _SYMBOL_RE.fullmatch(name) else quote(name))


def format_op(op: Op) -> str:
    """One op on one line, without indentation."""
    parts: list[str] = []
    if op.results:
        parts.append(", ".join(str(v) for v in op.results) + " =")
    parts.append(op.kind)
    if op.operands:
        parts.append(", ".join(str(v) for v in op.operands))
    if op.label is not None:
        parts.append(quote(op.label))
    if op.attrs:
        parts.append(format_attr_dict(op.attrs))
    return " ".join(parts)


def format_function(fn: Function, indent: str = "  ") -> str:
    params = ", ".join(f"{p}: {p.type}" for p in fn.params)
    lines = [f"{indent}func {format_symbol(fn.name)}({params}) {{"]
    lines.extend(f"{indent}  {format_op(op)}" for op in fn.ops)
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def print_ir(module: Module) -> str:
    """The printed form of ``module``, ending with a newline."""
    if not isinstance(module, Module):
        raise IRError(f"print_ir takes a Module, got {_what(module)}")
    lines = ["module {"]
    lines.extend(format_function(fn) for fn in module.functions)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _what(value: object) -> str:
    """What a caller passed instead of a ``Module``, and how to get one from it."""
    if isinstance(value, Function):
        return "a Function; wrap it: Module((fn,))"
    name = type(value).__name__
    if name == "LMFunction":  # a program itself, not its trace (the IR cannot import the DSL)
        return "an @llmir.function program; trace it first: print_ir(f.trace(**arguments))"
    if isinstance(value, str):
        return "a str; parse_ir(text) reads IR text into a Module"
    return f"{name} {value!r:.60}"
