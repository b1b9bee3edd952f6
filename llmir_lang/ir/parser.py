"""Parse the printed IR back into a ``Module`` with a lark (LALR) grammar (``grammar.lark``).

``parse_ir(print_ir(m)) == m`` and ``print_ir(parse_ir(t)) == t`` for printer output ``t``. The
parser also accepts hand-written text: blank lines, ``//`` comments, raw non-ASCII characters
inside strings, a leading byte order mark, and ``\r\n`` or ``\r`` line ends (read as ``\n``, as
Python reads source; a raw CR inside a string therefore ends the line: write ``\r``). Syntax
errors raise ``IRParseError`` with line and column, and so do values the IR cannot hold (a bad
value name, an integer too long to convert, lists and dicts nested deeper than
``MAX_ATTR_DEPTH``); the module is then verified (unless ``verify=False``), which raises
``IRVerifyError`` for semantic errors. Nothing in the text is ever evaluated: constraints and
schemas stay strings.
"""

from __future__ import annotations

import re
import sys
from functools import lru_cache
from importlib import resources

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from llmir_lang.errors import IRParseError
from llmir_lang.ir.attrs import MAX_ATTR_DEPTH, AttrValue
from llmir_lang.ir.module import Function, Module
from llmir_lang.ir.ops import SIGNATURES, Op
from llmir_lang.ir.values import Value, ValueType, is_value_name
from llmir_lang.ir.verifier import verify as verify_module

_ESCAPE_RE = re.compile(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.DOTALL)
_SIMPLE = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}
_LINE_END_RE = re.compile(r"\r\n?")
_STRING_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"')  # grammar.lark's STRING
_EXCERPT_WIDTH = 60  # characters of a long source line shown on each side of an error's column
# Lark's terminal names, as a reader of the IR would say them.
_TERMINAL_NAMES = {
    "_NL": "a newline",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "EQUAL": "'='",
    "COLON": "':'",
    "MODULE": "'module'",
    "FUNC": "'func'",
    "VALUE": "a %value",
    "STRING": "a string",
    "SYMBOL": "an @name",
    "OPNAME": "an op name",
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a float",
    "TRUE": "'true'",
    "FALSE": "'false'",
}


@lru_cache(maxsize=1)
def _lark() -> Lark:
    grammar = resources.files("llmir_lang.ir").joinpath("grammar.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=True)


def parse_ir(text: str | bytes, *, verify: bool = True) -> Module:
    """Parse IR text into a ``Module``; verify it unless ``verify=False``.

    ``text`` is a str, or UTF-8 bytes (a file read in binary mode)."""
    text = _LINE_END_RE.sub("\n", _as_text(text).removeprefix("\ufeff"))
    if not text or text.isspace():
        raise IRParseError(
            "line 1, column 1: the IR text is empty; a module is written 'module {', one 'func' "
            "per program, then '}' (print_ir's output)"
        )
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise IRParseError(_syntax_message(text, e)) from None
    module = _build_module(tree.children[0], text)
    if verify:
        verify_module(module)
    return module


def _as_text(text: object) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise IRParseError(
                f"line {line}: byte {e.start} ({data[e.start : e.start + 1]!r}) is not UTF-8; IR text "
                "is UTF-8 (print_ir writes pure ASCII but for value names)"
            ) from None
    raise IRParseError(
        f"parse_ir takes the IR text as a str (or UTF-8 bytes), got {type(text).__name__}; "
        "print_ir(module) makes one"
    )


def unquote(token: Token, source: str) -> str:
    """The string a STRING token denotes; bad escapes raise ``IRParseError`` at their position."""
    body = str(token)[1:-1]

    def sub(m: re.Match[str]) -> str:
        esc = m.group(1)
        if esc in _SIMPLE:
            return _SIMPLE[esc]
        if esc[0] in "uU" and len(esc) > 1:
            code = int(esc[1:], 16)
            if code <= 0x10FFFF:
                return chr(code)
        col = (token.column or 1) + 1 + m.start()
        raise IRParseError(
            _at(
                source,
                token.line or 1,
                col,
                f"invalid escape '\\{esc}' in string; use \\n \\t \\r \\\" \\\\ \\uXXXX or \\UXXXXXXXX",
            )
        )

    return _ESCAPE_RE.sub(sub, body)


def _build_module(tree: Tree, source: str) -> Module:
    return Module(tuple(_build_function(fn, source) for fn in tree.children))


def _build_function(tree: Tree, source: str) -> Function:
    symbol, *rest = tree.children
    name = _symbol_name(symbol, source)
    params: list[Value] = []
    types: dict[str, ValueType] = {}
    ops: list[Op] = []
    for child in rest:
        if child is None:
            continue
        if child.data == "param":
            vtok, ttok = child.children
            if str(ttok) != "text":
                raise IRParseError(
                    _at(source, ttok.line, ttok.column, f"parameter type must be 'text', got {str(ttok)!r}")
                )
            v = Value(_value_name(vtok, source), ValueType.TEXT)
            params.append(v)
            types.setdefault(v.name, v.type)
        else:
            op = _build_op(child, source, types)
            ops.append(op)
            for r in op.results:
                types.setdefault(r.name, r.type)
    return Function(name, tuple(params), tuple(ops), line=tree.meta.line)


def _build_op(tree: Tree, source: str, types: dict[str, ValueType]) -> Op:
    results_t, kind_tok, operands_t, label_tok, attrs_t = tree.children
    kind = str(kind_tok)
    sig = SIGNATURES.get(kind)
    if sig is None:
        raise IRParseError(
            _at(
                source,
                kind_tok.line,
                kind_tok.column,
                f"unknown op '{kind}'; known ops: {', '.join(SIGNATURES)}",
            )
        )
    result_type = sig.results or ValueType.STATE
    results = (
        tuple(Value(_value_name(t, source), result_type) for t in results_t.children) if results_t else ()
    )
    operands: list[Value] = []
    for i, t in enumerate(operands_t.children if operands_t else ()):
        name = _value_name(t, source)
        # A use before definition gets the type the op expects; the verifier reports it.
        operands.append(Value(name, types.get(name) or sig.operand_type(i) or ValueType.STATE))
    label = unquote(label_tok, source) if label_tok is not None else None
    attrs = _attr_dict(attrs_t, source, 0) if attrs_t is not None else {}
    return Op(kind, results, tuple(operands), label, attrs, line=tree.meta.line)


def _value_name(tok: Token, source: str) -> str:
    """The name of a VALUE token, checked: the grammar reads any run of non-ASCII characters."""
    name = str(tok)[1:]
    if not is_value_name(name):
        bad = next(ch for ch in name if not is_value_name(ch))
        raise IRParseError(
            _at(
                source,
                tok.line,
                tok.column,
                f"%{name} is not a valid value name: {bad!r} cannot be in one; "
                "use letters (any script), digits, '_', '.', '$'",
            )
        )
    return name


def _attr_dict(tree: Tree, source: str, depth: int) -> dict[str, AttrValue]:
    """``depth``: how many lists and dicts enclose this dict's values (0 for an op's attributes)."""
    out: dict[str, AttrValue] = {}
    for attr in tree.children:
        if attr is None:
            continue
        key_tok, value = attr.children
        key = unquote(key_tok, source) if key_tok.type == "STRING" else str(key_tok)
        if key in out:
            raise IRParseError(
                _at(source, key_tok.line, key_tok.column, f"attribute {key!r} is given twice; keep one")
            )
        out[key] = _attr_value(value, source, depth)
    return out


def _attr_value(node: Tree | Token, source: str, depth: int) -> AttrValue:
    if isinstance(node, Token):
        if node.type == "STRING":
            return unquote(node, source)
        if node.type == "INT":
            try:
                return int(node)
            except ValueError:  # longer than Python converts from text (sys.set_int_max_str_digits)
                digits = len(str(node).lstrip("-"))
                raise IRParseError(
                    _at(
                        source,
                        node.line,
                        node.column,
                        f"integer of {digits} digits is too long; at most "
                        f"{sys.get_int_max_str_digits()} digits convert to an int",
                    )
                ) from None
        if node.type == "FLOAT":
            return float(node)
        if node.type == "TRUE":
            return True
        if node.type == "FALSE":
            return False
        raise IRParseError(_at(source, node.line, node.column, f"unexpected attribute value {node!r}"))
    # The conversion recurses (and so do the printer and value comparison): cap the depth here,
    # long before Python's recursion limit, with a position instead of a RecursionError.
    if depth >= MAX_ATTR_DEPTH:
        raise IRParseError(
            _at(
                source,
                getattr(node.meta, "line", None),  # an empty list has no position of its own
                getattr(node.meta, "column", None),
                f"lists and dicts nest more than {MAX_ATTR_DEPTH} deep in this attribute; flatten the value",
            )
        )
    if node.data == "list":
        return tuple(_attr_value(c, source, depth + 1) for c in node.children if c is not None)
    return _attr_dict(node, source, depth + 1)


def _symbol_name(tok: Token, source: str) -> str:
    body = str(tok)[1:]
    if body.startswith('"'):
        return unquote(Token("STRING", body, line=tok.line, column=(tok.column or 0) + 1), source)
    return body


def _at(source: str, line: int | None, column: int | None, message: str) -> str:
    line = line or 1
    column = column or 1
    lines = source.split("\n")  # not splitlines(): strings may hold raw U+2028, \x0c, ...
    excerpt = lines[line - 1] if 0 < line <= len(lines) else ""
    caret = column - 1
    if len(excerpt) > 2 * _EXCERPT_WIDTH:  # a 5000-digit literal: show the part around the column
        start = max(0, caret - _EXCERPT_WIDTH)
        end = start + 2 * _EXCERPT_WIDTH
        head, tail = ("..." if start else ""), ("..." if end < len(excerpt) else "")
        excerpt = head + excerpt[start:end] + tail
        caret = caret - start + len(head)
    return f"line {line}, column {column}: {message}\n  {excerpt}\n  {' ' * caret}^"


def _syntax_message(source: str, e: UnexpectedInput) -> str:
    line, column = getattr(e, "line", 1), getattr(e, "column", 1)
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        return _at(
            source,
            line if line > 0 else len(source.split("\n")),
            column,
            "unexpected end of input; is a closing '}' missing?",
        )
    names = getattr(e, "expected", None) or getattr(e, "allowed", None) or ()
    expected = sorted({_TERMINAL_NAMES.get(n, n) for n in names})
    want = f"; expected one of {', '.join(expected)}" if expected else ""
    if isinstance(e, UnexpectedToken):
        got = "a newline" if e.token.type == "_NL" else repr(str(e.token))
        return _at(source, line, column, f"unexpected {got}{want}")
    if isinstance(e, UnexpectedCharacters):
        ch = source[e.pos_in_stream] if e.pos_in_stream < len(source) else "end of input"
        if ch == '"' and _STRING_RE.match(source, e.pos_in_stream) is None:
            return _at(
                source,
                line,
                column,
                "this string is not closed on its line; a string ends on the line it starts on "
                '(write \\n for a line break in it, \\" for a quote)',
            )
        return _at(source, line, column, f"unexpected character {ch!r}{want}")
    return _at(source, line, column, str(e))
