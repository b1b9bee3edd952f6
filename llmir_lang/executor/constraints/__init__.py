"""Structured generation: constraint specs, one compiler over outlines-core and llguidance,
per-request matchers, batch bitmasks.

Typical engine use::

    info = TokenizerInfo.from_hf(hf_tokenizer, vocab_size=model_vocab, eos_token_ids=eos_ids)
    compiler = ConstraintCompiler(info)                      # one per tokenizer, LRU inside
    compiled = compiler.compile(spec_from_json_schema(MyModel))   # typed errors here
    matcher = compiled.new_matcher()                         # one per request
    bitmask = allocate_bitmask(batch, info.vocab_size)
    fill_batch_bitmask([matcher, None, ...], bitmask)        # once per step
    apply_bitmask(logits, bitmask)                           # one masked_fill
    matcher.advance(token)                                   # after sampling

A reasoning model's constraint that starts after its reasoning: ``gated_by_reasoning(spec,
ReasoningTags("<think>", "</think>", forced=True))`` (``reasoning_gate.py``).
"""

from __future__ import annotations

from llmir_lang.executor.constraints.compiler import CompiledConstraint, CompileMeta, ConstraintCompiler
from llmir_lang.executor.constraints.errors import (
    CONSTRAINT_ERROR_FINISH_REASON,
    ConstraintTooExpensiveError,
    GrammarSyntaxError,
    InvalidChoicesError,
    InvalidRegexError,
    InvalidSchemaError,
    ReferenceLoopError,
    TokenizerVocabularyError,
    UnknownDtypeError,
    UnsatisfiableConstraintError,
    UnsupportedGrammarError,
    UnsupportedSchemaError,
)
from llmir_lang.executor.constraints.matcher import (
    Matcher,
    allocate_bitmask,
    apply_bitmask,
    bitmask_words,
    fill_batch_bitmask,
)
from llmir_lang.executor.constraints.schema_pydantic import pydantic_json_schema
from llmir_lang.executor.constraints.spec import (
    DEFAULT_JSON_WHITESPACE,
    ConstraintSpec,
    ReasoningTags,
    gated_by_reasoning,
    parse_dtype_value,
    spec_from_choices,
    spec_from_dtype,
    spec_from_grammar,
    spec_from_json_schema,
    spec_from_regex,
)
from llmir_lang.executor.constraints.tokenizer_info import TokenizerInfo

__all__ = [
    "CONSTRAINT_ERROR_FINISH_REASON",
    "DEFAULT_JSON_WHITESPACE",
    "CompileMeta",
    "CompiledConstraint",
    "ConstraintCompiler",
    "ConstraintSpec",
    "ConstraintTooExpensiveError",
    "GrammarSyntaxError",
    "InvalidChoicesError",
    "InvalidRegexError",
    "InvalidSchemaError",
    "Matcher",
    "ReasoningTags",
    "ReferenceLoopError",
    "TokenizerInfo",
    "TokenizerVocabularyError",
    "UnknownDtypeError",
    "UnsatisfiableConstraintError",
    "UnsupportedGrammarError",
    "UnsupportedSchemaError",
    "allocate_bitmask",
    "apply_bitmask",
    "bitmask_words",
    "fill_batch_bitmask",
    "gated_by_reasoning",
    "parse_dtype_value",
    "pydantic_json_schema",
    "spec_from_choices",
    "spec_from_dtype",
    "spec_from_grammar",
    "spec_from_json_schema",
    "spec_from_regex",
]
