"""Differential fuzz: what the constraint layer generates, against the ``jsonschema`` validator, and
the two engines against each other; then the regressions it found.

- JSONSchemaBench, a fixed sample (``LLMIR_FUZZ_SCHEMAS``: ``all``, or take every n-th file, for
  a bigger local run): every schema compiles, or is refused with a typed error naming the keyword,
  in well under a second; outputs sampled under the constraint (``sample_text``, seeded) are valid
  under ``jsonschema`` (the draft the schema declares; formats checked where the layer enforces
  them); where outlines-core compiles a schema, llguidance takes what outlines-core samples and the
  reverse, but for the known differences in how each writes JSON (``_explained``).
- JSON-Schema-Test-Suite (2020-12): outputs sampled from every schema that compiles are valid,
  and every valid instance is accepted (compact and with ``json.dumps``' separators) but for the
  known design choices (``_refusal_kind``).

Two readings of the oracle are set aside, as the layer follows the JSON Schema specification
there: ``multipleOf`` with a float (``jsonschema`` divides binary floats: 0.07 is no multiple of
0.01 to it), checked with exact decimals instead, and a ``pattern`` Python's ``re`` cannot read.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
from decimal import Decimal
from itertools import permutations
from typing import Any

import jsonschema
import pytest
from jsonschema import validators
from referencing.exceptions import Unresolvable

from llmir_lang.errors import ConstraintError
from llmir_lang.executor.constraints import (
    ConstraintCompiler,
    InvalidRegexError,
    InvalidSchemaError,
    UnsatisfiableConstraintError,
    UnsupportedSchemaError,
    spec_from_json_schema,
)
from llmir_lang.executor.constraints.schema_walk import iter_subschemas, starts_resource
from llmir_lang.executor.constraints.testing import accepts_text, check_schema, sample_text

SAMPLES = 4  # outputs per schema and engine
MAX_TOKENS = 200
COMPILE_LIMIT_S = 5.0  # a compile is never a hang (the slowest of the bench takes 0.4 s)
TYPED = (UnsupportedSchemaError, InvalidSchemaError, InvalidRegexError, UnsatisfiableConstraintError)

# --- the oracle: jsonschema, with the formats the layer enforces ----------------------------
# The formats llguidance enforces (schema_rewrite keeps the others as annotations, as 2020-12 does)
ENFORCED_FORMATS = (
    "date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid",
)  # fmt: skip
# 2020-12's own checkers (the class-wide table holds draft 3's "time", which has no offset)
_CHECKS_2020 = jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers
CHECKER = jsonschema.FormatChecker(())
CHECKER.checkers = {f: _CHECKS_2020[f] for f in ENFORCED_FORMATS if f in _CHECKS_2020}
_DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
_TIME = r"([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?([Zz]|[+-]([0-9]{2}):([0-9]{2}))"
# RFC 3339 appendix A, ISO 8601 durations
_DURATION = re.compile(
    r"P(([0-9]+Y([0-9]+M([0-9]+D)?)?|[0-9]+M([0-9]+D)?|[0-9]+D)(T([0-9]+H([0-9]+M([0-9]+S)?)?"
    r"|[0-9]+M([0-9]+S)?|[0-9]+S))?|T([0-9]+H([0-9]+M([0-9]+S)?)?|[0-9]+M([0-9]+S)?|[0-9]+S)|[0-9]+W)"
)


def _time_ok(text: str) -> bool:
    """RFC 3339 ``full-time`` in range; second 60 out, as rfc3339-validator and pydantic have it."""
    m = re.fullmatch(_TIME, text)
    if m is None:
        return False
    hour, minute, second, _, _, off_h, off_m = m.groups()
    offset_ok = off_h is None or (int(off_h) < 24 and int(off_m) < 60)
    return int(hour) < 24 and int(minute) < 60 and int(second) < 60 and offset_ok


def _date_ok(text: str) -> bool:
    try:
        return re.fullmatch(_DATE, text) is not None and datetime.date.fromisoformat(text).year > 0
    except ValueError:
        return False


_EXTRA_FORMATS = {
    "date-time": lambda v: len(v) > 11 and v[10] in "Tt" and _date_ok(v[:10]) and _time_ok(v[11:]),
    "time": _time_ok,
    "duration": lambda v: _DURATION.fullmatch(v) is not None,
    "hostname": lambda v: (
        0 < len(v) <= 253
        and all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in v.split("."))
    ),
    "uri": lambda v: (
        re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:([A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*", v)
        is not None
    ),
}
for _name, _check in _EXTRA_FORMATS.items():
    if _name not in CHECKER.checkers:  # rfc3339-validator, fqdn... are not installed here
        CHECKER.checks(_name)(lambda v, _check=_check: not isinstance(v, str) or _check(v))


def _validator_class(schema: Any) -> Any:
    """The draft the schema declares; without one 2020-12, or the older draft whose forms it uses
    (``exclusiveMinimum: true``, tuple ``items``), as the layer reads it."""
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    if isinstance(schema, dict) and "$schema" not in schema and not cls(cls.META_SCHEMA).is_valid(schema):
        for older in (validators.Draft7Validator, validators.Draft4Validator):
            if older(older.META_SCHEMA).is_valid(schema):
                return older
    return cls


def violation(schema: Any, text: str) -> str | None:
    """Why ``text`` is not valid under ``schema`` (the oracle), or None; None too where the oracle
    cannot judge (a pattern Python's ``re`` cannot read, a remote ``$ref``)."""
    try:
        instance = json.loads(text)
    except ValueError as e:
        return f"not JSON: {e}"
    cls = _validator_class(schema)
    try:
        errors = list(cls(schema, format_checker=CHECKER).iter_errors(instance))
        if errors and all(e.validator == "multipleOf" for e in errors):
            exact = json.loads(json.dumps(schema), parse_float=Decimal)
            errors = list(
                cls(exact, format_checker=CHECKER).iter_errors(json.loads(text, parse_float=Decimal))
            )
    except (re.error, Unresolvable, RecursionError, OverflowError):
        return None
    return None if not errors else f"{errors[0].message[:200]} (at {list(errors[0].absolute_schema_path)})"


# --- sampling and the engines against each other --------------------------------------------
def _samples(compiled: Any, tok: Any, chars: set[int], seed: str) -> list[str]:
    out = []
    for i in range(SAMPLES):
        share = 0.3 if i % 2 else None  # every other output also picks multi-character tokens
        text = sample_text(compiled, tok, random.Random(f"{seed}/{i}"), chars, MAX_TOKENS, share)
        if text is not None:
            out.append(text)
    return out


def _explained(refusing: str, prefix: str, token: str) -> str | None:
    """The known difference that makes engine ``refusing`` stop at ``token`` after ``prefix``."""
    escaping = (len(prefix) - len(prefix.rstrip("\\"))) % 2 == 1
    after_blank = token.lstrip(" ") if token.startswith(" ") else token if prefix.endswith(" ") else None
    if after_blank is not None and after_blank[:1] in ("", ",", "]"):
        return "whitespace"  # outlines-core: no blank before ',' / ']'; llguidance: one in '[ ]'
    if refusing == "outlines-core":
        if "\ufffd" in token or any(ord(c) >= 0x100000 for c in token):
            return "plane-16 character"  # left out of its vocabulary (outlines_backend NOTE)
        if re.search(r"[0-9][eE]$", prefix) and token[:1].isdigit():
            return "exponent without sign"  # its number regex wants e+5 / e-5
        if escaping and token.startswith("u"):
            return "\\u escape"
    elif escaping and token.startswith("/"):
        return "escaped solidus"
    return None


def _disagreement(compiled: Any, tok: Any, text: str) -> str | None:
    walk = accepts_text(compiled, tok, text)
    if walk.accepted:
        return None
    ids = tok.encode(text, add_special_tokens=False)
    prefix, token = tok.decode(ids[: walk.steps]), tok.decode(ids[walk.steps : walk.steps + 1])
    if _explained(compiled.engine, prefix, token) is not None:
        return None
    return f"{compiled.engine} refuses {text[:200]!r} at {token!r} after {prefix[-40:]!r}"


def fuzz_schema(auto: Any, pinned: dict[str, Any], tok: Any, chars: set[int], name: str, schema: Any) -> dict:
    """One schema through the layer: the refusal, or the invalid outputs and engine disagreements."""
    try:
        compiled = auto.compile(spec_from_json_schema(schema))
    except ConstraintError as e:
        return {"refused": e}
    result: dict[str, Any] = {"engine": compiled.engine, "outputs": 0, "invalid": [], "disagree": []}
    assert compiled.meta.compile_seconds < COMPILE_LIMIT_S, (name, compiled.meta.compile_seconds)
    texts = _samples(compiled, tok, chars, name)
    result["outputs"] = len(texts)
    result["invalid"] = [(t[:300], why) for t in texts if (why := violation(schema, t)) is not None]
    if compiled.engine == "outlines-core":  # the llguidance compile of the same schema, both ways
        try:
            other = pinned["llguidance"].compile(spec_from_json_schema(schema))
        except ConstraintError:  # a custom $schema it reads as a remote $ref, say
            return result
        theirs = _samples(other, tok, chars, name + "/llguidance")
        result["disagree"] = [d for t in texts if (d := _disagreement(other, tok, t))]
        result["disagree"] += [d for t in theirs if (d := _disagreement(compiled, tok, t))]
        result["invalid"] += [(t[:300], why) for t in theirs if (why := violation(schema, t)) is not None]
    return result


@pytest.fixture(scope="module")
def chars(bpe_hf) -> set[int]:
    return {t for t in range(len(bpe_hf)) if len(bpe_hf.decode([t])) == 1}


@pytest.fixture(scope="module")
def pinned(bpe_info) -> dict[str, ConstraintCompiler]:
    return {e: ConstraintCompiler(bpe_info, engine=e) for e in ("llguidance", "outlines-core")}


def _bench_sample(data_dir) -> list:
    files = sorted((data_dir / "jsonschemabench").glob("*.json"))
    wanted = os.environ.get("LLMIR_FUZZ_SCHEMAS", "")
    step = 1 if wanted == "all" else int(wanted) if wanted.isdigit() else 50  # 38 schemas
    return files[7::step] if step > 1 else files


def test_jsonschemabench_outputs_valid_and_engines_agree(compiler, pinned, bpe_hf, chars, data_dir):
    results = {}
    for path in _bench_sample(data_dir):
        results[path.name] = fuzz_schema(
            compiler, pinned, bpe_hf, chars, path.name, json.loads(path.read_text())["schema"]
        )
    refused = {n: r["refused"] for n, r in results.items() if "refused" in r}
    untyped = {n: repr(e) for n, e in refused.items() if not isinstance(e, TYPED)}
    assert not untyped, untyped
    unnamed = {
        n: str(e) for n, e in refused.items() if isinstance(e, UnsupportedSchemaError) and not e.keyword
    }
    assert not unnamed, unnamed
    compiled = {n: r for n, r in results.items() if "refused" not in r}
    assert len(compiled) >= 0.8 * len(results), len(compiled)
    assert sum(r["outputs"] for r in compiled.values()) >= len(compiled)  # free strings run long
    invalid = {n: r["invalid"] for n, r in compiled.items() if r["invalid"]}
    assert not invalid, invalid
    disagree = {n: r["disagree"] for n, r in compiled.items() if r["disagree"]}
    assert not disagree, disagree


@pytest.fixture(scope="module")
def suite_cases(data_dir) -> list[tuple[str, dict]]:
    cases = []
    for path in sorted((data_dir / "json-schema-test-suite" / "tests" / "draft2020-12").glob("*.json")):
        cases += [(f"{path.stem}: {case['description']}", case) for case in json.loads(path.read_text())]
    return cases


def test_suite_schemas_generate_only_valid_outputs(compiler, pinned, bpe_hf, chars, suite_cases):
    invalid, disagree, refused = {}, {}, {}
    for name, case in suite_cases:
        r = fuzz_schema(compiler, pinned, bpe_hf, chars, name, case["schema"])
        if "refused" in r:
            refused[name] = r["refused"]
            continue
        invalid.update({name: r["invalid"]} if r["invalid"] else {})
        disagree.update({name: r["disagree"]} if r["disagree"] else {})
    assert not invalid, invalid
    assert not disagree, disagree
    assert all(isinstance(e, TYPED) for e in refused.values()), refused
    assert len(refused) < 0.5 * len(suite_cases), len(refused)


def _scalars(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _scalars(v)]
    if isinstance(value, list):
        return [s for v in value for s in _scalars(v)]
    return [value]


def _key_orders(value: Any) -> list[Any]:
    """``value`` with the members of its top-level object in every order (up to 4 members)."""
    if not isinstance(value, dict) or not 1 < len(value) <= 4:
        return []
    return [dict(order) for order in permutations(value.items())]


def _refusal_kind(compiler: Any, tok: Any, schema: Any, data: Any) -> str | None:
    """Why the layer refuses the valid instance ``data``, when that is a known design choice."""
    if any(isinstance(v, float) and v.is_integer() for v in _scalars(data)):
        return "integral float"  # an integer is generated (and accepted) in integer spelling only
    if any("format" in node for _, node in iter_subschemas(schema)):
        return "format enforced"  # the suite checks format as an annotation
    if any(starts_resource(node) for path, node in iter_subschemas(schema) if path != "#"):
        return "nested $id"  # llguidance resolves some refs of nested resources against the root
    for other in _key_orders(data):
        if check_schema(compiler, tok, schema, [{"data": other, "valid": True}]).fully_correct:
            return "property order"  # members come in the schema's order
    return None


def test_suite_valid_instances_refused_only_by_design(compiler, bpe_hf, suite_cases):
    kinds: dict[str, int] = {}
    unexplained = {}
    for name, case in suite_cases:
        result = check_schema(compiler, bpe_hf, case["schema"], case["tests"])
        if not result.compiled:
            continue
        for test in case["tests"]:
            if not test["valid"] or check_schema(compiler, bpe_hf, case["schema"], [test]).fully_correct:
                continue
            kind = _refusal_kind(compiler, bpe_hf, case["schema"], test["data"])
            kinds[kind or "unexplained"] = kinds.get(kind or "unexplained", 0) + 1
            if kind is None:
                unexplained[name] = test["data"]
    assert not unexplained, (kinds, unexplained)


# --- regressions found by the fuzz above --------------------------------------------------------
def _agrees_with_oracle(compiler: Any, tok: Any, schema: Any, texts: list[str]) -> None:
    """Compiled: each text accepted exactly when the oracle finds it valid. Refused: typed, naming
    the keyword it cannot enforce."""
    try:
        compiled = compiler.compile(spec_from_json_schema(schema))
    except UnsupportedSchemaError as e:
        assert e.keyword, e
        return
    for text in texts:
        valid = violation(schema, text) is None
        assert accepts_text(compiled, tok, text).accepted == valid, (compiled.engine, text, valid)


_OWN_ID = {"$id": "http://example.com/a.json", "$defs": {"B": {"type": "integer"}}}


def test_refs_inside_a_subschema_with_its_own_id_point_into_it(compiler, bpe_hf, chars):
    """A ``$id`` below the root starts a resource: ``#/...`` inside it points into it. The
    outlines-core subset check read the ref from the root and sent the schema there, which
    generated ``x`` as the root's string B, not the integer B beside it."""
    inner = {**_OWN_ID, "type": "object", "properties": {"x": {"$ref": "#/$defs/B"}}, "required": ["x"]}
    schema = {
        "$defs": {"A": {**inner, "additionalProperties": False}, "B": {"type": "string"}},
        "$ref": "#/$defs/A",
    }
    compiled = compiler.compile(spec_from_json_schema(schema))
    assert accepts_text(compiled, bpe_hf, '{"x":1}').accepted
    assert not accepts_text(compiled, bpe_hf, '{"x":"s"}').accepted, compiled.engine
    for text in _samples(compiled, bpe_hf, chars, "nested-id"):
        assert violation(schema, text) is None, text


def test_not_through_a_ref_inside_a_subschema_with_its_own_id(compiler, bpe_hf):
    """The complement of ``not: {$ref: "#/$defs/B"}`` was that of the root's B (a string), not of
    the B beside the ``$id`` (an integer): ``{"p": 1}`` was generated."""
    schema = {
        "$defs": {"B": {"type": "string"}},
        "properties": {"p": {**_OWN_ID, "not": {"$ref": "#/$defs/B"}}},
    }
    _agrees_with_oracle(compiler, bpe_hf, schema, ['{"p":1}', '{"p":"s"}', '{"p":null}'])


def test_one_of_through_refs_inside_a_subschema_with_its_own_id(compiler, bpe_hf):
    """``oneOf`` branches read through the root's ``$defs`` looked disjoint (k = 1 / k = 2) and
    became ``anyOf``; beside the ``$id`` both are k = 1, so ``{"k": 1}`` matches two: invalid."""
    k1, k2 = ({"type": "object", "required": ["k"], "properties": {"k": {"const": v}}} for v in (1, 2))
    own = {"$id": "http://example.com/a.json", "$defs": {"B": k1, "C": k1}}
    branches = {"oneOf": [{"$ref": "#/$defs/B"}, {"$ref": "#/$defs/C"}]}
    schema = {"$defs": {"B": k1, "C": k2}, "properties": {"p": {**own, **branches}}}
    _agrees_with_oracle(compiler, bpe_hf, schema, ['{"p":{"k":1}}', '{"p":{"k":2}}'])


def test_draft7_not_reads_a_ref_without_its_siblings(compiler, bpe_hf):
    """Drafts 3-7 ignore the keywords beside a ``$ref``: ``not: {$ref: number, type: string}`` is
    "not a number" there. The complement also took the siblings' (``not string``), so 1 passed."""
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"n": {"type": "number"}, "o": {"type": "object", "required": ["y"]}},
        "type": "array",
        "items": [{"not": {"$ref": "#/definitions/n", "type": "string"}}],
        "additionalItems": {"not": {"$ref": "#/definitions/o", "required": ["z"]}},
    }
    _agrees_with_oracle(compiler, bpe_hf, schema, ["[1]", '["s"]', "[null]", '[null,{"y":1}]', "[null,{}]"])
    later = {**schema, "$schema": "https://json-schema.org/draft/2020-12/schema"}  # siblings apply
    later["prefixItems"] = later.pop("items")
    later["items"] = later.pop("additionalItems")
    _agrees_with_oracle(compiler, bpe_hf, later, ["[1]", '["s"]', '[null,{"y":1}]', '[null,{"y":1,"z":1}]'])


def test_pattern_properties_beside_all_of_keep_their_patterns(compiler, bpe_hf):
    """llguidance lost ``patternProperties`` next to ``additionalProperties`` and ``allOf`` /
    ``anyOf``: every name went to ``additionalProperties: false``, so ``{"b": 1}`` was refused and
    a ``required`` name made the schema "unsatisfiable" (Handwritten dep4-dep10 of the bench)."""
    names = {
        "type": "object",
        "patternProperties": {"^[ab]$": {"type": "integer"}},
        "additionalProperties": False,
    }
    texts = ['{"b":1}', '{"a":6}', '{"a":6,"b":1}', '{"c":1}', '{"a":"x"}', "{}"]
    for extra in ({"allOf": [{"type": "object"}]}, {"anyOf": [{"required": ["a"]}, {"required": ["b"]}]}):
        schema = {**names, **extra}
        compiled = compiler.compile(spec_from_json_schema(schema))
        for text in texts:
            valid = violation(schema, text) is None
            assert accepts_text(compiled, bpe_hf, text).accepted == valid, (schema, text, valid)


def test_min_properties_reached_by_a_repeated_name_is_refused(compiler, bpe_hf):
    """llguidance counts names as written and lets ``additionalProperties`` names repeat, so
    ``minProperties: 2`` was met by ``{"x":1,"x":2}``: one property to any JSON reader."""
    with pytest.raises(UnsupportedSchemaError) as info:
        compiler.compile(spec_from_json_schema({"type": "object", "minProperties": 2}))
    assert info.value.keyword == "minProperties" and info.value.path == "#"
    with pytest.raises(UnsupportedSchemaError) as info:  # its complement is minProperties: 2
        compiler.compile(spec_from_json_schema({"type": "object", "not": {"maxProperties": 1}}))
    assert info.value.keyword == "maxProperties" and info.value.path == "#/not"
    deps = {"dependentSchemas": {"a": {"minProperties": 3}}}
    with pytest.raises(UnsupportedSchemaError, match="'minProperties' at #/dependentSchemas/a"):
        compiler.compile(spec_from_json_schema(deps))
    at_most_one = {"type": "object", "not": {"minProperties": 2}}  # its complement: maxProperties 1
    compiler.compile(spec_from_json_schema(at_most_one))
    for schema in (
        {"type": "object", "minProperties": 1},  # any one member counts
        {"type": "object", "required": ["a", "b"], "minProperties": 2.0},
        {
            "type": "object",
            "properties": {"a": {}, "b": {}},
            "required": ["a", "b"],
            "additionalProperties": False,
            "minProperties": 2,
        },
    ):
        compiled = compiler.compile(spec_from_json_schema(schema))
        for text in ('{"a":1,"b":2}', '{"x":1,"x":2}'):
            assert accepts_text(compiled, bpe_hf, text).accepted <= (violation(schema, text) is None), text


def test_a_schema_too_large_for_the_engine_names_its_combination(compiler, data_dir):
    """llguidance's "schema too large" (its grammar outgrew the size limit while combining allOf /
    not / anyOf branches with patterns) came out with no keyword and no path."""
    schema = json.loads((data_dir / "jsonschemabench" / "Handwritten---allany14.json").read_text())["schema"]
    with pytest.raises(UnsupportedSchemaError) as info:
        compiler.compile(spec_from_json_schema(schema))
    if "too large" in str(info.value):
        assert info.value.keyword == "allOf" and info.value.path == "#", info.value
    assert info.value.keyword, info.value
