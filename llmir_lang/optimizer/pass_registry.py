"""The pass registry: each pass's name, function and typed options (``register_pass``), and
the checks of one option's value. ``pass_manager`` parses pipelines and runs passes over it (its
docstring says how options are read and checked); the names here are also importable from there.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmir_lang.errors import IRError
from llmir_lang.ir import Module

PassFn = Callable[..., Module]


class PassPipelineError(IRError, ValueError):
    """A pipeline string or a pass option is invalid (unknown pass, unknown option, bad syntax)."""


Bounds = tuple[float | None, float | None]  # (lowest, highest) allowed, both included; None: open


@dataclass(frozen=True, slots=True)
class PassOption:
    """One option of a pass: a keyword-only parameter of its function, with the parameter's
    annotation as its type (``Any`` when there is none or it cannot be resolved: not checked)."""

    name: str
    annotation: Any
    bounds: Bounds = (None, None)

    def accepts(self, value: Any) -> bool:
        if not _matches(self.annotation, value):
            return False
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True
        low, high = self.bounds
        return (low is None or value >= low) and (high is None or value <= high)

    @property
    def annotation_is_object(self) -> bool:
        """True if no value written in a pipeline string fits (an object option: a template)."""
        return not any(t in _SCALARS for t in _members(self.annotation)) and self.annotation is not Any

    @property
    def expected(self) -> str:
        """What a valid value is, in words: "an integer >= 0"."""
        text = _type_words(self.annotation)
        low, high = self.bounds
        if low is not None and high is not None:
            return f"{text} in [{low:g}, {high:g}]"
        if low is not None:
            return f"{text} >= {low:g}"
        if high is not None:
            return f"{text} <= {high:g}"
        return text


@dataclass(frozen=True, slots=True)
class PassInfo:
    """A registered pass: its name, function, and the keyword options the function accepts."""

    name: str
    fn: PassFn
    options: tuple[str, ...]
    specs: Mapping[str, PassOption] = field(default_factory=dict)

    def check_option(self, option: str, value: Any) -> None:
        """Raise ``PassPipelineError`` unless ``option`` is one of this pass's and ``value`` fits it."""
        spec = self.specs.get(option)
        if spec is None:
            accepted = ", ".join(self.options) or "none"
            raise PassPipelineError(f"pass {self.name} has no option {option!r}; it accepts: {accepted}")
        if not spec.accepts(value):
            raise PassPipelineError(
                f"pass {self.name}: option {option} must be {spec.expected}, got {_short_repr(value)}"
                + (_OBJECT_HINT.format(name=self.name, option=option) if spec.annotation_is_object else "")
            )

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""


PASS_REGISTRY: dict[str, PassInfo] = {}


def register_pass(name: str, *, bounds: Mapping[str, Bounds] | None = None) -> Callable[[PassFn], PassFn]:
    """Decorator: register ``fn(module, *, **options) -> Module`` as the pass ``name``.

    The keyword-only parameters of ``fn`` are its options, typed by their annotations; ``bounds``
    gives the allowed range of numeric options (default: ``(0, None)`` for an ``int`` option)."""

    def decorate(fn: PassFn) -> PassFn:
        if name in PASS_REGISTRY:
            raise ValueError(f"pass {name!r} is registered twice")
        params = inspect.signature(fn).parameters.values()
        options = tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
        unknown = sorted(set(bounds or {}) - set(options))
        if unknown:
            raise ValueError(f"pass {name!r}: bounds given for {unknown}, which are not its options")
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # an annotation that does not resolve: leave those options unchecked
            hints = {}
        specs = {}
        for option in options:
            annotation = hints.get(option, Any)
            default: Bounds = (0, None) if int in _members(annotation) else (None, None)
            specs[option] = PassOption(option, annotation, (bounds or {}).get(option, default))
        PASS_REGISTRY[name] = PassInfo(name, fn, options, specs)
        return fn

    return decorate


_SCALARS = (int, float, bool, str)
_OBJECT_HINT = (
    "; an object option cannot be written in a pipeline string: pass it in the options mapping, "
    "PassManager(pipeline, {{{name!r}: {{{option!r}: value}}}})"
)


def _members(annotation: Any) -> tuple[Any, ...]:
    """The types of a union annotation (``int | None`` -> ``(int, NoneType)``), else itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(typing.get_args(annotation))
    return (annotation,)


def _matches(annotation: Any, value: Any) -> bool:
    """True if ``value`` has the type ``annotation`` says; forms it cannot check pass."""
    for t in _members(annotation):
        if t is Any or t is inspect.Parameter.empty:
            return True
        if t is type(None) or t is None:
            if value is None:
                return True
        elif t is bool:
            if isinstance(value, bool):
                return True
        elif t is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif t is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return True
        elif t is collections.abc.Callable or typing.get_origin(t) is collections.abc.Callable:
            if callable(value):
                return True
        elif isinstance(t, type):
            try:
                if isinstance(value, t):
                    return True
            except TypeError:  # a Protocol that is not runtime_checkable
                return True
        else:
            return True
    return False


def _type_words(annotation: Any) -> str:
    words = {
        int: "an integer",
        float: "a finite number",
        bool: "true or false",
        str: "a string",
        type(None): "None",
        Any: "any value",
    }
    out = []
    for t in _members(annotation):
        if t in words:
            out.append(words[t])
        elif t is collections.abc.Callable or typing.get_origin(t) is collections.abc.Callable:
            out.append("a callable")
        else:
            out.append(f"a {getattr(t, '__name__', str(t))}")
    return " or ".join(out)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
