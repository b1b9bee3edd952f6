"""One compiler over two engines, with an LRU cache per tokenizer.

Routing (the chosen engine and the reason are in ``CompiledConstraint.meta``):

- regex / choices / dtype: outlines-core first (precomputed DFA, cheapest masks); llguidance if
  outlines-core refuses the regex or its index build passes the deadline.
- json_schema: outlines-core only for schemas in the subset its regex translation enforces
  exactly (``schema_support.outlines_exact``); everything else, and any outlines-core failure,
  goes to llguidance after exact rewrites (``schema_rewrite``) of keywords it lacks.
- grammar: llguidance.
- a spec with ``reasoning`` (``gated_by_reasoning``): the spec without it, compiled as above, in a
  ``reasoning_gate.GatedConstraint`` that leaves the reasoning free.

Every compile ends with a satisfiability check (the start state must allow some token or accept
the empty string), so unsatisfiable constraints fail here, before any model step. Failures are
cached like successes: a program retrying a bad constraint gets the same error at once.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from llmir_lang.errors import ConstraintError
from llmir_lang.executor.constraints import llguidance_backend as llg_backend
from llmir_lang.executor.constraints import outlines_backend as oc_backend
from llmir_lang.executor.constraints.errors import (
    ConstraintTooExpensiveError,
    InvalidRegexError,
    UnsatisfiableConstraintError,
    UnsupportedSchemaError,
    limit_of,
    too_expensive_message,
)
from llmir_lang.executor.constraints.lark_checks import engine_grammar, lark_syntax_for_engine
from llmir_lang.executor.constraints.matcher import Matcher, allocate_bitmask, word_bit
from llmir_lang.executor.constraints.outlines_worker import (
    OutlinesBuildError,
    OutlinesTimeout,
    shared_worker,
)
from llmir_lang.executor.constraints.reasoning_gate import GatedConstraint
from llmir_lang.executor.constraints.regex_cost import too_costly_for_outlines
from llmir_lang.executor.constraints.schema_checks import (
    costly_multiple_of,
    exact_float_grammar,
    imprecise_integer,
    inexact_written_float,
    repeatable_min_properties,
    unreadable_schema_error,
)
from llmir_lang.executor.constraints.schema_cycles import reference_loop
from llmir_lang.executor.constraints.schema_rewrite import llguidance_error, rewrite_for_llguidance
from llmir_lang.executor.constraints.schema_support import outlines_exact
from llmir_lang.executor.constraints.schema_walk import find_keyword, iter_subschemas
from llmir_lang.executor.constraints.spec import (
    DEFAULT_JSON_WHITESPACE,
    ConstraintSpec,
    choices_of,
    escape_regex,
    grammar_error,
    spec_from_json_schema,
    ungated,
)
from llmir_lang.executor.constraints.tokenizer_info import TokenizerInfo


@dataclass(slots=True)
class CompileMeta:
    """How a constraint was compiled: shown to users as meta info."""

    engine: str
    compile_seconds: float
    fallback_reason: str | None = None  # why outlines-core was not used (None: it was, or n/a)
    rewrites: list[str] = field(default_factory=list)  # exact schema rewrites applied
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "compile_ms": round(self.compile_seconds * 1000, 3),
            "fallback_reason": self.fallback_reason,
            "rewrites": list(self.rewrites),
            "warnings": list(self.warnings),
        }


class CompiledConstraint:
    """A spec compiled for one tokenizer; immutable, shared by every request that uses it."""

    __slots__ = ("spec", "engine", "meta", "vocab_size", "eos_token_ids", "_impl")

    def __init__(self, spec: ConstraintSpec, impl: Any, meta: CompileMeta, info: TokenizerInfo) -> None:
        self.spec = spec
        self.engine: str = impl.engine
        self.meta = meta
        self.vocab_size = info.vocab_size
        self.eos_token_ids = info.eos_token_ids
        self._impl = impl

    def new_matcher(self) -> Matcher:
        return self._impl.new_matcher()

    def __repr__(self) -> str:
        return f"CompiledConstraint({self.spec.describe()}, engine={self.engine!r})"


def _stripped(error: ConstraintError) -> ConstraintError:
    """A compile error to keep in the cache, without tracebacks: they hold the frames of the
    first caller (and, through them, its locals)."""
    error.__traceback__ = error.__context__ = None
    cause = error.__cause__
    if cause is not None:
        cause.__traceback__ = cause.__context__ = None
    return error


def _fresh(cached: ConstraintError) -> ConstraintError:
    """A copy of a cached compile error to raise: raising the cached object itself chained each
    raise's frames onto its traceback, so a client sending one bad regex again and again grew it
    without end and kept every caller's frames alive (the server's and the engine's path alike)."""
    try:
        return copy.copy(cached)  # type, message and attributes (keyword, path, notes, ...)
    except Exception:  # a subclass that cannot be rebuilt from its args: a traceback of its own
        return cached.with_traceback(None)


class ConstraintCompiler:
    """Compiles ``ConstraintSpec``s for one tokenizer; thread-safe, LRU-cached by spec.

    ``outlines_timeout_s`` bounds an outlines-core index build (it runs in a child process that
    is killed at the deadline, then llguidance takes over). ``outlines_isolation="inline"``
    builds in-process with no deadline (tests, or platforms without subprocesses).
    ``engine`` pins one engine: ``"auto"`` (routing above), ``"llguidance"`` (never
    outlines-core), or ``"outlines-core"`` (no fallback: what it cannot take is an error).
    """

    def __init__(
        self,
        tok: TokenizerInfo,
        cache_size: int = 256,
        outlines_timeout_s: float = 5.0,
        outlines_isolation: str = "process",
        engine: str = "auto",
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be >= 1")
        if outlines_isolation not in ("process", "inline"):
            raise ValueError("outlines_isolation must be 'process' or 'inline'")
        if engine not in ("auto", llg_backend.ENGINE, oc_backend.ENGINE):
            raise ValueError(f"engine must be 'auto', 'llguidance' or 'outlines-core', got {engine!r}")
        self.engine = engine
        self.tok = tok
        self.cache_size = cache_size
        self.outlines_timeout_s = outlines_timeout_s
        self.outlines_isolation = outlines_isolation
        self._cache: OrderedDict[tuple[str, ConstraintSpec], CompiledConstraint | ConstraintError] = (
            OrderedDict()
        )
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    # --- cache --------------------------------------------------------------------------
    def compile(self, spec: ConstraintSpec) -> CompiledConstraint:
        """The compiled constraint for ``spec`` (cached); raises ``ConstraintError`` subclasses."""
        if not isinstance(spec, ConstraintSpec):
            raise TypeError(f"compile() takes a ConstraintSpec, got {type(spec).__name__}")
        key = (self.tok.fingerprint, spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
        if hit is None:
            try:
                hit = self._compile_uncached(spec)
            except ConstraintError as e:
                hit = _stripped(e)
            with self._lock:
                self.misses += 1
                self._cache[key] = hit
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if isinstance(hit, ConstraintError):
            raise _fresh(hit) from hit.__cause__
        return hit

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._cache)}

    # --- routing ------------------------------------------------------------------------
    def _compile_uncached(self, spec: ConstraintSpec) -> CompiledConstraint:
        start = time.perf_counter()
        if spec.reasoning is not None:  # after a reasoning model's reasoning (reasoning_gate.py)
            inner = self.compile(ungated(spec))
            impl: Any = GatedConstraint(inner, spec.reasoning, self.tok)
            im = inner.meta
            meta = CompileMeta(im.engine, 0.0, im.fallback_reason, list(im.rewrites), list(im.warnings))
        elif spec.kind == "regex":
            impl, meta = self._regex(spec.value)
        elif spec.kind == "choices":
            impl, meta = self._regex("(" + "|".join(escape_regex(c) for c in choices_of(spec)) + ")")
        elif spec.kind == "grammar":
            impl, meta = self._grammar(spec.value)
        else:
            impl, meta = self._json_schema(spec)
        meta.compile_seconds = time.perf_counter() - start
        compiled = CompiledConstraint(spec, impl, meta, self.tok)
        _check_satisfiable(compiled)
        return compiled

    def _outlines(self, regex: str) -> oc_backend.OutlinesCompiled:
        vocab = oc_backend.outlines_vocabulary(self.tok)
        wrapped = oc_backend.wrap_regex(regex)
        if self.outlines_isolation == "inline":
            import outlines_core

            try:
                index = outlines_core.Index(wrapped, vocab)
            except Exception as e:  # outlines-core raises ValueError and friends with a message
                raise OutlinesBuildError(f"{type(e).__name__}: {e}") from None
        else:
            index = shared_worker().build_index(wrapped, self.tok.fingerprint, vocab, self.outlines_timeout_s)
        return oc_backend.OutlinesCompiled(self.tok, regex, index)

    def _llguidance(self, grammar: str, what: str, lark: bool = False) -> llg_backend.LLGuidanceCompiled:
        """llguidance's matcher template for ``grammar``; ``what`` names it in an error."""
        compiled = llg_backend.LLGuidanceCompiled(self.tok, grammar, lark=lark)
        err = compiled.compile_error()
        limit = limit_of(err) if err is not None else None
        if limit is not None:
            detail = f"llguidance: {_first_lines(err, 1)}"
            raise ConstraintTooExpensiveError(f"{what}: {too_expensive_message(detail)}", limit)
        return compiled

    def _outlines_only(self, regex: str) -> tuple[Any, CompileMeta]:
        try:
            return self._outlines(regex), CompileMeta(oc_backend.ENGINE, 0.0)
        except OutlinesBuildError as e:
            ends = regex.endswith(("$", "\\z")) and not regex.endswith(("\\$", "\\\\z"))
            if regex.startswith(("^", "\\A")) or ends:
                # outlines-core reads no anchors ("anchored universal start state", or no text fits)
                raise InvalidRegexError(
                    f"outlines-core cannot compile regex {regex!r}: it takes no ^ / $ / \\A / \\z "
                    "anchors: drop them (the text matches the whole regex without them) or use "
                    f"engine='auto' ({e})"
                ) from None
            if "incompatible" in str(e):
                raise UnsatisfiableConstraintError(f"outlines-core: {e}") from None
            raise InvalidRegexError(f"outlines-core cannot compile regex {regex!r}: {e}") from None
        except OutlinesTimeout as e:
            raise ConstraintError(f"outlines-core: {e}; use engine='auto' to fall back") from None

    def _regex(self, regex: str) -> tuple[Any, CompileMeta]:
        import llguidance

        if self.engine == oc_backend.ENGINE:
            return self._outlines_only(regex)
        reason = "engine='llguidance' requested"
        costly = too_costly_for_outlines(regex, self.tok.vocab_size) if self.engine == "auto" else None
        if self.engine == "auto" and oc_backend.names_plane16(regex):
            reason = "the regex names plane-16 characters, which outlines-core here cannot produce"
        elif costly is not None:  # it would hold the caller up to the deadline, then fall back
            reason = f"the regex: {costly}"
        elif self.engine == "auto":
            try:
                return self._outlines(regex), CompileMeta(oc_backend.ENGINE, 0.0)
            except (OutlinesBuildError, OutlinesTimeout) as e:
                reason = f"outlines-core: {e}"
        compiled = self._llguidance(llguidance.LLMatcher.grammar_from_regex(regex), f"regex {regex!r}")
        err = compiled.compile_error()
        if err is not None:
            if "regex parse error" in err or "invalid regex" in err:
                raise InvalidRegexError(f"regex {regex!r} does not parse: {_regex_error_detail(err)}")
            if "empty" in err.lower() or "unsatisf" in err.lower():
                raise UnsatisfiableConstraintError(f"regex {regex!r} matches nothing: {_first_lines(err)}")
            raise ConstraintError(f"regex {regex!r} cannot be compiled: {reason}; llguidance: {err}")
        return compiled, CompileMeta(llg_backend.ENGINE, 0.0, fallback_reason=reason)

    def _grammar(self, text: str) -> tuple[Any, CompileMeta]:
        import llguidance

        if self.engine == oc_backend.ENGINE:
            raise ConstraintError("lark grammars need llguidance; this compiler is pinned to outlines-core")
        read = lark_syntax_for_engine(text)
        compiled = self._llguidance(llguidance.LLMatcher.grammar_from_lark(read), "the grammar", lark=True)
        err = compiled.compile_error()
        if err is not None:
            raise grammar_error(text, err, _first_lines(err, 6))
        # checks a spec built by hand; one from spec_from_grammar holds an engine text, checked
        # there already (engine_grammar knows it: the checks run once per grammar)
        engine_text = engine_grammar(text)
        if engine_text != read:
            grammar = llguidance.LLMatcher.grammar_from_lark(engine_text)
            compiled = self._llguidance(grammar, "the grammar", lark=True)
        meta = CompileMeta(llg_backend.ENGINE, 0.0, fallback_reason="grammars need llguidance")
        meta.warnings = compiled.warnings()
        return compiled, meta

    def _probe_multiple_of(self, schema: Any) -> None:
        """Build each nested ``multipleOf`` step alone first (cached). llguidance builds one when
        its lexer first reaches the number: a step past the engine's expression limit (16384,
        200000, ...) failed mid-generation, deep in a document, where at the top of a schema it is
        refused at submission (``_check_satisfiable``); now it is refused there too, named."""
        for path, node in iter_subschemas(schema):
            step = node.get("multipleOf") if path != "#" else None
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
                continue
            try:
                self.compile(spec_from_json_schema({"type": "number", "multipleOf": step}))
            except UnsupportedSchemaError as e:
                raise UnsupportedSchemaError(
                    str(e).replace("'multipleOf' at #", f"'multipleOf' at {path}", 1), "multipleOf", path
                ) from None
            except ConstraintError:
                pass  # other verdicts are the whole schema's to give

    def _json_schema(self, spec: ConstraintSpec) -> tuple[Any, CompileMeta]:
        import llguidance

        schema = json.loads(spec.value)
        if schema is False:
            raise UnsatisfiableConstraintError("the JSON schema is `false`: no document satisfies it")
        if schema is True:
            schema = {}
        refused = imprecise_integer(schema) or costly_multiple_of(schema)  # before any engine runs
        if refused is not None:
            raise refused
        self._probe_multiple_of(schema)
        loop = reference_loop(schema)  # undefined, not unsatisfiable (as llguidance said of some)
        if loop is not None:
            raise loop
        ws = spec.whitespace if spec.whitespace is not None else DEFAULT_JSON_WHITESPACE
        reason = (
            outlines_exact(schema) if self.engine != llg_backend.ENGINE else "engine='llguidance' requested"
        )
        if self.engine == oc_backend.ENGINE:
            if reason is not None:
                raise UnsupportedSchemaError(f"outlines-core would not enforce this schema exactly: {reason}")
            import outlines_core

            return self._outlines_only(outlines_core.json_schema.build_regex_from_schema(spec.value, ws))
        if reason is None:
            import outlines_core

            try:
                regex = outlines_core.json_schema.build_regex_from_schema(spec.value, ws)
                return self._outlines(regex), CompileMeta(oc_backend.ENGINE, 0.0)
            except (OutlinesBuildError, OutlinesTimeout, ValueError) as e:
                reason = f"outlines-core: {e}"
        inexact = inexact_written_float(schema)  # llguidance would write another number
        if inexact is not None:
            raise inexact
        repeated = repeatable_min_properties(schema)  # llguidance would count a repeated name
        if repeated is not None:
            raise repeated
        rewritten, notes = rewrite_for_llguidance(schema)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                rewritten, overrides={"whitespace_pattern": ws, "whitespace_flexible": False}
            )
        except ValueError as e:
            raise unreadable_schema_error(str(e), schema) from None
        compiled = self._llguidance(exact_float_grammar(grammar, schema), "the JSON schema")
        err = compiled.compile_error()
        if err is not None:
            raise llguidance_error(err, schema)
        meta = CompileMeta(llg_backend.ENGINE, 0.0, fallback_reason=reason, rewrites=notes)
        meta.warnings = compiled.warnings()
        return compiled, meta


def _first_lines(text: str, n: int = 3) -> str:
    return "\n".join(text.strip().splitlines()[:n])


def _regex_error_detail(err: str) -> str:
    """The cause of an llguidance regex parse error, then the regex with its caret line.

    The message is "at 1(8): invalid regex ... regex parse error:", the regex, a caret line,
    "error: <cause>", then the grammar llguidance wrapped it in; its first three lines, shown
    before, ended at the caret and never said what was wrong (look-around, an unclosed group)."""
    lines = err.strip().splitlines()
    why = next((ln.strip()[len("error:") :].strip() for ln in lines if ln.strip().startswith("error:")), "")
    at = next((i for i, ln in enumerate(lines) if ln.rstrip().endswith("regex parse error:")), None)
    if not why or at is None:
        return _first_lines(err)
    return "\n".join([why, *lines[at + 1 : at + 3]])


def _check_satisfiable(compiled: CompiledConstraint) -> None:
    """Raise if no output at all is possible: not accepting at the start and no token can start."""
    m = compiled.new_matcher()
    mask = allocate_bitmask(1, compiled.vocab_size)
    m.fill_bitmask(mask, 0)
    if m.is_accepting():
        return  # the empty output is complete
    for e in compiled.eos_token_ids:  # llguidance sets the EOS bit when it is stuck
        mask[0, e // 32] &= ~word_bit(e % 32)
    if m.error() is None and bool(mask.ne(0).any()):
        return
    detail = m.error() or "no token can start the output"
    limit = m.over_budget()
    if limit == "step_lexer_fuel":  # the engine's size limit, not an empty language
        keyword, path = "", ""
        if compiled.spec.kind == "json_schema":
            path = find_keyword(json.loads(compiled.spec.value), "multipleOf") or ""
            keyword = "multipleOf" if path else ""
        what = f"'multipleOf' at {path}" if keyword else compiled.spec.describe()
        raise UnsupportedSchemaError(
            f"{what}: the grammar engine reached its limit of expressions building it (llguidance: "
            "lexer error: too many expressions constructed); "
            + (
                "remove the multipleOf and check the value after parsing, or use another step"
                if keyword
                else "simplify the constraint"
            ),
            keyword=keyword,
            path=path,
        )
    if limit is not None:
        raise ConstraintTooExpensiveError(f"{compiled.spec.describe()}: {detail}", limit)
    raise UnsatisfiableConstraintError(
        f"{compiled.spec.describe()} admits no output with this tokenizer ({detail}); check the "
        "constraint, or that the vocabulary can spell the characters it needs"
    )
