"""The DSL frontend: programs written in Python, recorded lazily into IR segments, optimized and run.

``@function def f(s, ...)`` makes a program; inside it ``s += "text"``, ``s += gen("x")``,
``s += select("y", choices=[...])``, roles (``system`` / ``user`` / ``assistant``), ``s.fork(n)``
and ``s["x"]`` (a sync point: the recorded segment runs, then the program resumes with the value).
See ``llmir_lang/dsl/README.md`` for a tour.
"""

from __future__ import annotations

from llmir_lang.dsl.errors import (
    DSLError,
    FeatureNotSupportedError,
    ForkError,
    GenerationError,
    InvalidAppendError,
    InvalidJoinModeError,
    NoBackendError,
    ProgramArgumentError,
    ProgramDefinitionError,
    ProgramExecutionError,
    ProgramInterruptedError,
    RoleError,
    SeparateReasoningError,
    UnknownVariableError,
    UnsupportedReasoningFormatError,
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
    image,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
    video,
)
from llmir_lang.dsl.reasoning import separate_reasoning
from llmir_lang.dsl.recorder import GenerationNotSupportedError
from llmir_lang.dsl.runtime import (
    Runtime,
    flush_cache,
    get_default_backend,
    get_server_info,
    set_default_backend,
)
from llmir_lang.dsl.state import ProgramState, StateCopy

# SGLang's choices methods, for select(..., choices_method=...) (their names work as well)
from llmir_lang.executor.choices import (
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)

__all__ = [
    "DSLError",
    "FeatureNotSupportedError",
    "ForkError",
    "ForkGroup",
    "GenerationError",
    "GenerationNotSupportedError",
    "InvalidAppendError",
    "InvalidJoinModeError",
    "LMFunction",
    "NoBackendError",
    "ProgramArgumentError",
    "ProgramDefinitionError",
    "ProgramExecutionError",
    "ProgramInterruptedError",
    "ProgramState",
    "StateCopy",
    "RoleError",
    "Runtime",
    "SeparateReasoningError",
    "UnknownVariableError",
    "UnsupportedReasoningFormatError",
    "VariableRedefinedError",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "flush_cache",
    "function",
    "gen",
    "gen_int",
    "gen_string",
    "get_default_backend",
    "get_server_info",
    "greedy_token_selection",
    "image",
    "select",
    "separate_reasoning",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
    "user",
    "user_begin",
    "user_end",
    "video",
]
