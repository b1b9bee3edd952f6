"""The IR verifier: checks a module is well formed, raising ``IRVerifyError`` on the first problem.

Rules:

- Function names are unique; parameter and result names are unique in a function (SSA) and are
  value names (``values.is_value_name``: what the printer and the parser read back).
- Every operand is defined before it is used (parameters, then op results in body order), with the
  type its op expects; op shapes (operand / result counts, label) match ``ops.SIGNATURES``.
- The body ends with exactly one ``return``.
- Attributes are known for their op kind and well typed (``attrs``), nest at most
  ``MAX_ATTR_DEPTH`` deep and hold no NaN nor unprintable integer; sampling parameters are in the
  engine's ranges (``attrs.sampling_problem``); a gen has at most one constraint, and the run
  path's constraint code accepts it (``attrs.constraint_problem``: a regex or grammar that
  parses, a JSON schema it supports, distinct choices; cached per constraint); a select has
  distinct non-empty choices, a known ``choices_method``, and a ``choices_given`` (the program's
  list with its repeats) only where a choice repeats, in one spelling: each index names a
  choice, and ``choices`` lists them in order of their first use; a join's mode is known; a
  ``gen.chain``'s segments are gen / text dicts beginning and ending with a gen; ``pin_users``
  is not negative. A gen's or select's ``reasoning`` names a format of ``reasoning.FORMATS``
  (the op also defines ``<name>_reasoning_content``); in a ``gen.chain`` only the last gen may
  have one (the text after such a gen is its answer, which one request cannot continue from).
- Roles: a role is one of ``attrs.ROLES``. Along a chain roles do not nest and ``role.end "r"``
  closes the open role ``r``. What is open at ``start`` is unknown (the DSL starts a new segment
  with ``start`` and the text so far, which may be inside a role), so a chain's first role op may
  be a ``role.end``; a fork's branches inherit the open role and a join continues its parent's.
- Scopes: the variables visible in a state are those defined along its chain (operand 0 back to
  ``start``; a join continues its parent's scope). Defining a name already visible is an error,
  and ``var`` may only read a visible name. As in the DSL (whose join gathers the branches'
  variables into the parent), a name any joined branch defined after the fork is taken in the
  join's chain: defining it again there is an error. ``var`` still reads it from a branch state
  only, since a join's text and variables are its parent's.
- ``join %p, %b...``: every branch must descend from ``%p`` (through operand 0), not be ``%p``, and
  appear once.
"""

from __future__ import annotations

from llmir_lang.errors import IRVerifyError
from llmir_lang.ir import ops as K
from llmir_lang.ir.attrs import (
    ANNOTATION_ATTRS,
    CHOICES_METHODS,
    CONSTRAINT_ATTRS,
    DTYPES,
    GEN_ATTRS,
    GEN_CHAIN_ATTRS,
    JOIN_ATTRS,
    JOIN_MODES,
    ROLES,
    SELECT_ATTRS,
    AttrValue,
    attr_value_problem,
    check_type,
    constraint_problem,
    sampling_problem,
)
from llmir_lang.ir.module import Function, Module
from llmir_lang.ir.ops import SIGNATURES, Op
from llmir_lang.ir.printer import format_op
from llmir_lang.ir.reasoning import reasoning_format_problem
from llmir_lang.ir.scopes import StateTree, first_scope_problem
from llmir_lang.ir.values import ValueType, is_value_name

# The open role of a state whose chain began with ``start``, before any role op: not known.
_ROLE_UNKNOWN = "<unknown>"

_KIND_ATTRS: dict[str, dict[str, str]] = {
    K.GEN: GEN_ATTRS,
    K.SELECT: SELECT_ATTRS,
    K.JOIN: JOIN_ATTRS,
    K.GEN_CHAIN: GEN_CHAIN_ATTRS,
}


def verify(module: Module) -> None:
    """Raise ``IRVerifyError`` if ``module`` breaks a rule of the module docstring."""
    if not isinstance(module, Module):
        from llmir_lang.ir.printer import _what

        raise IRVerifyError(f"verify takes a Module, got {_what(module)}")
    seen: set[str] = set()
    for fn in module.functions:
        if fn.name in seen:
            raise IRVerifyError(f"function @{fn.name} is defined twice in the module; rename one")
        seen.add(fn.name)
        _FunctionVerifier(fn).run()


def _describe(op: Op) -> str:
    """``op`` printed for an error message; without its attributes if they cannot be printed
    (an integer too long for ``str``, values nested past the recursion limit)."""
    try:
        return format_op(op)
    except (ValueError, RecursionError):
        return format_op(Op(op.kind, op.results, op.operands, op.label)) + " {...}"


class _FunctionVerifier:
    def __init__(self, fn: Function) -> None:
        self.fn = fn
        self.types: dict[str, ValueType] = {}
        self.defined_at: dict[str, str] = {}
        # the states and what each defines; scopes are checked after the ops (``scopes``)
        self.tree = StateTree()
        self.late = False  # the op being checked is past the point where its scope is checked
        self.role: dict[str, str | None] = {}  # state -> the open role (None: none is open)

    def fail(self, op: Op | None, message: str) -> IRVerifyError:
        where = f"in function @{self.fn.name}"
        if op is not None:
            line = f" (line {op.line})" if op.line is not None else ""
            where += f", op `{_describe(op)}`{line}"
        return IRVerifyError(f"{where}: {message}")

    def run(self) -> None:
        for p in self.fn.params:
            if p.type != ValueType.TEXT:
                raise self.fail(None, f"parameter {p} must have type text, not {p.type}")
            self._define(None, p.name, p.type, "a parameter")
        for op in self.fn.ops[:-1]:
            if op.kind == K.RETURN:
                raise self.fail(op, "return must be the last op; nothing may follow it")
        if not self.fn.ops or self.fn.ops[-1].kind != K.RETURN:
            raise self.fail(None, "the body must end with `return %state`")
        # The ops one by one, then the scopes of those that passed in one walk of the state tree:
        # the error raised is the one of the earliest op, as if each op's scope were checked in
        # its turn (after its attributes, before its roles and results).
        failure: tuple[int, bool, IRVerifyError] | None = None
        for index, op in enumerate(self.fn.ops):
            self.late = False
            try:
                self._check_op(index, op)
            except IRVerifyError as e:
                failure = (index, self.late, e)
                break
        problem = first_scope_problem(self.tree, _describe)
        if problem is not None and (
            failure is None or problem.index < failure[0] or (problem.index == failure[0] and failure[1])
        ):
            raise self.fail(problem.op, problem.message)
        if failure is not None:
            raise failure[2]

    def _define(self, op: Op | None, name: str, type_: ValueType, what: str) -> None:
        if not is_value_name(name):
            raise self.fail(
                op,
                f"{name!r} is not a valid value name, so it cannot be printed and parsed back; "
                "use letters (any script), digits, '_', '.', '$'",
            )
        if name in self.types:
            raise self.fail(
                op,
                f"%{name} is defined twice (first as {self.defined_at[name]}); SSA values are defined once",
            )
        self.types[name] = type_
        self.defined_at[name] = what

    def _check_op(self, index: int, op: Op) -> None:
        sig = SIGNATURES.get(op.kind)
        if sig is None:
            raise self.fail(op, f"unknown op kind {op.kind!r}; known kinds: {', '.join(SIGNATURES)}")
        self._check_shape(op, sig)
        for i, v in enumerate(op.operands):
            if v.name not in self.types:
                raise self.fail(op, f"{v} is used before it is defined")
            want = sig.operand_type(i)
            if self.types[v.name] != want or v.type != want:
                raise self.fail(op, f"operand {i} ({v}) is {self.types[v.name]} but {op.kind} needs {want}")
        self._check_attrs(op)
        if op.kind == K.JOIN:
            self._check_join(op)
        self._record_scope(index, op)
        self.late = True
        self._check_roles(op)
        line = f"line {op.line}" if op.line is not None else f"the result of {op.kind}"
        for v in op.results:
            self._define(op, v.name, v.type, line)

    def _check_shape(self, op: Op, sig: K.OpSignature) -> None:
        fixed = len(sig.operands)
        if sig.variadic is None and len(op.operands) != fixed:
            raise self.fail(op, f"{op.kind} takes {fixed} operand(s), got {len(op.operands)}")
        if sig.variadic is not None and len(op.operands) < fixed + sig.min_variadic:
            raise self.fail(op, f"{op.kind} takes at least {fixed + sig.min_variadic} operand(s)")
        if sig.n_results is not None and len(op.results) != sig.n_results:
            raise self.fail(op, f"{op.kind} has {sig.n_results} result(s), got {len(op.results)}")
        if sig.n_results is None and not op.results:
            raise self.fail(op, f"{op.kind} needs at least one result")
        for v in op.results:
            if v.type != sig.results:
                raise self.fail(op, f"result {v} must have type {sig.results}")
        if sig.label == "none" and op.label is not None:
            raise self.fail(op, f"{op.kind} takes no string argument")
        if sig.label == "any" and op.label is None:
            raise self.fail(op, f"{op.kind} needs a string argument")
        if sig.label == "name" and not op.label:
            raise self.fail(op, f"{op.kind} needs a non-empty name string")

    def _check_attrs(self, op: Op) -> None:
        schema = {**_KIND_ATTRS.get(op.kind, {}), **ANNOTATION_ATTRS}
        for key, value in op.attrs.items():
            spec = schema.get(key)
            if spec is None:
                raise self.fail(op, f"unknown attribute {key!r} for {op.kind}; known: {sorted(schema)}")
            problem = attr_value_problem(value)  # first: such a value may not even have a repr
            if problem is not None:
                raise self.fail(op, f"attribute {key!r}: {problem}")
            if not check_type(value, spec):
                raise self.fail(op, f"attribute {key!r} must be {spec}, got {value!r}")
        pin_users = op.attrs.get("pin_users")
        if isinstance(pin_users, int) and pin_users < 0:
            raise self.fail(
                op, f"pin_users counts the users of a pinned prefix; it must be >= 0, got {pin_users}"
            )
        if op.kind == K.GEN:
            self._check_gen_attrs(op, op.attrs, "gen", op.label)
        elif op.kind == K.SELECT:
            choices = op.attrs.get("choices")
            if choices is None:
                raise self.fail(op, "select needs a 'choices' attribute (a list of strings)")
            assert isinstance(choices, tuple)
            if not choices or any(c == "" for c in choices) or len(set(choices)) != len(choices):
                raise self.fail(op, f"select choices must be distinct non-empty strings, got {choices!r}")
            given = op.attrs.get("choices_given")
            if isinstance(given, tuple):  # its type (int[]) is checked above: every entry is kept
                problem = _choices_given_problem([k for k in given if isinstance(k, int)], len(choices))
                if problem is not None:
                    raise self.fail(op, f"select choices_given {list(given)!r}: {problem}")
            method = op.attrs.get("choices_method", CHOICES_METHODS[0])
            if method not in CHOICES_METHODS:
                raise self.fail(op, f"select choices_method must be one of {CHOICES_METHODS}, got {method!r}")
            if "reasoning" in op.attrs:
                self._check_reasoning(op, op.attrs["reasoning"], "select")
        elif op.kind == K.JOIN:
            if op.attrs.get("mode") not in JOIN_MODES:
                raise self.fail(op, f"join needs mode one of {JOIN_MODES}, got {op.attrs.get('mode')!r}")
        elif op.kind == K.GEN_CHAIN:
            self._check_segments(op)

    def _check_gen_attrs(self, op: Op, attrs: dict[str, AttrValue], what: str, name: str | None) -> None:
        constraints = sorted(k for k in attrs if k in CONSTRAINT_ATTRS)
        if len(constraints) > 1:
            raise self.fail(op, f"{what} has several constraints {constraints}; keep at most one")
        if "dtype" in attrs and attrs["dtype"] not in DTYPES:
            raise self.fail(op, f"{what} dtype must be one of {DTYPES}, got {attrs['dtype']!r}")
        if "choices" in attrs and not attrs["choices"]:
            raise self.fail(op, f"{what} choices constraint must not be empty")
        if "reasoning" in attrs:
            self._check_reasoning(op, attrs["reasoning"], what)
        problem = sampling_problem(attrs)
        if problem is not None:
            raise self.fail(op, f"{what}: {problem}")
        problem = constraint_problem(attrs)  # last: it may compile the constraint (cached)
        if problem is not None:
            raise self.fail(op, f"{what} {name!r}: {problem}")

    def _check_segments(self, op: Op) -> None:
        segments = op.attrs.get("segments")
        if not isinstance(segments, tuple) or not segments:
            raise self.fail(op, "gen.chain needs a non-empty 'segments' list")
        for i, seg in enumerate(segments):
            assert isinstance(seg, dict)
            if ("gen" in seg) == ("text" in seg):
                raise self.fail(op, f"segment {i} must have exactly one of 'gen' or 'text'")
            if "text" in seg:
                if set(seg) != {"text"} or not isinstance(seg["text"], str):
                    raise self.fail(op, f'text segment {i} must be {{text = "..."}} only')
                continue
            if not isinstance(seg["gen"], str) or not seg["gen"]:
                raise self.fail(op, f"gen segment {i} needs a non-empty name")
            for key, value in seg.items():
                if key != "gen" and (key not in GEN_ATTRS or not check_type(value, GEN_ATTRS[key])):
                    raise self.fail(op, f"gen segment {i}: bad parameter {key} = {value!r}")
            attrs = {k: v for k, v in seg.items() if k != "gen"}
            self._check_gen_attrs(op, attrs, f"gen segment {i}", seg["gen"])
        if "gen" not in segments[0] or "gen" not in segments[-1]:
            raise self.fail(op, "gen.chain segments must begin and end with a gen")
        early = [i for i, seg in enumerate(segments[:-1]) if isinstance(seg, dict) and "reasoning" in seg]
        if early:
            raise self.fail(
                op,
                f"gen segment {early[0]} has a reasoning format but is not the chain's last gen: what "
                "follows it is its answer, not the text the request generated; end the chain there",
            )

    def _check_reasoning(self, op: Op, value: AttrValue, what: str) -> None:
        problem = reasoning_format_problem(value)
        if problem is not None:
            raise self.fail(op, f"{what}: {problem}")

    def _record_scope(self, index: int, op: Op) -> None:
        """Add ``op``'s result states (and a var read) to the state tree, with the names it adds."""
        if op.kind == K.RETURN:
            return
        if op.kind == K.VAR:
            self.tree.add_read(op.state.name, index, op)
            return
        names = [r.name for r in op.results]
        if len(set(names)) != len(names) or any(n in self.types for n in names):
            return  # defined twice: an SSA error follows, and the tree must stay a tree
        if op.kind == K.JOIN:
            own = self.tree.gathered(op)
        else:
            own = [(name, op) for name in op.defined_names()]
        base = op.operands[0].name if op.kind != K.START else None
        for r in op.results:
            self.tree.add(r.name, base, index, own)

    def _check_roles(self, op: Op) -> None:
        if op.kind == K.START:
            self.role[op.result.name] = _ROLE_UNKNOWN
            return
        if op.kind in (K.RETURN, K.VAR):
            return
        open_role = self.role[op.operands[0].name]
        if op.kind in (K.ROLE_BEGIN, K.ROLE_END):
            role = op.label
            if role not in ROLES:
                raise self.fail(op, f"unknown role {role!r}; roles are {', '.join(ROLES)}")
            if op.kind == K.ROLE_BEGIN and open_role not in (None, _ROLE_UNKNOWN):
                raise self.fail(
                    op,
                    f"role {role!r} opened inside role {open_role!r}; roles do not nest: close {open_role!r} first",
                )
            if op.kind == K.ROLE_END and open_role != _ROLE_UNKNOWN and open_role != role:
                now = "no role is open" if open_role is None else f"role {open_role!r} is open"
                raise self.fail(op, f"role {role!r} closed but {now} in this chain")
            open_role = role if op.kind == K.ROLE_BEGIN else None
        for r in op.results:
            self.role[r.name] = open_role

    def _check_join(self, op: Op) -> None:
        parent = op.operands[0].name
        seen: set[str] = set()
        for b in op.operands[1:]:
            if b.name == parent:
                raise self.fail(op, f"branch {b} is the join's parent itself; pass fork branches")
            if b.name in seen:
                raise self.fail(op, f"branch {b} is joined twice")
            seen.add(b.name)
            if not self.tree.descends(b.name, parent):
                raise self.fail(
                    op,
                    f"join of unrelated states: branch {b} does not descend from the parent %{parent}; "
                    "join only branches forked from the parent",
                )


def _choices_given_problem(given: list[int], n_choices: int) -> str | None:
    """What is wrong with a select's ``choices_given`` over ``n_choices`` distinct choices, or None.

    One spelling per program: the distinct choices in order of their first use (what the builder
    writes), so two traces of the same select print the same IR."""
    seen = 0
    for k in given:
        if not 0 <= k < n_choices:
            return f"index {k} names no choice; there are {n_choices} (0 to {n_choices - 1})"
        if k > seen:
            return f"choice {k} is used before choice {seen}; list the choices in order of first use"
        if k == seen:
            seen += 1
    if seen < n_choices:
        return f"choice {seen} is never given; drop it from choices"
    if len(given) == n_choices:
        return "no choice repeats; leave choices_given out"
    return None
