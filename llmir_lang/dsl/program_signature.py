"""What a program's signature may be, checked where ``@function`` makes it: a plain ``def``
(not ``async def``, not a generator), and no parameter named like a keyword option of ``run`` /
``arun`` / ``run_batch`` / ``trace``; and the parameter kinds and sampling aliases that splitting a
call's arguments goes by."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from llmir_lang.dsl.errors import ProgramDefinitionError, SourceLocation

_ALIASES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
_VAR_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_BY_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


# the methods that take program arguments by keyword beside keyword options of their own
_OPTION_METHODS = ("run", "arun", "run_batch", "trace")


@functools.cache
def _option_methods() -> dict[str, list[str]]:
    """Option name -> the methods of ``_OPTION_METHODS`` that take it (``backend``: all four)."""
    from llmir_lang.dsl.function import LMFunction

    out: dict[str, list[str]] = {}
    for method in _OPTION_METHODS:
        for p in inspect.signature(getattr(LMFunction, method)).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                out.setdefault(p.name, []).append(f"{method}()")
    return out


def _check_option_names(params: list[inspect.Parameter], name: str, where: SourceLocation | None) -> None:
    """Refuse a parameter that can be given by keyword and is named like an option of ``run`` /
    ``arun`` / ``run_batch`` / ``trace``: ``f.run(backend=x)`` cannot say whose ``x`` it is, and any
    rule that picks one silently drops the value meant for the other (a test of whether the option
    was given cannot see ``run(stream=False)``, its default)."""
    options = _option_methods()
    for p in params:
        methods = options.get(p.name)
        if methods is None or p.kind not in _BY_KEYWORD:
            continue
        takers = methods[0] if len(methods) == 1 else f"{', '.join(methods[:-1])} and {methods[-1]}"
        raise ProgramDefinitionError(
            f"parameter {p.name!r} has the name of the option {p.name}= of {takers}, so a call such as "
            f"`{name}.{methods[0][:-2]}(..., {p.name}=...)` cannot tell the program's argument from the "
            f"option (SGLang's run() takes such a keyword for itself too); rename the parameter "
            f"(e.g. {p.name}_)",
            name,
            where,
        )


def _check_plain_def(func: Callable[..., Any], name: str, where: SourceLocation | None) -> None:
    """Refuse an ``async def`` or generator body: calling it only makes a coroutine or generator
    object, so the body would never run (the state would stay empty, with a "never awaited"
    warning at exit)."""
    if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        kind = "an async generator" if inspect.isasyncgenfunction(func) else "an async def"
        raise ProgramDefinitionError(
            f"a program body must be a plain def, not {kind}: calling one runs none of its code, "
            f"so the program would do nothing; write `def {name}(s, ...)` (gens need no await) and, to "
            f"run it without blocking an event loop, call `await {name}.arun(...)`",
            name,
            where,
        )
    if inspect.isgeneratorfunction(func):
        raise ProgramDefinitionError(
            "a program body must be a plain def, not a generator function (it contains yield): "
            f"calling one runs none of its code, so the program would do nothing; remove the yield from "
            f"`def {name}(s, ...)` (to stream text as it is generated, call "
            f"`{name}.run(..., stream=True)` and iterate `state.text_iter()`)",
            name,
            where,
        )
