"""``multipleOf`` steps the JSON-schema engine cannot build in reasonable time or size.

- A step with many significant digits (``123456789``) held the submitting thread for minutes
  while llguidance built it: refused at once, naming the keyword.
- A step past llguidance's expression limit (``16384``, ``200000``) said "admits no output"
  (``UnsatisfiableConstraintError``) at the top of a schema, and nested in an object it compiled
  and failed mid-generation: an ``UnsupportedSchemaError`` naming the keyword and its path, at
  submission, in both places.
"""

from __future__ import annotations

import time

import pytest

from llmir_lang.executor.constraints import UnsupportedSchemaError, spec_from_json_schema
from llmir_lang.executor.constraints.testing import accepts_text


@pytest.mark.parametrize("step", [123456789, 1234567, 0.001234567, 1.234567e-3])
def test_a_step_of_many_significant_digits_is_refused_at_once(compiler, step):
    start = time.perf_counter()
    with pytest.raises(UnsupportedSchemaError) as info:
        compiler.compile(spec_from_json_schema({"type": "object", "properties": {"n": {"multipleOf": step}}}))
    assert time.perf_counter() - start < 5
    assert (info.value.keyword, info.value.path) == ("multipleOf", "#/properties/n")
    assert "significant digits" in str(info.value)


@pytest.mark.parametrize("step", [16384, 200000])
@pytest.mark.parametrize("nested", [False, True])
def test_a_step_past_the_engines_expression_limit_is_refused_naming_it(compiler, step, nested):
    inner = {"type": "integer", "multipleOf": step}
    schema = {"type": "object", "properties": {"n": inner}, "required": ["n"]} if nested else inner
    with pytest.raises(UnsupportedSchemaError) as info:
        compiler.compile(spec_from_json_schema(schema))
    assert info.value.keyword == "multipleOf"
    assert info.value.path == ("#/properties/n" if nested else "#")


@pytest.mark.parametrize(
    "step, good, bad", [(99991, "199982", "99990"), (1000, "-3000", "3001"), (0.25, "2.75", "2.7")]
)
def test_steps_within_the_limits_still_work(compiler, bpe_hf, step, good, bad):
    compiled = compiler.compile(
        spec_from_json_schema({"type": "object", "properties": {"n": {"multipleOf": step}}})
    )
    assert accepts_text(compiled, bpe_hf, '{"n":' + good + "}").accepted
    assert not accepts_text(compiled, bpe_hf, '{"n":' + bad + "}").accepted
