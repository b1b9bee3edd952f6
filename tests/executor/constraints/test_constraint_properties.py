"""Property tests (both engines agree with a reference) and end-to-end use with pydantic models."""

from __future__ import annotations

import datetime
import json
import random
import re

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmir_lang.executor.constraints import (
    ConstraintCompiler,
    spec_from_choices,
    spec_from_json_schema,
    spec_from_regex,
)
from llmir_lang.executor.constraints.outlines_worker import OutlinesBuildError, OutlinesWorker
from llmir_lang.executor.constraints.testing import accepts_text, sample_text

ALPHABET = st.sampled_from(list("ab c.é-"))
WORDS = st.text(ALPHABET, min_size=1, max_size=6)


@pytest.fixture(scope="module")
def both(bpe_info):
    return [ConstraintCompiler(bpe_info, engine=e) for e in ("outlines-core", "llguidance")]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choices=st.lists(WORDS, min_size=1, max_size=5, unique=True), probe=WORDS)
def test_choices_accept_exactly_the_choices(both, bpe_hf, choices, probe):
    for compiler in both:
        compiled = compiler.compile(spec_from_choices(choices))
        for c in choices:
            assert accepts_text(compiled, bpe_hf, c).accepted, (compiled.engine, choices, c)
        assert accepts_text(compiled, bpe_hf, probe).accepted == (probe in choices), (compiled.engine, probe)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pattern=st.sampled_from([r"[a-c]+(\.[0-9]{1,2})?", r"(ab|abc)*c?", r"-?[0-9]+(e[0-9]+)?", r"(x|y z)+"]),
    text=st.text(st.sampled_from(list("abc.0129-exyz ")), max_size=7),
)
def test_regex_agrees_with_python_fullmatch(both, bpe_hf, pattern, text):
    expected = re.fullmatch(pattern, text) is not None
    for compiler in both:
        compiled = compiler.compile(spec_from_regex(pattern))
        assert accepts_text(compiled, bpe_hf, text).accepted == expected, (compiled.engine, pattern, text)


class Pet(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str
    kind: str
    age: int


class Owner(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    pets: list[Pet]
    score: float | None = None


def test_pydantic_models_round_trip(compiler, bpe_hf):
    owner = Owner(name="Ada", pets=[Pet(name="Rex", kind="dog", age=3)], score=0.5)
    for model, value in [(Pet, owner.pets[0]), (Owner, owner)]:
        compiled = compiler.compile(spec_from_json_schema(model))
        compact = value.model_dump_json()
        spaced = json.dumps(json.loads(compact))
        assert accepts_text(compiled, bpe_hf, compact).accepted, (model, compiled.engine)
        assert accepts_text(compiled, bpe_hf, spaced).accepted
        model.model_validate_json(compact)
    assert compiler.compile(spec_from_json_schema(Pet)).engine == "outlines-core"  # extra=forbid
    owner_c = compiler.compile(spec_from_json_schema(Owner))
    assert owner_c.engine == "llguidance"
    assert not accepts_text(owner_c, bpe_hf, '{"name":"A name too long","pets":[]}').accepted
    assert not accepts_text(owner_c, bpe_hf, '{"name":"Ada","pets":[{"name":"x","kind":"y"}]}').accepted


class Moments(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    at: datetime.time
    when: datetime.datetime
    day: datetime.date


def _moments(at: str = "23:59:59Z", when: str = "2020-01-01T00:00:00Z", day: str = "2020-02-29") -> str:
    return json.dumps({"at": at, "when": when, "day": day}, separators=(",", ":"))


def _sample(compiled, tokenizer, rng: random.Random, chars: set[int], max_tokens: int = 120) -> str | None:
    """``sample_text`` picking among the one-character tokens the constraint allows."""
    return sample_text(compiled, tokenizer, rng, chars, max_tokens)


def test_pydantic_time_fields_generate_only_what_pydantic_reads(compiler, bpe_hf):
    """``datetime.time`` / ``datetime`` / ``date`` fields are formats ``time`` / ``date-time`` /
    ``date``, whose llguidance regexes admit second 60, year 0000 and February 29 of every year:
    pydantic refuses each, so ``get_obj`` of such a model failed on what the engine generated."""
    compiled = compiler.compile(spec_from_json_schema(Moments))
    good = [
        _moments(),
        _moments(at="00:00:00.5+05:30", when="2000-02-29t23:59:59.123456789z", day="2024-02-29"),
        _moments(at="12:30:59-00:00", when="0001-01-01T00:00:00+23:59", day="0001-12-31"),
    ]
    bad = [
        _moments(at="23:59:60Z"),
        _moments(at="00:00:60+01:00"),
        _moments(when="2016-12-31T23:59:60Z"),
        _moments(day="2021-02-29"),
        _moments(day="2100-02-29"),
        _moments(when="2019-02-29T00:00:00Z"),
        _moments(day="0000-01-01"),
        _moments(when="0000-01-01T00:00:00Z"),
    ]
    for text in good:
        Moments.model_validate_json(text)
        assert accepts_text(compiled, bpe_hf, text).accepted, text
    for text in bad:
        with pytest.raises(pydantic.ValidationError):
            Moments.model_validate_json(text)
        assert not accepts_text(compiled, bpe_hf, text).accepted, text
    rng = random.Random(0)
    chars = {t for t in range(len(bpe_hf)) if len(bpe_hf.decode([t])) == 1}
    outputs = [_sample(compiled, bpe_hf, rng, chars) for _ in range(40)]
    done = [text for text in outputs if text is not None]
    assert len(done) >= 30, outputs
    for text in done:
        Moments.model_validate_json(text)


def test_plain_schema_time_formats_admit_no_leap_second(compiler, bpe_hf):
    """A plain schema's ``format: time`` / ``date-time`` (no pydantic model): RFC 3339's grammar
    allows second 60, but the validator of that path, ``jsonschema``'s format checker, refuses it
    (through rfc3339-validator; the formats go unchecked without it), as pydantic does; so the
    constraint admits seconds 00-59 only, and what it generates passes both."""
    import jsonschema

    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    adapters = {
        "time": pydantic.TypeAdapter(datetime.time),
        "date-time": pydantic.TypeAdapter(datetime.datetime),
    }
    cases = {
        "time": (["23:59:59.5z", "00:00:00+23:59"], ["23:59:60Z", "12:00:60+01:00", "23:59:60.5Z"]),
        "date-time": (["2016-12-31T23:59:59Z"], ["2016-12-31T23:59:60Z", "2016-12-31t23:59:60z"]),
    }
    rng = random.Random(0)
    chars = {t for t in range(len(bpe_hf)) if len(bpe_hf.decode([t])) == 1}
    for fmt, (good, bad) in cases.items():
        compiled = compiler.compile(spec_from_json_schema({"type": "string", "format": fmt}))
        for value in good:
            assert accepts_text(compiled, bpe_hf, json.dumps(value)).accepted, value
        for value in bad:
            assert not accepts_text(compiled, bpe_hf, json.dumps(value)).accepted, value
            assert fmt not in checker.checkers or not checker.conforms(value, fmt), value
        done = [t for t in (_sample(compiled, bpe_hf, rng, chars, 60) for _ in range(20)) if t is not None]
        assert len(done) >= 15, done
        for text in done:
            value = json.loads(text)
            assert fmt not in checker.checkers or checker.conforms(value, fmt), value
            adapters[fmt].validate_json(text)


def test_worker_reports_errors_and_restarts_after_kill(bpe_info):
    from llmir_lang.executor.constraints.outlines_backend import outlines_vocabulary, wrap_regex

    worker = OutlinesWorker()
    vocab = outlines_vocabulary(bpe_info)
    try:
        index = worker.build_index(wrap_regex("ab+"), "k", vocab, timeout_s=30)
        assert index.get_initial_state() is not None
        with pytest.raises(OutlinesBuildError, match="ValueError"):
            worker.build_index(wrap_regex("a(b"), "k", vocab, timeout_s=30)
        worker.kill()  # as after a timeout: the vocabulary must be sent again to the new child
        assert worker.build_index(wrap_regex("c+"), "k", vocab, timeout_s=30) is not None
    finally:
        worker.kill()


def test_bundled_tiny_model_tokenizer_if_present():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[3] / "llmir_lang" / "models" / "llmir-tiny"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("llmir-tiny is not bundled yet")
    from transformers import AutoTokenizer

    from llmir_lang.executor.constraints import TokenizerInfo

    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    info = TokenizerInfo.from_hf(hf)
    compiled = ConstraintCompiler(info).compile(spec_from_json_schema(Pet))
    assert accepts_text(compiled, hf, '{"name":"Rex","kind":"dog","age":3}').accepted


def test_a_branch_s_members_follow_the_schema_s_own_properties(compiler, bpe_hf):
    """Keyword order decides where an anyOf branch's members go (llguidance): written order, as
    the schema has them; sorting keywords put the branch's "c" before "a" and "b"."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "anyOf": [{"properties": {"c": {"type": "integer"}}, "required": ["c"]}],
    }
    compiled = compiler.compile(spec_from_json_schema(schema))
    assert accepts_text(compiled, bpe_hf, '{"a":1,"b":2,"c":3}').accepted, compiled.engine
