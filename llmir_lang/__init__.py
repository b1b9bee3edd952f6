"""llmir_lang: language-model programs, traced to an IR, optimized whole, run fast.

``import llmir_lang as llmir``::

    @llmir.function
    def qa(s, question):
        s += llmir.user(question)
        s += llmir.assistant(llmir.gen("answer", max_tokens=32))

    llmir.set_default_backend(llmir.Runtime())   # the bundled model
    print(qa.run(question="What is 2 + 3?")["answer"])

The public names come from ``llmir_lang.dsl`` (and the remote backends ``Endpoint`` /
``RuntimeEndpoint`` / ``OpenAI`` from ``llmir_lang.executor.remote``) and load on first use, so that importing a lower layer
(``llmir_lang.executor.engine``, ``llmir_lang.ir``) does not load the frontend.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_PUBLIC = (
    "DSLError",
    "FeatureNotSupportedError",
    "ForkError",
    "ForkGroup",
    "GenerationError",
    "GenerationNotSupportedError",
    "InvalidAppendError",
    "InvalidJoinModeError",
    "NoBackendError",
    "ProgramArgumentError",
    "ProgramDefinitionError",
    "ProgramExecutionError",
    "ProgramInterruptedError",
    "RoleError",
    "SeparateReasoningError",
    "UnknownVariableError",
    "UnsupportedReasoningFormatError",
    "VariableRedefinedError",
    "LMFunction",
    "ProgramState",
    "StateCopy",
    "Runtime",
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
)

_REMOTE = ("Endpoint", "OpenAI", "RuntimeEndpoint")
# module that defines each of these (loaded on first use)
_EXTRAS = {
    "from_sglang": "llmir_lang.dsl.sglang_interop",
    "display_stream": "llmir_lang.dsl.notebook",
    "Engine": "llmir_lang.server.offline_engine",
}

__all__ = ["ProgramError", "__version__", *_PUBLIC, *_REMOTE, *_EXTRAS]


def __getattr__(name: str) -> Any:
    if name in _EXTRAS:
        import importlib

        return getattr(importlib.import_module(_EXTRAS[name]), name)
    if name in _PUBLIC:
        from llmir_lang import dsl

        return getattr(dsl, name)
    if name in _REMOTE:
        from llmir_lang.executor import remote

        return getattr(remote, name)
    if name == "ProgramError":
        from llmir_lang.errors import ProgramError

        return ProgramError
    raise AttributeError(f"module 'llmir_lang' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC, *_REMOTE, *_EXTRAS, "ProgramError"])


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext llmir_lang``: registers the ``%%llmir`` cell magic."""
    from llmir_lang.dsl import notebook

    notebook.load_ipython_extension(ipython)
