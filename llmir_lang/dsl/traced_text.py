"""``TracedText``: the placeholder a traced parameter or variable read is while ``trace`` records
a program, and the marks that let the trace refuse text made from one where it enters the IR
(``refuse_traced_marks``)."""

from __future__ import annotations

import re
from typing import Any

from llmir_lang.dsl.errors import FeatureNotSupportedError, SourceLocation
from llmir_lang.dsl.primitive_records import Concat

# Private-use marks around a traced value's string value: text made from it by any str operation
# that no hook sees (str.join, .upper(), % with a tuple or dict held in a variable) still holds
# one, and the trace refuses such text where it enters the IR (``refuse_traced_marks``). repr()
# (``!r``, ``%r``), ascii() and json.dumps write the marks as escapes (``\ue000``): an escaped
# whole placeholder is refused too (a user's own text never holds one; a lone escape it may).
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARKED = re.compile(_OPEN + r"\{(.*?)\}" + _CLOSE)
_ESCAPED = re.compile(r"\\+[uU]0{0,4}[eE]000\{(.*?)\}\\+[uU]0{0,4}[eE]001")


def _placeholder_in(text: str) -> str | None:
    """The name in the first whole placeholder in ``text``, marked or escaped; None if none."""
    found = _MARKED.search(text) or _ESCAPED.search(text)
    return found.group(1) if found else None


def marked_placeholder(name: str) -> str:
    """``{name}`` between the two marks, as plain text (what a ``TracedText`` holds)."""
    return _OPEN + "{" + name + "}" + _CLOSE


class TracedText(str):
    """A placeholder for text known only at run time, used by ``trace``: a parameter or a variable
    read. Its string value is ``{name}`` between two private-use marks; appending it records
    ``append %state, %value``, and ``+`` with other text and ``str()`` keep the reference.
    Formatting it (an f-string, ``str.format``, ``text % value``) raises
    ``FeatureNotSupportedError``: the text made would hold the placeholder, not the value, and the
    IR would ignore the argument. Text made from it in other ways (``str.join``, a str method,
    ``repr``, ``json.dumps``) is refused with the same error where it reaches the IR
    (``refuse_traced_marks``); a slice or an item is a placeholder of its own (``{q[1:3]}``,
    marked), so it is refused there too and never leaves unmarked text such as ``{q``."""

    name: str
    kind: str  # "parameter" or "variable"
    value: Any  # the IR text value (ir.Value)
    run_id: int  # id() of the ProgramRun whose builder defined the value

    def __new__(cls, name: str, value: Any, run_id: int, kind: str = "parameter") -> TracedText:
        obj = super().__new__(cls, marked_placeholder(name))
        obj.name = name
        obj.kind = kind
        obj.value = value
        obj.run_id = run_id
        return obj

    @property
    def placeholder(self) -> str:
        """``{name}`` as a plain str (what ``s.text()`` shows during a trace)."""
        return "{" + self.name + "}"

    def __add__(self, other: object) -> Concat:  # type: ignore[override]
        __tracebackhide__ = True
        self._refuse_number(other, "+")
        return Concat([self, other])

    def __radd__(self, other: object) -> Concat:
        __tracebackhide__ = True
        self._refuse_number(other, "+")
        return Concat([other, self])

    # ``n > 2`` of a traced number parameter raised a bare TypeError (str against int)
    def __lt__(self, other: object) -> bool:  # type: ignore[override]
        __tracebackhide__ = True
        self._refuse_number(other, "<")
        return str.__lt__(self, other)  # type: ignore[operator]

    def __le__(self, other: object) -> bool:  # type: ignore[override]
        __tracebackhide__ = True
        self._refuse_number(other, "<=")
        return str.__le__(self, other)  # type: ignore[operator]

    def __gt__(self, other: object) -> bool:  # type: ignore[override]
        __tracebackhide__ = True
        self._refuse_number(other, ">")
        return str.__gt__(self, other)  # type: ignore[operator]

    def __ge__(self, other: object) -> bool:  # type: ignore[override]
        __tracebackhide__ = True
        self._refuse_number(other, ">=")
        return str.__ge__(self, other)  # type: ignore[operator]

    def __getitem__(self, key: Any) -> str:  # type: ignore[override]
        __tracebackhide__ = True
        if self.value is None:  # a var_scope's text or a joined list: nothing to index in the IR
            raise FeatureNotSupportedError(
                f"variable {self.name!r} (a var_scope's text or a fork's joined list) is indexed while "
                "the program is traced (trace(), llmir ir, cache()): its value is not known then; "
                "run() the program to use it",
                where=SourceLocation.here(),
            )
        # a slice of the marked text could drop both marks (``q[1:-1]`` was ``{q}``, ``q[2]`` was
        # ``q``) and go into the IR as constant text: a marked placeholder of its own instead, which
        # compares unequal to any text, as the whole placeholder does (control flow: one path)
        return marked_placeholder(f"{self.name}[{_key_text(key)}]")

    def _refuse_number(self, other: object, op: str) -> None:
        """``n + 1`` / ``n > 2`` of a traced number parameter: run() computes it, the trace cannot
        (``+`` made ``Concat([n, 1])``, whose ``str()`` went into the IR as text)."""
        __tracebackhide__ = True
        if isinstance(other, (int, float, complex)) and not isinstance(other, bool):
            raise FeatureNotSupportedError(
                f"{self.kind} {self.name!r} is used in arithmetic or compared with a number "
                f"({self.name} {op} {other!r}) while the program is traced (trace(), llmir ir, "
                f"cache()): its value is not known then; give trace() the argument ({self.name}=...; "
                f"llmir ir: --arg {self.name}=...)",
                where=SourceLocation.here(),
            )

    def __str__(self) -> str:
        return self  # str(x), as for a number argument in run(): still the reference

    # f-strings and str.format call __format__, ``"Q: %s" % x`` calls __rmod__ first (a str
    # subclass), and Python compiles ``"Q: %s" % (x,)`` (a literal tuple) to an f-string. A tuple or
    # dict held in a variable reaches only __str__ (which must keep ``str(x)`` the reference) or
    # __repr__: that text keeps the marks (escaped by repr), and is refused where it enters the IR.
    def __format__(self, spec: str) -> str:
        __tracebackhide__ = True
        raise self._formatted()

    def __rmod__(self, other: object) -> str:
        __tracebackhide__ = True
        raise self._formatted()

    def __iter__(self) -> Any:
        __tracebackhide__ = True
        give = (
            f"give trace() the argument ({self.name}=[...]; llmir ir: --arg {self.name}='[...]')"
            if self.kind == "parameter"
            else "iterate it in run(), where its value is known"
        )
        raise FeatureNotSupportedError(
            f"{self.kind} {self.name!r} is iterated (a for loop, list(), str.join of it) while the "
            "program is traced (trace(), llmir ir, cache()): its value is not known then, so the "
            f"trace cannot follow the loop; {give}",
            where=SourceLocation.here(),
        )

    def _formatted(self) -> FeatureNotSupportedError:
        read = self.name if self.kind == "parameter" else f"s[{self.name!r}]"
        return FeatureNotSupportedError(
            f"{self.kind} {self.name!r} is formatted into a string (an f-string, str.format or %) "
            "while the program is traced (trace(), llmir ir, cache()), so the text would hold the "
            f"placeholder {self.placeholder!r} and the IR would ignore the {self.kind}'s value; "
            f'build the text with + instead, e.g. "Q: " + {read} (run() with arguments takes '
            "f-strings: there the value is known)",
            where=SourceLocation.here(),
        )


def refuse_traced_marks(kind: str, label: str | None, attrs: Any) -> None:
    """During a trace, refuse an op whose text (its label or attributes) holds a traced value's
    mark: text made from a parameter or variable by a str operation would put its placeholder, not
    its value, into the IR (the ``FunctionBuilder`` hook ``ProgramRun`` installs when tracing)."""
    __tracebackhide__ = True
    text = _marked_text([label, attrs])
    if text is None:
        return
    found = _placeholder_in(text)
    what = f"the placeholder of {found!r}" if found is not None else "part of a traced placeholder"
    shown = _ESCAPED.sub(lambda m: "{" + m.group(1) + "}", text).replace(_OPEN, "").replace(_CLOSE, "")
    # without a whole placeholder the mark may be the program's own text: say so too
    literal = (
        ""
        if found
        else " (or the text itself holds U+E000 or U+E001, the private-use characters the trace "
        "marks placeholders with: trace() cannot take them in constant text; run() can)"
    )
    raise FeatureNotSupportedError(
        f"text recorded by a {kind} op while the program is traced (trace(), llmir ir, cache()) holds "
        f"{what}{literal} ({shown[:80]!r}): a traced parameter or variable, or text made from one by a "
        "str operation (str.join, slicing, a str method such as .upper(), % with a tuple or dict held "
        "in a variable, repr() or !r, json.dumps), where the IR takes constant text, so the IR would "
        "hold the placeholder and "
        'ignore the value. Join text with + to keep the reference (e.g. "Q: " + question); give '
        "trace() the arguments that select choices or gen options are made from; run() with "
        "arguments takes any of these",
        where=SourceLocation.here(),
    )


def _key_text(key: Any) -> str:
    """``1:3`` / ``2`` / ``'k'``: how the user wrote an index or a slice."""
    if isinstance(key, slice):
        parts = ["" if v is None else repr(v) for v in (key.start, key.stop, key.step)]
        return ":".join(parts if key.step is not None else parts[:2])
    return repr(key)


def _marked_text(value: Any) -> str | None:
    if isinstance(value, str):
        marked = _OPEN in value or _CLOSE in value or ("\\" in value and _ESCAPED.search(value))
        return value if marked else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            got = _marked_text(item)
            if got is not None:
                return got
    return None


class _TracedMeta(dict):
    """``get_meta_info`` while tracing: empty (meta info exists only once a gen has run), and its
    text is a marked placeholder, so ``str()`` of it appended to the state is refused where it
    reaches the IR instead of recording the text ``{}``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __str__(self) -> str:
        return marked_placeholder(f"meta info of {self.name}")

    __repr__ = __str__
