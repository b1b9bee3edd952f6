"""``from_sglang``: run an existing ``@sgl.function`` program on llmir_lang.

SGLang's frontend builds IR nodes (``sglang.lang.ir``: ``SglConstantText``, ``SglGen``,
``SglSelect``, ``SglRoleBegin`` / ``SglRoleEnd``, ``SglExprList``, ``SglVarScopeBegin`` /
``SglVarScopeEnd``, ``SglVariable``, ...) and appends them to its state ``s``. ``from_sglang(f)``
makes an llmir program whose body is ``f``'s own Python function, called with an ``SGLangState``
in place of SGLang's state: every node the body appends is converted to the llmir primitive with
the same meaning and appended to an llmir ``ProgramState``. So the program is recorded lazily,
optimized and run by llmir (Python control flow on generated values included), and the result is
an ordinary llmir ``ProgramState``.

What differs from running on SGLang, on purpose:

- Roles render through the model's own chat template (llmir's ``apply_chat_template``), not
  SGLang's chat-template table.
- Sampling defaults are llmir's (greedy, unless ``run(temperature=...)`` or the gen says
  otherwise); SGLang's ``run`` defaults to ``temperature=1.0``. ``max_new_tokens=`` is accepted.
- ``select`` scores choices deterministically; a ``temperature > 0`` on a select is refused.
- ``separate_reasoning`` (SGLang's ``SglExprList([expr, SglSeparateReasoning])``, also where a
  ``+`` flattened it into a longer list) becomes llmir's ``separate_reasoning`` around the
  converted ``expr``: the gen's answer replaces its output in the state, as in SGLang's own
  example (``assistant(separate_reasoning(gen(...)))``); around a role, or outside one, SGLang's
  text loses the role's end marker or repeats the answer, and llmir's does not
  (``llmir_lang/dsl/README.md``).

Not supported (a typed ``SGLangConversionError`` says so): images and videos, ``n > 1``,
``unconditional_likelihood_normalized``, and calling another ``@sgl.function`` from the body
(convert it too and call ``g.func(s, ...)``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from llmir_lang.dsl.errors import DSLError, SourceLocation
from llmir_lang.dsl.fork import ForkGroup
from llmir_lang.dsl.function import LMFunction
from llmir_lang.dsl.primitives import Concat, Gen, RoleBlock, RoleMarker, Select, gen, select
from llmir_lang.dsl.reasoning import separate_reasoning
from llmir_lang.dsl.state import ProgramState
from llmir_lang.errors import ProgramError

_ROLES = ("system", "user", "assistant")
# SglSamplingParams field -> llmir gen() argument; fields not listed are checked or dropped below.
_GEN_ARGS = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "stop": "stop",
    "stop_regex": "stop_regex",  # newer SGLang releases
    "stop_token_ids": "stop_token_ids",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "ignore_eos": "ignore_eos",
    "return_logprob": "return_logprob",
    "top_logprobs_num": "top_logprobs_num",
    "logprob_start_len": "logprob_start_len",
    "return_text_in_logprobs": "return_text_in_logprobs",
    "regex": "regex",
    "json_schema": "json_schema",
    "dtype": "dtype",
}


class SGLangNotInstalledError(ProgramError, ImportError):
    """SGLang's frontend (``sglang.lang``) cannot be imported."""


class SGLangConversionError(DSLError):
    """An SGLang node or call that has no llmir equivalent; the message names it."""


def _sglang() -> Any:
    try:
        from sglang.lang import choices, ir
    except Exception as e:  # any import failure of the optional extra is the same problem to the user
        raise SGLangNotInstalledError(
            f"SGLang's frontend could not be imported ({type(e).__name__}: {e}); install the optional "
            "extra: pip install 'llmir_lang[sglang]'"
        ) from e
    return ir, choices


def from_sglang(sgl_function: Any, *, passes: str | None = None, name: str | None = None) -> LMFunction:
    """An llmir program that runs ``sgl_function`` (made by ``@sgl.function``) on llmir's backends.

    The program has the SGLang function's parameters and bound arguments; ``run``, ``run_batch``,
    ``arun`` and ``trace`` are llmir's and return llmir ``ProgramState`` objects.
    """
    ir, _ = _sglang()
    if not isinstance(sgl_function, ir.SglFunction):
        raise SGLangConversionError(
            f"from_sglang takes a function decorated with @sgl.function, got {type(sgl_function).__name__}"
        )
    func: Callable[..., Any] = sgl_function.func

    def body(s: ProgramState, *args: Any, **kwargs: Any) -> None:
        func(SGLangState(s), *args, **kwargs)

    body.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
    body.__name__ = func.__name__
    body.__qualname__ = func.__qualname__
    body.__doc__ = func.__doc__
    return LMFunction(body, passes=passes, name=name or func.__name__, bound=sgl_function.bind_arguments)


class SGLangState:
    """SGLang's ``ProgramState`` interface over an llmir ``ProgramState``: appended SGLang nodes are
    converted (see the module docstring); reads go to the llmir state, with its sync-point rules."""

    def __init__(self, state: ProgramState) -> None:
        self.llmir_state = state
        self._scopes: dict[str, contextlib.ExitStack] = {}  # open SglVarScopeBegin nodes
        self._selects = 0
        self._reasoning: str | None = None  # the model_type of the separate_reasoning being appended

    # --- appending ------------------------------------------------------------------------
    def __iadd__(self, other: Any) -> SGLangState:
        self._append(other)
        return self

    def _append(self, x: Any) -> None:
        ir, _ = _sglang()
        s = self.llmir_state
        if isinstance(x, str):  # plain text, and llmir's traced placeholders (a str subclass)
            s += x
        elif isinstance(x, Concat):  # llmir text + an SGLang node: convert the items one by one
            for item in x.items:
                self._append(item)
        elif isinstance(x, (Gen, Select, RoleBlock)):
            s += x if self._reasoning is None else separate_reasoning(x, self._reasoning)
        elif isinstance(x, RoleMarker):
            s += x
        elif isinstance(x, (list, tuple)):
            for item in x:
                self._append(item)
        elif isinstance(x, ir.SglExprList):
            items = list(x.expr_list)
            k = 0
            while k < len(items):
                if _separates(ir, items, k):
                    self._append_separated(items[k], items[k + 1].model_type)
                    k += 2
                else:
                    self._append(items[k])
                    k += 1
        elif isinstance(x, ir.SglConstantText):
            s += x.value
        elif isinstance(x, ir.SglArgument):
            if x.value is not None:
                self._append(x.value)
        elif isinstance(x, ir.SglGen):
            self._append(convert_gen(x))
        elif isinstance(x, ir.SglSelect):
            self._append(self._convert_select(x))
        elif isinstance(x, (ir.SglRoleBegin, ir.SglRoleEnd)):
            s += RoleMarker(_role(x.role), isinstance(x, ir.SglRoleBegin), SourceLocation.here())
        elif isinstance(x, ir.SglVarScopeBegin):
            stack = contextlib.ExitStack()
            stack.enter_context(s.var_scope(x.name))
            self._scopes[x.name] = stack
        elif isinstance(x, ir.SglVarScopeEnd):
            stack = self._scopes.pop(x.name, None)
            if stack is None:
                raise SGLangConversionError(
                    f"VarScopeEnd({x.name!r}) without a matching begin", where=SourceLocation.here()
                )
            stack.close()
        elif isinstance(x, ir.SglVariable):
            self._append(s[x.name])
        elif isinstance(x, ir.SglCommitLazy):
            pass  # a hint to SGLang's runtime; llmir decides when to run on its own
        else:
            raise SGLangConversionError(_unsupported(x), where=SourceLocation.here())

    def _append_separated(self, expr: Any, model_type: Any) -> None:
        """``expr`` appended with each gen / select in it inside llmir's ``separate_reasoning``."""
        if self._reasoning is not None:
            raise SGLangConversionError(
                "separate_reasoning inside another separate_reasoning; keep one", where=SourceLocation.here()
            )
        separate_reasoning("", model_type)  # the model_type's own error, at the user's line
        self._reasoning = model_type
        try:
            self._append(expr)
        finally:
            self._reasoning = None

    def _convert_select(self, x: Any) -> Select:
        _, choices = _sglang()
        method = x.choices_method
        names = {
            choices.TokenLengthNormalized: "token_length_normalized",
            choices.GreedyTokenSelection: "greedy_token_selection",
        }
        unconditional = getattr(choices, "UnconditionalLikelihoodNormalized", None)
        if unconditional is not None:
            names[unconditional] = "unconditional_likelihood_normalized"
        method_name = next((n for cls, n in names.items() if isinstance(method, cls)), None)
        where = SourceLocation.here()
        if method_name is None:
            raise SGLangConversionError(
                f"select({x.name!r}): choices_method {type(method).__name__} has no llmir equivalent; "
                "use token_length_normalized, greedy_token_selection or unconditional_likelihood_normalized",
                where=where,
            )
        if x.temperature:
            raise SGLangConversionError(
                f"select({x.name!r}): temperature={x.temperature} (sampled selection) is not supported; "
                "llmir picks the best-scoring choice: drop the temperature",
                where=where,
            )
        name = x.name
        if name is None:  # SGLang names an anonymous select; so do we, with a per-program counter
            name = f"select_{self._selects}"
            self._selects += 1
        return select(name, list(x.choices), choices_method=method_name)

    # --- roles, scopes, forks ---------------------------------------------------------------
    def _role(self, role: str, expr: Any) -> Any:
        if expr is not None:
            ir, _ = _sglang()
            node = ir.SglExprList([ir.SglRoleBegin(role), expr, ir.SglRoleEnd(role)])
            self._append(node)
            return node
        return self._role_scope(role)

    @contextlib.contextmanager
    def _role_scope(self, role: str) -> Iterator[SGLangState]:
        self.llmir_state += RoleMarker(role, True, SourceLocation.here())
        yield self
        self.llmir_state += RoleMarker(role, False, SourceLocation.here())

    def system(self, expr: Any = None) -> Any:
        return self._role("system", expr)

    def user(self, expr: Any = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: Any = None) -> Any:
        return self._role("assistant", expr)

    @contextlib.contextmanager
    def var_scope(self, name: str) -> Iterator[SGLangState]:
        with self.llmir_state.var_scope(name):
            yield self

    def fork(self, size: int = 1, position_ids_offset: list[int] | None = None) -> SGLangForkGroup:
        if position_ids_offset is not None:
            raise SGLangConversionError(
                "fork(position_ids_offset=...) is not supported; fork without it",
                where=SourceLocation.here(),
            )
        return SGLangForkGroup(self.llmir_state.fork(size))

    def copy(self, position_ids_offset: list[int] | None = None) -> SGLangState:
        return self.fork(1, position_ids_offset)[0]

    # --- reading ----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self.llmir_state[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self.llmir_state[name] = value

    def __contains__(self, name: object) -> bool:
        return name in self.llmir_state

    def get_var(self, name: str) -> Any:
        return self.llmir_state[name]

    def set_var(self, name: str, value: Any) -> None:
        self.llmir_state[name] = value

    def get_meta_info(self, name: str) -> dict[str, Any]:
        return self.llmir_state.get_meta_info(name)

    def text(self) -> str:
        return self.llmir_state.text()

    def messages(self) -> list[dict[str, str]]:
        return self.llmir_state.messages()

    def sync(self) -> SGLangState:
        self.llmir_state.sync()
        return self

    def error(self) -> BaseException | None:
        return self.llmir_state.error()

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        return self.llmir_state.text_iter(var_name)

    def __repr__(self) -> str:
        return f"SGLangState({self.llmir_state!r})"


class SGLangForkGroup:
    """SGLang's ``ProgramStateGroup`` over an llmir ``ForkGroup``."""

    def __init__(self, group: ForkGroup) -> None:
        self.group = group
        self.states = [SGLangState(b) for b in group.branches]

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> SGLangState:
        return self.states[i]

    def __iter__(self) -> Iterator[SGLangState]:
        return iter(self.states)

    def __setitem__(self, i: int, value: SGLangState) -> None:
        # ``forks[i] += x`` rebinds the item to the same (mutated) state, as in SGLang
        if value is not self.states[i]:
            raise SGLangConversionError("a fork branch can only be appended to, not replaced")

    def __iadd__(self, other: Any) -> SGLangForkGroup:
        """One value for every branch, ``lambda i: ...``, or a list with one value per branch."""
        if callable(other):
            items = [other(i) for i in range(len(self.states))]
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise SGLangConversionError(
                    f"{len(other)} values appended to a fork of {len(self.states)} branches",
                    where=SourceLocation.here(),
                )
            items = list(other)
        else:
            items = [other] * len(self.states)
        for st, item in zip(self.states, items):
            st += item
        return self

    def join(self, mode: str = "gather_variable") -> None:
        self.group.join(mode)


def convert_gen(x: Any) -> Gen:
    """An ``SglGen`` as an llmir ``gen`` with the same sampling parameters and constraint."""
    params = x.sampling_params
    where = SourceLocation.here()
    if params.n not in (None, 1):
        raise SGLangConversionError(
            f"gen({x.name!r}): n={params.n} (several samples per gen) is not supported; fork the state "
            "n times instead",
            where=where,
        )
    args: dict[str, Any] = {}
    for field, arg in _GEN_ARGS.items():
        value = getattr(params, field, None)
        if value is None or (field in ("stop", "stop_regex", "stop_token_ids") and len(value) == 0):
            continue
        if field == "top_k" and value < 0:  # SGLang's "disabled"
            continue
        args[arg] = list(value) if field == "stop_token_ids" else value
    try:
        return gen(x.name, **args)
    except DSLError as e:
        raise SGLangConversionError(e.cause_message, where=where) from None


def _separates(ir: Any, items: list[Any], k: int) -> bool:
    """Whether ``items[k + 1]`` is the ``SglSeparateReasoning`` of ``items[k]``: SGLang's
    ``separate_reasoning(expr, model_type)`` is ``SglExprList([expr, SglSeparateReasoning(
    model_type, expr)])``, which a concatenation flattens into its neighbours
    (``"A: " + separate_reasoning(gen("a"), ...) + "\\n"``)."""
    node = getattr(ir, "SglSeparateReasoning", None)  # SGLang releases before 0.4.6 have none
    if node is None or k + 1 >= len(items):
        return False
    return isinstance(items[k + 1], node) and items[k + 1].expr is items[k]


def _role(role: str) -> str:
    if role not in _ROLES:
        raise SGLangConversionError(
            f"role {role!r} has no llmir equivalent; use one of {_ROLES}", where=SourceLocation.here()
        )
    return role


def _unsupported(x: Any) -> str:
    kind = type(x).__name__
    hints = {
        "SglImage": "images are not supported by llmir's text-only backends",
        "SglVideo": "videos are not supported by llmir's text-only backends",
        "SglSeparateReasoning": "append what sgl.separate_reasoning(expr, model_type) returns, as is",
        "SglConcateAndAppend": "append the branches through forks.join('concate_and_append')",
    }
    hint = hints.get(kind, "append text, gen, select, roles or a list of those")
    return f"cannot convert the SGLang node {kind} ({x!r:.60}): {hint}"


__all__ = [
    "SGLangConversionError",
    "SGLangForkGroup",
    "SGLangNotInstalledError",
    "SGLangState",
    "convert_gen",
    "from_sglang",
]
