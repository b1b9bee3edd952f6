"""The four engines of ``bench_structured_peers.py``, each behind the same small matcher surface.

Every engine is built from the same Hugging Face tokenizer (``constraints.testing``'s 32k
byte-level BPE), each through its own documented route, and allows the same whitespace between
JSON tokens where it can (``WHITESPACE``, llmir's default). A matcher here has what
``constraints.testing.walk_tokens`` reads: ``fill_bitmask(bitmask, row)``, ``advance(token)``,
``is_accepting()`` and ``eos_token_ids``; the walk itself is llmir's helper, unchanged, so every
engine is timed by the same code. ``structured_peers_worker`` runs one engine in a process.
"""

from __future__ import annotations

import json
from typing import Any

WHITESPACE = "[ ]?"  # llmir's DEFAULT_JSON_WHITESPACE and outlines-core's default
VOCAB = 32000

# Compiled and walked once by every worker before it reports ready (not part of the sample).
WARMUP: list[tuple[dict[str, Any], Any]] = [
    (
        {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["id", "tags"],
            "additionalProperties": False,
        },
        {"id": 7, "tags": ["a", "bc"]},
    ),
    (
        {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 20}, "score": {"type": "number"}},
            "required": ["name"],
        },
        {"name": "Ada", "score": 1.5, "extra": None},
    ),
]


def _bit(bitmask: Any, token: int) -> bool:
    return bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)


class _Peer:
    """A peer engine's defaults: one route (itself), no reason given for a refusal."""

    name = ""

    def route(self, compiled: Any) -> str:
        return self.name

    def refused_why(self, matcher: Any) -> str | None:
        return None


# --- llmir ---------------------------------------------------------------------------------
class LlmirEngine:
    """``ConstraintCompiler`` as the engine builds it (defaults: 5 s outlines-core deadline in a
    child process, then llguidance), on ``spec_from_json_schema(schema)`` (default whitespace).
    A fresh compiler per schema: its LRU cache would otherwise answer the sample's 42 repeated
    schemas for free (the peers' caches are off too)."""

    name = "llmir"
    module = "llmir_lang"

    def __init__(self, hf: Any, opts: dict[str, Any]) -> None:
        from llmir_lang.executor.constraints import TokenizerInfo

        self.info = TokenizerInfo.from_hf(hf)
        self.eos = self.info.eos_token_ids

    def settings(self) -> dict[str, Any]:
        return {
            "api": "ConstraintCompiler(TokenizerInfo.from_hf(hf)).compile(spec_from_json_schema(schema))",
            "whitespace": WHITESPACE,
        }

    def compile(self, schema: Any) -> Any:
        from llmir_lang.executor.constraints import ConstraintCompiler, spec_from_json_schema

        return ConstraintCompiler(self.info).compile(spec_from_json_schema(schema))

    def new_matcher(self, compiled: Any) -> Any:
        return compiled.new_matcher()

    def route(self, compiled: Any) -> str:
        return compiled.engine

    def refused_why(self, matcher: Any) -> str | None:
        return matcher.error()  # the engine ends such a request with a constraint error


# --- llguidance ----------------------------------------------------------------------------
class _LLGMatcher:
    __slots__ = ("m", "eos_token_ids", "words")

    def __init__(self, m: Any, eos: tuple[int, ...]) -> None:
        self.m, self.eos_token_ids, self.words = m, eos, (VOCAB + 31) // 32

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        target = bitmask[row]
        self.m.unsafe_compute_mask_ptr(target.data_ptr(), self.words * 4)
        if self.m.is_error():  # llguidance allows EOS when stuck: a stuck matcher allows nothing
            target.zero_()

    def advance(self, token: int) -> bool:
        return bool(self.m.consume_token(token))

    def is_accepting(self) -> bool:
        return bool(self.m.is_accepting()) and not self.m.is_error()


class LLGuidanceEngine(_Peer):
    """``llguidance.JsonCompiler`` -> ``LLMatcher`` over ``llguidance.hf.from_tokenizer(hf)``,
    default parser limits. ``whitespace_flexible=True, whitespace_pattern="[ ]?"``: the
    compiler's own default (flexible off) writes only ``", "`` / ``": "`` and refuses compact JSON."""

    name = "llguidance"
    module = "llguidance"

    def __init__(self, hf: Any, opts: dict[str, Any]) -> None:
        import llguidance
        import llguidance.hf

        self.eos = (int(hf.eos_token_id),)
        self.tok = llguidance.hf.from_tokenizer(hf, n_vocab=VOCAB, eos_token=hf.eos_token_id)
        self.compiler = llguidance.JsonCompiler(whitespace_flexible=True, whitespace_pattern=WHITESPACE)

    def settings(self) -> dict[str, Any]:
        return {
            "api": "LLMatcher(hf.from_tokenizer(hf), JsonCompiler(whitespace_flexible=True, "
            "whitespace_pattern='[ ]?').compile(schema))",
            "whitespace": WHITESPACE,
        }

    def compile(self, schema: Any) -> Any:
        import llguidance

        grammar = self.compiler.compile(json.dumps(schema))
        matcher = llguidance.LLMatcher(self.tok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error().strip().splitlines()[0])
        return matcher

    def new_matcher(self, compiled: Any) -> _LLGMatcher:
        return _LLGMatcher(compiled.deep_copy(), self.eos)

    def refused_why(self, matcher: Any) -> str | None:
        return matcher.m.get_error() if matcher.m.is_error() else None


# --- XGrammar ------------------------------------------------------------------------------
class _XGRMatcher:
    __slots__ = ("m", "eos_token_ids")

    def __init__(self, m: Any, eos: tuple[int, ...]) -> None:
        self.m, self.eos_token_ids = m, eos

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        self.m.fill_next_token_bitmask(bitmask, row)

    def advance(self, token: int) -> bool:
        return bool(self.m.accept_token(token))

    def is_accepting(self) -> bool:
        return bool(self.m.is_completed())


class XGrammarEngine(_Peer):
    """``GrammarCompiler.compile_json_schema`` -> ``GrammarMatcher`` over
    ``TokenizerInfo.from_huggingface(hf)``; one compile thread, cache off. ``strict_mode=False``:
    its default (True) forbids properties and items the schema leaves open, which JSON Schema
    allows. ``any_whitespace=True, max_whitespace_cnt=1``: at most one whitespace character
    between tokens (space, tab or line break: it has no way to say "a space only");
    ``any_whitespace=False`` writes only ``", "`` / ``": "`` and refuses compact JSON."""

    name = "xgrammar"
    module = "xgrammar"

    def __init__(self, hf: Any, opts: dict[str, Any]) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.eos = (int(hf.eos_token_id),)
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB, stop_token_ids=list(self.eos))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.strict = bool(opts.get("xgrammar_strict", False))

    def settings(self) -> dict[str, Any]:
        return {
            "api": "GrammarCompiler(TokenizerInfo.from_huggingface(hf), max_threads=1, cache_enabled=False)"
            ".compile_json_schema(schema, any_whitespace=True, max_whitespace_cnt=1, "
            f"strict_mode={self.strict})",
            "whitespace": "[ \\t\\n\\r]? (any_whitespace, max 1)",
        }

    def compile(self, schema: Any) -> Any:
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=True, max_whitespace_cnt=1, strict_mode=self.strict
        )

    def new_matcher(self, compiled: Any) -> _XGRMatcher:
        return _XGRMatcher(self.xgr.GrammarMatcher(compiled), self.eos)


# --- outlines-core -------------------------------------------------------------------------
class _OCMatcher:
    __slots__ = ("g", "eos_token_ids", "words")

    def __init__(self, g: Any, eos: tuple[int, ...]) -> None:
        self.g, self.eos_token_ids, self.words = g, eos, (VOCAB + 31) // 32

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        self.g.write_mask_into(bitmask[row].data_ptr(), self.words, 4)

    def advance(self, token: int) -> bool:
        self.g.advance(token, return_tokens=False)
        return True

    def is_accepting(self) -> bool:
        return bool(self.g.is_finished())


class OutlinesCoreEngine(_Peer):
    """What outlines 1.x's outlines-core backend does for a JSON schema: ``Index`` over
    ``json_schema.build_regex_from_schema(schema, None)`` (whitespace ``[ ]?``), a ``Guide`` per
    request, ``Guide.write_mask_into``. The ``Vocabulary`` holds each token's exact bytes (specials
    left out); ``--outlines-vocab outlines1x`` builds it as outlines 1.x does instead, from
    ``convert_tokens_to_string`` of each token (partial UTF-8 tokens become U+FFFD, special
    tokens other than EOS stay in as text)."""

    name = "outlines-core"
    module = "outlines_core"

    def __init__(self, hf: Any, opts: dict[str, Any]) -> None:
        import outlines_core

        self.oc = outlines_core
        self.eos = (int(hf.eos_token_id),)
        self.vocab_kind = opts.get("outlines_vocab", "bytes")
        table: dict[Any, list[int]] = {}
        if self.vocab_kind == "outlines1x":
            for token, i in hf.get_vocab().items():
                table.setdefault(hf.convert_tokens_to_string([token]), []).append(i)
            table.pop(hf.convert_tokens_to_string([hf.eos_token]), None)
        else:
            from llmir_lang.executor.constraints import TokenizerInfo

            for i, b in enumerate(TokenizerInfo.from_hf(hf).token_bytes):
                if b is not None:
                    table.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(self.eos[0], table)

    def settings(self) -> dict[str, Any]:
        return {
            "api": f"Index(build_regex_from_schema(schema, None), Vocabulary(eos, {self.vocab_kind} table))",
            "whitespace": WHITESPACE,
            "vocabulary": self.vocab_kind,
        }

    def compile(self, schema: Any) -> Any:
        from outlines_core.json_schema import build_regex_from_schema

        return self.oc.Index(build_regex_from_schema(json.dumps(schema), None), self.vocab)

    def new_matcher(self, compiled: Any) -> _OCMatcher:
        return _OCMatcher(self.oc.Guide(compiled), self.eos)


ENGINES = {e.name: e for e in (LlmirEngine, LLGuidanceEngine, XGrammarEngine, OutlinesCoreEngine)}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in (
        "llmir_lang",
        "llguidance",
        "xgrammar",
        "outlines_core",
        "outlines",
        "apache-tvm-ffi",
        "jsonschema",
        "tokenizers",
        "transformers",
        "torch",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
