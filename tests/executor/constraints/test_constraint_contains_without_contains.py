"""``minContains`` / ``maxContains`` without ``contains`` were refused as unsupported; 2019-09 on
ignore them (JSON-Schema-Test-Suite: "minContains without contains is ignored")."""

from __future__ import annotations

import json

import jsonschema
import pytest

from llmir_lang.executor.constraints import UnsupportedSchemaError, spec_from_json_schema
from llmir_lang.executor.constraints.testing import accepts_text, check_schema


def test_min_max_contains_without_contains_are_ignored(compiler, bpe_hf, data_dir):
    suite = data_dir / "json-schema-test-suite" / "tests" / "draft2020-12"
    cases = [
        case
        for name in ("minContains", "maxContains")
        for case in json.loads((suite / f"{name}.json").read_text())
        if "without contains" in case["description"]
    ]
    assert len(cases) == 2
    for case in cases:
        result = check_schema(compiler, bpe_hf, case["schema"], case["tests"])
        assert result.compiled and result.fully_correct, (case["description"], result.error, result.failures)
    schema = {"type": "array", "minContains": 3, "maxContains": 0}
    compiled = compiler.compile(spec_from_json_schema(schema))
    for text in ("[]", "[1]", '["a",2]'):
        assert jsonschema.Draft202012Validator(schema).is_valid(json.loads(text))
        assert accepts_text(compiled, bpe_hf, text).accepted, text
    with pytest.raises(UnsupportedSchemaError) as info:  # with contains: still unsupported, named
        compiler.compile(spec_from_json_schema({"contains": {"const": 1}, "minContains": 2}))
    assert info.value.keyword in ("contains", "minContains")
