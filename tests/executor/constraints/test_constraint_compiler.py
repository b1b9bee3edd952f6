"""ConstraintCompiler: engine routing and fallback, LRU cache, typed errors, outlines-core guard."""

from __future__ import annotations

import pytest

from llmir_lang.errors import ConstraintError
from llmir_lang.executor.constraints import (
    ConstraintCompiler,
    ConstraintSpec,
    GrammarSyntaxError,
    InvalidRegexError,
    InvalidSchemaError,
    UnsatisfiableConstraintError,
    UnsupportedSchemaError,
    spec_from_choices,
    spec_from_dtype,
    spec_from_grammar,
    spec_from_json_schema,
    spec_from_regex,
)
from llmir_lang.executor.constraints.testing import accepts_text

CLOSED_OBJECT = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_routing_and_meta(compiler):
    cases = {
        spec_from_regex(r"[0-9]{3}-[0-9]{4}"): ("outlines-core", None),
        spec_from_choices(["red", "green"]): ("outlines-core", None),
        spec_from_dtype(int): ("outlines-core", None),
        spec_from_json_schema(CLOSED_OBJECT): ("outlines-core", None),
        # additionalProperties allowed: outlines-core would forbid extra keys, so llguidance
        spec_from_json_schema({**CLOSED_OBJECT, "additionalProperties": True}): ("llguidance", "additional"),
        spec_from_json_schema({"type": "integer", "minimum": 3}): ("llguidance", "integer with"),
        spec_from_grammar('start: "x"+\n'): ("llguidance", "grammars"),
    }
    for spec, (engine, why) in cases.items():
        compiled = compiler.compile(spec)
        assert compiled.engine == engine, spec
        meta = compiled.meta.as_dict()
        assert meta["engine"] == engine and meta["compile_ms"] >= 0
        if why is None:
            assert meta["fallback_reason"] is None
        else:
            assert why in meta["fallback_reason"]


def test_lru_cache_hits_eviction_and_cached_errors(bpe_info):
    c = ConstraintCompiler(bpe_info, cache_size=2)
    a, b, d = spec_from_regex("a+"), spec_from_regex("b+"), spec_from_regex("d+")
    first = c.compile(a)
    assert c.compile(a) is first
    c.compile(b)
    c.compile(d)  # evicts a (least recently used)
    assert c.cache_info() == {"hits": 1, "misses": 3, "size": 2}
    assert c.compile(a) is not first
    bad = spec_from_regex("(unclosed")
    with pytest.raises(InvalidRegexError):
        c.compile(bad)
    with pytest.raises(InvalidRegexError):
        c.compile(bad)
    assert c.cache_info()["hits"] == 2  # the error came from the cache


@pytest.mark.parametrize("engine", ["auto", "llguidance", "outlines-core"])
def test_invalid_regex(bpe_info, engine):
    c = ConstraintCompiler(bpe_info, engine=engine)
    with pytest.raises(InvalidRegexError):
        c.compile(spec_from_regex("a(b"))


def test_regex_errors_say_what_is_wrong_and_where(compiler):
    """A regex that does not parse names the cause (llguidance's "error:" line), not only the
    caret; a bad schema ``pattern`` names itself and its own path, not the first ``pattern``."""
    with pytest.raises(InvalidRegexError, match="look-around.*not supported"):
        compiler.compile(spec_from_regex("(?=a)a"))
    with pytest.raises(InvalidRegexError, match="unclosed group"):
        compiler.compile(spec_from_regex("(ab"))
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "pattern": "^[a-z]+$"},
            "b": {"type": "string", "pattern": "^(?=x)y$"},
        },
    }
    with pytest.raises(InvalidRegexError, match=r"pattern '\^\(\?=x\)y\$' at #/properties/b .*look-around"):
        compiler.compile(spec_from_json_schema(schema))
    names = {"type": "object", "properties": {"c": {"type": "object", "patternProperties": {"(a)\\1": {}}}}}
    with pytest.raises(InvalidRegexError, match="patternProperties .* at #/properties/c .*backreferences"):
        compiler.compile(spec_from_json_schema(names))


def test_unsatisfiable_constraints(compiler):
    with pytest.raises(UnsatisfiableConstraintError, match="false"):
        compiler.compile(spec_from_json_schema(False))
    with pytest.raises(UnsatisfiableConstraintError):
        compiler.compile(spec_from_json_schema({"type": "integer", "minimum": 5, "maximum": 3}))
    with pytest.raises(UnsatisfiableConstraintError):
        compiler.compile(spec_from_json_schema({"type": "string", "enum": [1, 2]}))
    with pytest.raises(UnsatisfiableConstraintError):
        compiler.compile(spec_from_regex("a[^\\x00-\\x{10FFFF}]"))


def test_unsupported_keyword_names_keyword_and_path(compiler):
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
    }
    with pytest.raises(UnsupportedSchemaError) as e:
        compiler.compile(spec_from_json_schema(schema))
    assert e.value.keyword == "uniqueItems" and e.value.path == "#/properties/tags"
    assert "#/properties/tags" in str(e.value)
    overlapping = {"oneOf": [{"type": "integer"}, {"minimum": 3}]}
    with pytest.raises(UnsupportedSchemaError) as e:
        compiler.compile(spec_from_json_schema(overlapping))
    assert e.value.keyword == "oneOf" and e.value.path == "#"


def test_refs_to_nothing_or_to_other_documents_are_typed_and_named(compiler):
    """A dangling ``$ref`` is the schema's fault (``InvalidSchemaError``), a ``$ref`` to another
    document is a feature schemas here lack (``UnsupportedSchemaError``, keyword ``$ref``): both
    name the ref and where it is. They were a bare ``ConstraintError`` quoting llguidance."""
    dangling = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}
    with pytest.raises(InvalidSchemaError, match=r"'#/\$defs/missing' at #/properties/a points at nothing"):
        compiler.compile(spec_from_json_schema(dangling))
    with pytest.raises(InvalidSchemaError, match="'#nowhere' at #"):
        compiler.compile(spec_from_json_schema({"$ref": "#nowhere"}))
    remote = {"type": "object", "properties": {"b": {"$ref": "https://example.com/b.json"}}}
    with pytest.raises(UnsupportedSchemaError, match=r"never fetched.*\$defs") as e:
        compiler.compile(spec_from_json_schema(remote))
    assert e.value.keyword == "$ref" and e.value.path == "#/properties/b"


def test_schemas_from_code_get_errors_that_say_what_to_do(compiler):
    """A pydantic ``set[str]`` field's ``model_json_schema()`` is ``uniqueItems: true``: the error
    says to pass the model itself (whose sets are constrained as arrays). A schema nested past
    the engine's JSON reader's depth was a bare "recursion limit exceeded"; it is typed now, and
    the ``$defs`` rewrite it suggests compiles."""
    from pydantic import BaseModel

    class Tagged(BaseModel):
        tags: set[str]

    with pytest.raises(UnsupportedSchemaError, match="set / frozenset.*model class itself") as e:
        compiler.compile(spec_from_json_schema(Tagged.model_json_schema()))
    assert e.value.path == "#/properties/tags"
    assert compiler.compile(spec_from_json_schema(Tagged))

    def nested(n):
        return (
            {"type": "object", "properties": {"a": nested(n - 1)}, "required": ["a"]}
            if n
            else {"type": "integer"}
        )

    with pytest.raises(UnsupportedSchemaError, match=r"nested too deeply.*\$defs"):
        compiler.compile(spec_from_json_schema(nested(80)))
    defs = {
        f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(80)
    }
    defs["d80"] = {"type": "integer"}
    assert compiler.compile(spec_from_json_schema({"$defs": defs, "$ref": "#/$defs/d0"}))


def test_plane16_characters_are_reachable(compiler, bpe_hf):
    """outlines-core's vocabulary here leaves out byte 0xF4 (its end-marker trick), so the choice
    "a\U0010fffd" compiled there could never be written (the request dead-ended) and a regex of
    such a character was refused as unspellable: they go to llguidance now."""
    cases = [
        (spec_from_choices(["a\U0010fffdb", "b"]), "a\U0010fffdb"),
        (spec_from_regex("\U0010fffd"), "\U0010fffd"),
        (spec_from_regex(r"x\x{100001}"), "x\U00100001"),
        (spec_from_json_schema({"type": "string", "enum": ["\U00100001", "b"]}), '"\U00100001"'),
    ]
    for spec, text in cases:
        compiled = compiler.compile(spec)
        assert compiled.engine == "llguidance" and accepts_text(compiled, bpe_hf, text).accepted, spec
    assert compiler.compile(spec_from_choices(["yes", "no"])).engine == "outlines-core"


def test_grammar_errors_at_compile_carry_position(compiler):
    # Built by hand (as an IR parser would), so the builder's own check is skipped.
    with pytest.raises(GrammarSyntaxError) as e:
        compiler.compile(ConstraintSpec("grammar", 'start: "a" b\nb: ( "c"\n'))
    assert e.value.line == 2


def test_outlines_timeout_falls_back_to_llguidance_and_worker_recovers(bpe_info, bpe_hf):
    # A bounded-length JSON string: outlines-core's DFA build takes minutes.
    c = ConstraintCompiler(bpe_info, outlines_timeout_s=0.5)
    slow = spec_from_regex(r'"([^"\\\x00-\x1F]|\\["\\/bfnrt]){0,20}"')
    compiled = c.compile(slow)
    assert compiled.engine == "llguidance" and "exceeded" in compiled.meta.fallback_reason
    assert accepts_text(compiled, bpe_hf, '"short"').accepted
    assert not accepts_text(compiled, bpe_hf, '"' + "x" * 21 + '"').accepted
    # the killed worker is replaced on the next build
    assert c.compile(spec_from_regex("[a-z]+@x")).engine == "outlines-core"


def test_pinned_outlines_engine_refuses_instead_of_falling_back(bpe_info):
    c = ConstraintCompiler(bpe_info, engine="outlines-core")
    with pytest.raises(UnsupportedSchemaError, match="outlines-core would not enforce"):
        c.compile(spec_from_json_schema({"type": "integer", "minimum": 0}))
    with pytest.raises(ConstraintError, match="llguidance"):
        c.compile(spec_from_grammar('start: "a"\n'))
    with pytest.raises(ValueError):
        ConstraintCompiler(bpe_info, engine="xgrammar")


def test_outlines_core_final_state_bug_is_worked_around(compiler, bpe_hf, bpe_info):
    """outlines-core 0.2.14 drops transitions from final to non-final states; we must not."""
    import outlines_core

    vocab = outlines_core.Vocabulary(1000, {bytes([c]): [c] for c in b"abcd.25"})
    raw = outlines_core.Index("ab|abcd", vocab)
    state = raw.get_initial_state()
    for ch in b"ab":
        state = raw.get_next_state(state, ch)
    if raw.get_next_state(state, ord("c")) is not None:
        pytest.fail("outlines-core fixed the final-state bug: END_MARKER in outlines_backend can go")
    for spec, text in [
        (spec_from_choices(["ab", "abcd"]), "abcd"),
        (spec_from_dtype(float), "2.5"),
        (spec_from_json_schema({"type": "number"}), "-0.125"),
        (spec_from_regex("a(bc)*"), "abcbc"),
    ]:
        compiled = compiler.compile(spec)
        assert compiled.engine == "outlines-core"
        assert accepts_text(compiled, bpe_hf, text).accepted, (spec, text)


def test_inline_isolation_matches_process(bpe_info, bpe_hf, compiler):
    inline = ConstraintCompiler(bpe_info, outlines_isolation="inline")
    spec = spec_from_json_schema(CLOSED_OBJECT)
    for text, ok in [('{"name": "A", "age": 1}', True), ('{"name": "A"}', False)]:
        assert accepts_text(inline.compile(spec), bpe_hf, text).accepted is ok
        assert accepts_text(compiler.compile(spec), bpe_hf, text).accepted is ok


def test_sentencepiece_tokenizer_compiles_both_engines(sp_info):
    from llmir_lang.executor.constraints.testing import walk_tokens
    from llmir_lang.executor.constraints.tokenizer_info import greedy_tokenize

    c = ConstraintCompiler(sp_info)
    for spec, text in [
        (spec_from_json_schema(CLOSED_OBJECT), '{"name": "Zoë 日本", "age": 41}'),
        (
            spec_from_json_schema({"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}}),
            '{"n": 7}',
        ),
        (spec_from_choices(["Grüße", "hello world"]), "hello world"),
    ]:
        compiled = c.compile(spec)
        ids = greedy_tokenize(sp_info, text.encode())
        assert walk_tokens(compiled.new_matcher(), ids, sp_info.vocab_size).accepted, (compiled.engine, text)
        bad = greedy_tokenize(sp_info, (text[:-1] + "#").encode())
        assert not walk_tokens(compiled.new_matcher(), bad, sp_info.vocab_size).accepted


def test_a_cached_error_raised_again_and_again_does_not_grow(bpe_info):
    """A spec's compile error is cached; raising the cached object itself chained every raise's
    frames onto its traceback (the server's path grew it by a few entries per request, and kept
    each caller's frames alive). Each raise is a copy now, with the same type and message."""
    import gc
    import weakref

    compiler = ConstraintCompiler(bpe_info)

    class Caller:  # what a request handler holds
        pass

    refs = []

    def call() -> ConstraintError:
        local = Caller()
        refs.append(weakref.ref(local))
        try:
            compiler.compile(spec_from_regex("("))
        except ConstraintError as e:
            return e
        raise AssertionError("a bad regex compiled")

    errors = [call() for _ in range(50)]
    depth, tb = 0, errors[-1].__traceback__
    while tb is not None:
        depth, tb = depth + 1, tb.tb_next
    assert depth < 10, f"traceback of {depth} entries after 50 raises"
    assert {type(e) for e in errors} == {InvalidRegexError} and len({str(e) for e in errors}) == 1
    assert compiler.cache_info()["misses"] == 1
    del errors
    gc.collect()
    assert sum(r() is not None for r in refs) == 0, "callers' frames kept alive by the cached error"


def test_pinned_outlines_core_says_to_drop_anchors(bpe_info):
    """With outlines-core pinned, an anchored regex was refused in outlines-core's own words
    ("anchored universal start state doesn't exist"), which does not name the anchors."""
    compiler = ConstraintCompiler(bpe_info, engine="outlines-core")
    for regex in ("^abc$", "^abc", "abc$"):
        with pytest.raises(InvalidRegexError, match=r"takes no \^ / \$ / \\A / \\z anchors: drop them"):
            compiler.compile(spec_from_regex(regex))
    assert compiler.compile(spec_from_regex("abc")).engine == "outlines-core"
    assert ConstraintCompiler(bpe_info).compile(spec_from_regex("^abc$")) is not None  # auto: llguidance
