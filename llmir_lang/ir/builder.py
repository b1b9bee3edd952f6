"""Builders: the API the DSL records programs with.

Usage (one program, two branches)::

    mb = ModuleBuilder()
    f = mb.function("qa", params=["q"])
    s = f.start()
    s = f.role_begin(s, "user")
    s = f.text(s, "Question: ")
    s = f.append(s, f.param("q"))
    s = f.role_end(s, "user")
    a, b = f.fork(s, 2)
    a = f.gen(a, "x", max_tokens=16, stop=["\\n"])
    b = f.select(b, "y", ["yes", "no"])
    s = f.join(s, [a, b])
    f.ret(s)
    module = mb.build()          # verified

Every method validates its arguments at once and raises ``IRVerifyError`` with the cause, so the
DSL can report the error at the user's line. Results are named ``%0, %1, ...`` in creation order
(parameters keep their own names), and the body is kept in creation order, which is therefore
definition order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from llmir_lang.errors import IRVerifyError
from llmir_lang.ir import ops as K
from llmir_lang.ir.attrs import (
    CHOICES_METHODS,
    GEN_ATTRS,
    ROLES,
    AttrValue,
    constraint_problem,
    normalize_attrs,
    sampling_problem,
)
from llmir_lang.ir.module import Function, Module
from llmir_lang.ir.ops import SIGNATURES, Op
from llmir_lang.ir.reasoning import reasoning_format_problem
from llmir_lang.ir.values import Value, ValueType, is_value_name
from llmir_lang.ir.verifier import verify as verify_module

DEFAULT_CHOICES_METHOD = "token_length_normalized"


class FunctionBuilder:
    """Records the body of one function. Obtain it from ``ModuleBuilder.function``."""

    def __init__(self, name: str, params: Sequence[str] = ()) -> None:
        self.name = name
        self._params: dict[str, Value] = {}
        for p in params:
            if not is_value_name(p):
                raise IRVerifyError(
                    f"function @{name}: parameter name {p!r} is not a valid value name; "
                    "use letters (any script), digits, '_', '.', '$'"
                )
            if p in self._params:
                raise IRVerifyError(f"function @{name}: parameter %{p} is declared twice")
            self._params[p] = Value(p, ValueType.TEXT)
        self._ops: list[Op] = []
        self._defined: set[str] = set(self._params)
        self._counter = 0
        self._returned = False
        # called with (kind, label, attrs) before each op is added (the DSL's trace checks that
        # no text made from a traced placeholder enters the IR)
        self.op_hook: Callable[[str, str | None, Mapping[str, object]], None] | None = None

    # --- values -------------------------------------------------------------------------
    def param(self, name: str) -> Value:
        """The text value of parameter ``name``."""
        try:
            return self._params[name]
        except KeyError:
            known = ", ".join(self._params) or "none"
            raise IRVerifyError(
                f"function @{self.name} has no parameter {name!r}; parameters: {known}"
            ) from None

    def _fresh(self, type_: ValueType) -> Value:
        while str(self._counter) in self._defined:
            self._counter += 1
        v = Value(str(self._counter), type_)
        self._counter += 1
        self._defined.add(v.name)
        return v

    # --- ops ----------------------------------------------------------------------------
    def op(
        self,
        kind: str,
        operands: Sequence[Value] = (),
        label: str | None = None,
        attrs: Mapping[str, object] | None = None,
        n_results: int = 1,
    ) -> tuple[Value, ...]:
        """Append a generic op and return its results. The typed methods below all call this."""
        if self._returned:
            raise IRVerifyError(f"function @{self.name} already returned; no op can follow return")
        sig = SIGNATURES.get(kind)
        if sig is None:
            raise IRVerifyError(f"unknown op kind {kind!r}; known kinds: {', '.join(SIGNATURES)}")
        for i, v in enumerate(operands):
            if v.name not in self._defined:
                raise IRVerifyError(f"{kind}: operand {v} is not a value of function @{self.name}")
            want = sig.operand_type(i)
            if want is not None and v.type != want:
                raise IRVerifyError(f"{kind}: operand {i} ({v}) is {v.type} but must be {want}")
        if self.op_hook is not None:
            self.op_hook(kind, label, attrs or {})
        count = sig.n_results if sig.n_results is not None else n_results
        results = tuple(self._fresh(sig.results) for _ in range(count)) if sig.results else ()
        op = Op(kind, results, tuple(operands), label, normalize_attrs(attrs or {}, _SCHEMAS.get(kind)))
        self._ops.append(op)
        if kind == K.RETURN:
            self._returned = True
        return results

    def start(self) -> Value:
        """A new empty state (the beginning of a program's text)."""
        return self.op(K.START)[0]

    def text(self, state: Value, text: str) -> Value:
        """Append the constant ``text``."""
        _need_str(text, "text", allow_empty=True)
        return self.op(K.TEXT, [state], text)[0]

    def role_begin(self, state: Value, role: str) -> Value:
        _need_role(role)
        return self.op(K.ROLE_BEGIN, [state], role)[0]

    def role_end(self, state: Value, role: str) -> Value:
        _need_role(role)
        return self.op(K.ROLE_END, [state], role)[0]

    def append(self, state: Value, value: Value) -> Value:
        """Append a run-time text value (a parameter or a ``var`` read)."""
        return self.op(K.APPEND, [state, value])[0]

    def gen(self, state: Value, name: str, **params: AttrValue) -> Value:
        """Generate into variable ``name``.

        ``params`` are sampling parameters (``max_tokens``, ``stop``, ``temperature``, ... see
        ``attrs.SAMPLING_ATTRS``) and at most one constraint (``regex``, ``json_schema``,
        ``choices``, ``grammar`` or ``dtype``), all as plain strings / numbers / lists.
        """
        _need_str(name, "gen name")
        unknown = sorted(set(params) - set(GEN_ATTRS))
        if unknown:
            raise IRVerifyError(f"gen {name!r}: unknown parameter(s) {unknown}; known: {sorted(GEN_ATTRS)}")
        attrs = normalize_attrs(params, GEN_ATTRS)
        problem = sampling_problem(attrs) or constraint_problem(attrs)
        if problem is None and "reasoning" in attrs:
            problem = reasoning_format_problem(attrs["reasoning"])
        if problem is not None:
            raise IRVerifyError(f"gen {name!r}: {problem}")
        return self.op(K.GEN, [state], name, params)[0]

    def select(
        self,
        state: Value,
        name: str,
        choices: Sequence[str],
        choices_method: str = DEFAULT_CHOICES_METHOD,
        reasoning: str | None = None,
    ) -> Value:
        """Pick one of ``choices`` into variable ``name``.

        A repeated choice is kept out of ``choices`` (each distinct choice is scored once) and
        recorded in ``choices_given``: the program's list as indices into ``choices``, so that
        the meta info has one entry per choice as given (``attrs.SELECT_ATTRS``). ``reasoning``
        (a format of ``reasoning.FORMATS``) splits the picked choice as ``separate_reasoning``
        does: the value is its answer, ``<name>_reasoning_content`` its reasoning."""
        _need_str(name, "select name")
        if isinstance(choices, str):
            raise IRVerifyError(f"select {name!r}: choices must be a list of strings, not one string")
        if choices_method not in CHOICES_METHODS:
            raise IRVerifyError(
                f"select {name!r}: unknown choices_method {choices_method!r}; use one of {CHOICES_METHODS}"
            )
        attrs: dict[str, object] = {"choices": list(choices), "choices_method": choices_method}
        if reasoning is not None:
            problem = reasoning_format_problem(reasoning)
            if problem is not None:
                raise IRVerifyError(f"select {name!r}: {problem}")
            attrs["reasoning"] = reasoning
        given = list(choices)
        # NOTE: anything but strings is left as given, for the verifier to name
        if all(isinstance(c, str) for c in given) and len(set(given)) < len(given):
            distinct = list(dict.fromkeys(given))
            index = {c: i for i, c in enumerate(distinct)}
            attrs.update(choices=distinct, choices_given=[index[c] for c in given])
        return self.op(K.SELECT, [state], name, attrs)[0]

    def fork(self, state: Value, n: int) -> tuple[Value, ...]:
        """``n`` branches that each start with the text of ``state``."""
        if not isinstance(n, int) or n < 1:
            raise IRVerifyError(f"fork: the number of branches must be an integer >= 1, got {n!r}")
        return self.op(K.FORK, [state], n_results=n)

    def join(self, parent: Value, branches: Sequence[Value], mode: str = "gather") -> Value:
        """Continue ``parent`` once all ``branches`` (forked from it) have ended.

        mode "gather": the parent's text is unchanged; read branch variables from the branch
        states. mode "concat": the text each branch added after the fork is appended, in order.
        """
        return self.op(K.JOIN, [parent, *branches], None, {"mode": mode})[0]

    def var(self, state: Value, name: str) -> Value:
        """The text of variable ``name`` (a gen/select visible in ``state``), as a text value."""
        _need_str(name, "variable name")
        return self.op(K.VAR, [state], name)[0]

    def ret(self, *states: Value) -> None:
        """End the function; ``states[0]`` is the program's final state."""
        self.op(K.RETURN, list(states))

    def build(self) -> Function:
        if not self._returned:
            raise IRVerifyError(f"function @{self.name} has no return; call ret(final_state) last")
        return Function(self.name, tuple(self._params.values()), tuple(self._ops))


_SCHEMAS = {K.GEN: GEN_ATTRS}


class ModuleBuilder:
    """Collects functions into a ``Module``."""

    def __init__(self) -> None:
        self._builders: list[FunctionBuilder] = []

    def function(self, name: str, params: Sequence[str] = ()) -> FunctionBuilder:
        if any(b.name == name for b in self._builders):
            raise IRVerifyError(f"function @{name} is defined twice in this module; pick another name")
        b = FunctionBuilder(name, params)
        self._builders.append(b)
        return b

    def build(self, verify: bool = True) -> Module:
        """The module; verified unless ``verify=False``."""
        module = Module(tuple(b.build() for b in self._builders))
        if verify:
            verify_module(module)
        return module


def _need_role(role: object) -> None:
    if role not in ROLES:
        raise IRVerifyError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")


def _need_str(value: object, what: str, allow_empty: bool = False) -> None:
    if not isinstance(value, str) or (not allow_empty and value == ""):
        raise IRVerifyError(f"{what} must be a {'' if allow_empty else 'non-empty '}string, got {value!r}")
