"""Composition: inside a program, ``other(s, ...)`` runs ``other``'s body on the state ``s`` (the
text and variables it appends are ``s``'s), and returns what that body returns.

``LMFunction.__call__`` comes here when its first argument (or its ``s=`` keyword) is a
``ProgramState``; anything else is ``run(...)``. The arguments are checked against ``other``'s
signature first, so a missing or unknown one is a ``ProgramArgumentError`` at the caller's line
naming ``other``'s parameters (not a bare ``TypeError`` from the body's call). A ``ForkGroup``
is not a state: ``other(forks, ...)`` would have started a new program with the group as an
argument, so it is refused with what to write instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from llmir_lang.dsl.errors import ProgramArgumentError, SourceLocation
from llmir_lang.dsl.fork import ForkGroup
from llmir_lang.dsl.state import ProgramState

if TYPE_CHECKING:
    from llmir_lang.dsl.function import LMFunction

_NOT_RUN = object()  # compose_call's answer when the call is not a composition (run it)


def compose_call(program: LMFunction, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """``program(state, ...)``'s body on ``state`` (its return value), or ``_NOT_RUN`` when the
    call names no state (the caller runs the program instead)."""
    __tracebackhide__ = True
    first = args[0] if args else kwargs.get("s")
    if isinstance(first, ForkGroup):
        raise ProgramArgumentError(
            f"{program.name}(forks, ...): a fork group is not a state; run the program on each "
            f"branch: `for branch in forks: {program.name}(branch, ...)`",
            program.name,
            SourceLocation.here(),
        )
    if not isinstance(first, ProgramState):
        return _NOT_RUN
    rest = args[1:]
    given = {k: v for k, v in kwargs.items() if not (not args and k == "s")}
    arguments = {**program.bound, **given}
    try:
        program.signature.bind(first, *rest, **arguments)
    except TypeError as e:
        raise ProgramArgumentError(
            f"{program.name}(s, ...): bad arguments: {e} (parameters: {program.arg_names}); called with "
            "a state, a program runs its body on that state and takes its own arguments only (run() "
            "options and sampling defaults belong to the run that the state is part of)",
            program.name,
            SourceLocation.here(),
        ) from None
    return program.func(first, *rest, **arguments)


def is_not_run(value: Any) -> bool:
    return value is _NOT_RUN
