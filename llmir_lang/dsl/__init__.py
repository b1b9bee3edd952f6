"""The DSL frontend: programs written in Python, recorded lazily into IR segments, optimized and run.

``@function def f(s, ...)`` makes a program; inside it ``s += "text"``, ``s += gen("x")``,
``s += select("y", choices=[...])``, roles (``system`` / ``user`` / ``assistant``), ``s.fork(n)``
and ``s["x"]`` (a sync point: the recorded segment runs, then the program resumes with the value).
See ``llmir_lang/dsl/README.md`` for a tour.
"""

from __future__ import annotations

from llmir_lang.dsl.errors import (
    DSLError,
    ForkError,
    GenerationError,
    InvalidAppendError,
    NoBackendError,
    ProgramArgumentError,
    ProgramDefinitionError,
    ProgramExecutionError,
    ProgramInterruptedError,
    RoleError,
    UnknownVariableError,
    VariableRedefinedError,
)
from llmir_lang.dsl.fork import ForkGroup
from llmir_lang.dsl.function import LMFunction, function
from llmir_lang.dsl.primitives import (
    assistant,
    assistant_begin,
    assistant_end,
    gen,
    gen_int,
    gen_string,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from llmir_lang.dsl.recorder import GenerationNotSupportedError
from llmir_lang.dsl.runtime import Runtime, get_default_backend, set_default_backend
from llmir_lang.dsl.state import ProgramState

__all__ = [
    "DSLError",
    "ForkError",
    "ForkGroup",
    "GenerationError",
    "GenerationNotSupportedError",
    "InvalidAppendError",
    "LMFunction",
    "NoBackendError",
    "ProgramArgumentError",
    "ProgramDefinitionError",
    "ProgramExecutionError",
    "ProgramInterruptedError",
    "ProgramState",
    "RoleError",
    "Runtime",
    "UnknownVariableError",
    "VariableRedefinedError",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "function",
    "gen",
    "gen_int",
    "gen_string",
    "get_default_backend",
    "select",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "user",
    "user_begin",
    "user_end",
]
