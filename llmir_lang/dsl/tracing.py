"""``LMFunction.trace``: a program's IR without running it (parameters not given stay IR
parameters), and what is built on it: SGLang's ``cache`` (prefill the program's constant
beginning) and its deprecated ``compile``."""

from __future__ import annotations

import inspect
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from llmir_lang.dsl.chat_roles import chat_roles
from llmir_lang.dsl.errors import DSLError
from llmir_lang.dsl.recorder import ProgramRun
from llmir_lang.dsl.runtime import cache_prefix, get_default_backend, resolve_backend
from llmir_lang.dsl.state import ProgramState
from llmir_lang.dsl.traced_text import TracedText
from llmir_lang.executor.backend import Backend
from llmir_lang.ir import Module, verify
from llmir_lang.ir import ops as K
from llmir_lang.optimizer.canonicalize import canonicalize

if TYPE_CHECKING:
    from llmir_lang.dsl.function import LMFunction


class _Tracing:
    """``trace`` / ``cache`` / ``compile`` of ``LMFunction``. Needs of the program: ``name``,
    ``signature``, ``arg_names``, ``_split``, ``_call`` and ``_wrap``."""

    name: str
    signature: inspect.Signature
    arg_names: list[str]
    _split: Callable[..., tuple[dict, dict]]
    _call: Callable[[ProgramState, Mapping[str, Any]], Any]
    _wrap: Callable[[BaseException], Exception]

    # --- SGLang's cache / compile ------------------------------------------------------------
    def cache(self, backend: Backend | None = None) -> str:
        """Compute the KV of the program's constant beginning (its text and roles before the
        first gen, select or argument) into ``backend``'s prefix cache now (default: the default
        backend), as SGLang's ``cache()``; later runs start from it. Returns the text cached (""
        when the program starts with an argument or a gen). A body that cannot be traced with its
        arguments unknown caches nothing, with a warning."""
        chosen = resolve_backend(backend, self.name)
        try:
            module = self._trace((), chosen, {})
        except DSLError as e:
            warnings.warn(
                f"cache(): program {self.name!r} cannot be traced with its arguments unknown, so "
                f"nothing was cached ({e.cause_message}); bind() the arguments it computes with",
                stacklevel=2,
            )
            return ""
        prefix, state = "", None
        for op in canonicalize(module, template=chat_roles(chosen)).functions[0].ops:
            if op.kind == K.START and state is None:
                state = op.result
            elif op.kind == K.TEXT and op.operands == (state,):
                prefix, state = prefix + (op.label or ""), op.result
            else:
                break
        if prefix:
            cache_prefix(chosen, prefix)
        return prefix

    def compile(self, *, backend: Backend | None = None) -> LMFunction:
        """Deprecated in SGLang, and not needed here: every run is traced and optimized whole.
        Warns and returns the program itself, so ``f.compile().run(...)`` still runs."""
        warnings.warn(
            "compile() is deprecated (as in SGLang) and does nothing: llmir_lang optimizes every "
            "run as a whole; call run() / run_batch() directly",
            DeprecationWarning,
            stacklevel=2,
        )
        return self

    # --- tracing -------------------------------------------------------------------------
    def trace(self, *args: Any, backend: Backend | None = None, **kwargs: Any) -> Module:
        """The program's IR without running it. Parameters not given become IR parameters, and
        reading a variable records a ``var`` op (its value in Python is the placeholder
        ``{name}``, so control flow on it follows one path)."""
        return self._trace(args, backend, kwargs)

    def _trace(self, args: tuple[Any, ...], backend: Backend | None, kwargs: Mapping[str, Any]) -> Module:
        arguments, defaults = self._split(args, kwargs, partial=True)
        missing = [
            p for p in self.arg_names
            if p not in arguments and self.signature.parameters[p].default is inspect.Parameter.empty
        ]  # fmt: skip
        chosen = backend if backend is not None else get_default_backend()
        run = ProgramRun(self.name, self.name, chosen, None, defaults, params=missing)
        for p in missing:
            arguments[p] = TracedText(p, run.builder.param(p), id(run))
        for p in self.arg_names:
            default = self.signature.parameters[p].default
            if p not in arguments and default is not inspect.Parameter.empty:
                arguments[p] = default
        state = ProgramState(run)
        run.thread = threading.get_ident()
        try:
            self._call(state, arguments)
        except Exception as e:
            raise self._wrap(e) from e.__cause__
        finally:
            run.finished.set()
        run.value(state)
        live = [st._value for st in run.states if st._value is not None]
        run.builder.ret(*live)
        module = Module((run.builder.build(),))
        verify(module)
        return module
