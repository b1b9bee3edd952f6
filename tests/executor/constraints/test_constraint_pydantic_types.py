"""Pydantic field types whose JSON schema says less than the model's validation checks.

The rule: what the constraint of a model generates, the model validates. Each test samples
outputs (uniform over the one-character tokens the mask allows, sometimes any allowed token) and
validates them with the model, or checks that a type no schema expresses is refused, naming the field.
"""

from __future__ import annotations

import datetime
import decimal
import ipaddress
import json
import random
import re
from typing import Annotated

import pydantic
import pytest

from llmir_lang.executor.constraints import (
    InvalidSchemaError,
    UnsupportedSchemaError,
    spec_from_json_schema,
)
from llmir_lang.executor.constraints.testing import accepts_text, sample_text


@pytest.fixture(scope="module")
def chars(bpe_hf) -> set[int]:
    return {t for t in range(len(bpe_hf)) if len(bpe_hf.decode([t])) == 1}


def _sample(compiled, tokenizer, rng: random.Random, chars: set[int], max_tokens: int = 300) -> str | None:
    """``sample_text`` with 30% of the steps among every allowed token."""
    return sample_text(compiled, tokenizer, rng, chars, max_tokens, any_token_share=0.3)


def _model(typ):
    class M(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        x: typ

    return M


def _samples_validate(compiler, bpe_hf, chars, model, n: int = 40, seed: int = 0) -> list[str]:
    compiled = compiler.compile(spec_from_json_schema(model))
    rng = random.Random(seed)
    done = [t for t in (_sample(compiled, bpe_hf, rng, chars) for _ in range(n)) if t is not None]
    assert len(done) >= n // 3, done  # long free strings (URIs) may not end within max_tokens
    rejected = []
    for text in done:
        try:
            model.model_validate_json(text)
        except pydantic.ValidationError as e:
            rejected.append((text, e.errors()[0]["type"]))
    assert not rejected, rejected[:5]
    return done


def test_naive_and_aware_datetimes_generate_what_each_accepts(compiler, bpe_hf, chars):
    """``NaiveDatetime`` and ``AwareDatetime`` are both ``format: date-time``, which generated
    only date-times with an offset: every one of them failed ``NaiveDatetime``."""
    naive = _samples_validate(compiler, bpe_hf, chars, _model(pydantic.NaiveDatetime))
    assert all(_model(pydantic.NaiveDatetime).model_validate_json(t).x.tzinfo is None for t in naive)
    aware = _samples_validate(compiler, bpe_hf, chars, _model(pydantic.AwareDatetime))
    assert all(_model(pydantic.AwareDatetime).model_validate_json(t).x.tzinfo is not None for t in aware)
    _samples_validate(compiler, bpe_hf, chars, _model(datetime.datetime))  # reads both: aware, a subset
    compiled = compiler.compile(spec_from_json_schema(_model(pydantic.NaiveDatetime)))
    assert accepts_text(compiled, bpe_hf, '{"x":"2020-02-29T23:59:59.5"}').accepted
    assert not accepts_text(compiled, bpe_hf, '{"x":"2020-02-29T23:59:59Z"}').accepted


@pytest.mark.parametrize(
    "typ",
    [
        pydantic.FutureDatetime,
        pydantic.PastDatetime,
        pydantic.FutureDate,
        pydantic.PastDate,
        Annotated[datetime.date, pydantic.Field(gt=datetime.date(2020, 1, 1))],
        Annotated[datetime.datetime, pydantic.Field(le=datetime.datetime(2020, 1, 1))],
        Annotated[datetime.timedelta, pydantic.Field(gt=datetime.timedelta(0))],
        pydantic.Json[int],
        ipaddress.IPv4Network,
        ipaddress.IPv6Interface,
        pydantic.FilePath,
    ],
)
def test_types_no_schema_states_are_refused_naming_the_field(typ):
    """Types whose accepted set depends on the clock, or on bounds / nesting / checks the JSON
    schema does not write, used to compile to a constraint of any date (any string)."""

    class Event(pydantic.BaseModel):
        name: str
        when: typ

    with pytest.raises(UnsupportedSchemaError, match="field 'when'") as info:
        spec_from_json_schema(Event)
    assert info.value.path == "#/properties/when"


def test_timedelta_durations_stay_in_timedelta_range(compiler, bpe_hf, chars):
    """``format: duration`` admits any digit count (``PT999999999999S``); pydantic refuses a
    duration past 999,999,999 days or a time part past 2**32 seconds."""
    model = _model(datetime.timedelta)
    compiled = compiler.compile(spec_from_json_schema(model))
    for text in ["PT999999999999S", "P1000000000D", "PT9999999H", "P", "PT"]:
        assert not accepts_text(compiled, bpe_hf, json.dumps({"x": text})).accepted, text
    largest = "P9999Y9999M9999W999999DT99999H999999M999999.999999999S"
    for text in [largest, "P1Y2M3W4DT5H6M7.5S", "PT0S", "P1D", "P1W", "PT1M"]:
        doc = json.dumps({"x": text})
        assert accepts_text(compiled, bpe_hf, doc).accepted, text
        model.model_validate_json(doc)
    _samples_validate(compiler, bpe_hf, chars, model)


# RFC 3339 Appendix A ``duration``, the grammar the JSON Schema format names.
_RFC3339_DURATION = re.compile(
    r"P(?:(?:[0-9]+D|[0-9]+M(?:[0-9]+D)?|[0-9]+Y(?:[0-9]+M(?:[0-9]+D)?)?)"
    r"(?:T(?:[0-9]+H(?:[0-9]+M(?:[0-9]+S)?)?|[0-9]+M(?:[0-9]+S)?|[0-9]+S))?"
    r"|T(?:[0-9]+H(?:[0-9]+M(?:[0-9]+S)?)?|[0-9]+M(?:[0-9]+S)?|[0-9]+S)|[0-9]+W)"
)


def test_plain_schema_duration_follows_rfc3339(compiler, bpe_hf, chars):
    """A plain schema's ``format: duration`` (no model) is checked by ``jsonschema`` only when a
    format checker is passed and ``isoduration`` is installed (it is not in this venv: the
    format then goes unchecked); what the constraint generates follows RFC 3339's grammar, and
    passes the checker where it exists."""
    import jsonschema

    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    compiled = compiler.compile(spec_from_json_schema({"type": "string", "format": "duration"}))
    rng = random.Random(1)
    done = [t for t in (_sample(compiled, bpe_hf, rng, chars, 60) for _ in range(30)) if t is not None]
    assert len(done) >= 15, done
    for text in done:
        value = json.loads(text)
        assert _RFC3339_DURATION.fullmatch(value), value
        assert "duration" not in checker.checkers or checker.conforms(value, "duration"), value


@pytest.mark.parametrize(
    "typ", [pydantic.UUID1, pydantic.UUID3, pydantic.UUID4, pydantic.UUID5, pydantic.UUID7]
)
def test_uuid_versions_generate_that_version(compiler, bpe_hf, chars, typ):
    """``UUID4`` is ``format: uuid4``, unknown to the engine and dropped: any string was generated.
    pydantic checks the version digit and the RFC 4122 variant."""
    _samples_validate(compiler, bpe_hf, chars, _model(typ), n=30)


def test_email_generates_addresses_email_validator_accepts(compiler, bpe_hf, chars):
    """``EmailStr`` is ``format: email``, whose constraint generated addresses pydantic's
    email-validator refuses (39 of 41 sampled: no period after the @, labels past 63 characters,
    ``.test`` / ``.local``); now a pattern of plain addresses. The first case of each kind of
    refusal is checked against the constraint directly."""
    pytest.importorskip("email_validator")
    model = _model(pydantic.EmailStr)
    done = _samples_validate(compiler, bpe_hf, chars, model, n=40)
    assert len({t.split("@")[1] for t in done}) > 5  # not one fixed domain
    compiled = compiler.compile(spec_from_json_schema(model))
    assert accepts_text(compiled, bpe_hf, '{"x":"first.last+tag@mail-1.example.co.uk"}').accepted
    for bad in (
        "a@localhost",
        "a@b.test",
        "a@b.local",
        "a@" + "b" * 64 + ".com",
        "a@xn--bad.com",
        "a..b@c.com",
    ):
        assert not accepts_text(compiled, bpe_hf, json.dumps({"x": bad})).accepted, bad
        with pytest.raises(pydantic.ValidationError):
            model.model_validate({"x": bad})


@pytest.mark.parametrize(
    "typ",
    [
        decimal.Decimal,
        pydantic.condecimal(max_digits=4, decimal_places=2),
        pydantic.condecimal(max_digits=3),
        pydantic.condecimal(gt=0),
        pydantic.condecimal(ge=1, lt=2),
        pydantic.FiniteFloat,
        pydantic.HttpUrl,
        Annotated[pydantic.AnyUrl, pydantic.UrlConstraints(host_required=True)],
        pydantic.conbytes(max_length=3),
        pydantic.IPvAnyAddress,
        pydantic.confloat(multiple_of=0.1),
        pydantic.ByteSize,
        set[str],
        Annotated[frozenset[int], pydantic.Field(max_length=2)],
    ],
)
def test_narrowed_types_generate_what_pydantic_accepts(compiler, bpe_hf, chars, typ):
    """Decimal's schema is number-or-any-string with its digit limits left out; a finite float is
    a plain number (``1e999`` reads as inf); ``HttpUrl`` any URI scheme; a byte length bound
    counts characters; ``IPvAnyAddress`` is an unknown format (any string); a float multiple of
    0.1 past 2**23 fails pydantic's check; ``ByteSize``'s pattern takes any word as a unit; sets
    were refused for ``uniqueItems``."""
    _samples_validate(compiler, bpe_hf, chars, _model(typ), n=30)


def test_stripped_strings_keep_their_length_after_stripping(compiler, bpe_hf, chars):
    """pydantic counts ``min_length`` after ``strip_whitespace`` (field) or ``str_strip_whitespace``
    (model config): ``" a"`` passed the schema's minLength 2 and failed the model."""

    class Config(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(str_strip_whitespace=True, extra="forbid")
        x: pydantic.constr(min_length=2, pattern=r"^[a-z ]+$")

    for model in (_model(pydantic.constr(strip_whitespace=True, min_length=2)), Config):
        _samples_validate(compiler, bpe_hf, chars, model, n=30)
        compiled = compiler.compile(spec_from_json_schema(model))
        for text, ok in (
            ('" a"', False),
            ('"a "', False),
            ('"a\u3000"', False),
            ('"a b"', True),
            ('"ab"', True),
        ):
            assert accepts_text(compiled, bpe_hf, f'{{"x":{text}}}').accepted is ok, text
            if not ok:
                with pytest.raises(pydantic.ValidationError):
                    model.model_validate_json(f'{{"x":{text}}}')
    compiled = compiler.compile(spec_from_json_schema(_model(pydantic.constr(strip_whitespace=True))))
    assert accepts_text(compiled, bpe_hf, '{"x":" "}').accepted  # no length bound: any text


def test_float_steps_sets_and_byte_sizes_at_their_edges(compiler, bpe_hf, chars):
    """The texts that made each of these fail, against the constraint and pydantic."""
    tenth = _model(pydantic.confloat(multiple_of=0.1))
    with pytest.raises(pydantic.ValidationError):
        tenth.model_validate_json('{"x":8388857.7}')  # a multiple of 0.1, not to pydantic's float check
    compiled = compiler.compile(spec_from_json_schema(tenth))
    assert not accepts_text(compiled, bpe_hf, '{"x":8388857.7}').accepted
    assert accepts_text(compiled, bpe_hf, '{"x":-999999.9}').accepted
    quarter = compiler.compile(spec_from_json_schema(_model(pydantic.confloat(multiple_of=0.25))))
    assert accepts_text(compiled, bpe_hf, '{"x":0.3}').accepted
    assert accepts_text(quarter, bpe_hf, '{"x":123456789012.25}').accepted  # exact in binary: unbounded
    sizes = _model(pydantic.ByteSize)
    compiled = compiler.compile(spec_from_json_schema(sizes))
    for ok in ('"1.5 KiB"', '"12"', '"3gbit"', "1024"):
        text = f'{{"x":{ok}}}'
        assert accepts_text(compiled, bpe_hf, text).accepted, ok
        sizes.model_validate_json(text)
    assert not accepts_text(compiled, bpe_hf, '{"x":"3 bytes"}').accepted
    with pytest.raises(pydantic.ValidationError):
        sizes.model_validate_json('{"x":"3 bytes"}')
    tags = _model(set[str])
    compiled = compiler.compile(spec_from_json_schema(tags))
    assert accepts_text(compiled, bpe_hf, '{"x":["a","a","b"]}').accepted
    assert tags.model_validate_json('{"x":["a","a","b"]}').x == {"a", "b"}
    with pytest.raises(UnsupportedSchemaError, match=r"field 'x'.*set of at least 2 items"):
        spec_from_json_schema(_model(pydantic.conset(int, min_length=2)))


@pytest.mark.parametrize(
    "typ",
    [
        datetime.date,
        datetime.time,
        ipaddress.IPv4Address,
        ipaddress.IPv6Address,
        pydantic.AnyUrl,
        pydantic.constr(pattern=r"^[a-z]{2,4}-\d{3}$"),
        pydantic.constr(pattern=r"\d{3}"),
        pydantic.conint(gt=3, le=17, multiple_of=2),
        pydantic.confloat(gt=0.5, lt=1.5),
        pydantic.SecretStr,
        bytes,
    ],
)
def test_types_already_exact_stay_valid(compiler, bpe_hf, chars, typ):
    """Checked in the same sweep and right already: kept so they stay right."""
    _samples_validate(compiler, bpe_hf, chars, _model(typ), n=30)


def test_dataclasses_and_parametrized_types_are_schemas(compiler, bpe_hf, chars):
    """``spec_from_json_schema`` takes any type pydantic validates (it took only BaseModel
    subclasses): a dataclass's fields are narrowed as a model's are."""
    import dataclasses

    @dataclasses.dataclass
    class Stamp:
        at: pydantic.NaiveDatetime
        tags: set[str]

    compiled = compiler.compile(spec_from_json_schema(list[Stamp]))
    assert accepts_text(compiled, bpe_hf, '[{"at":"2020-01-02T03:04:05","tags":["a","a"]}]').accepted
    assert not accepts_text(compiled, bpe_hf, '[{"at":"2020-01-02T03:04:05Z","tags":[]}]').accepted

    class Plain:
        __hash__ = None  # also unhashable metadata of an Annotated type: no cache, still a schema

    assert spec_from_json_schema(list[Annotated[int, Plain()]])
    with pytest.raises(InvalidSchemaError, match="got the class Plain"):
        spec_from_json_schema(Plain)
