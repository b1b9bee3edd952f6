"""Verifier: a gen's constraint is checked by the run path's own constraint code (the
``spec_from_*`` builders and the constraint compiler, without a model's tokenizer), so IR with a
constraint that cannot run is refused at its op and line instead of failing when the gen runs."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from llmir_lang.errors import IRVerifyError
from llmir_lang.ir import ModuleBuilder, parse_ir, print_ir, quote, verify
from llmir_lang.ir import attrs as ir_attrs


def _gen(attr: str) -> str:
    """A module whose gen "x" (line 5 of the text) has the attribute ``attr``."""
    return (
        "module {\n  func @f(%q: text) {\n    %0 = start\n    %1 = append %0, %q\n"
        f'    %2 = gen %1 "x" {{max_tokens = 16, {attr}}}\n'
        "    return %2\n  }\n}\n"
    )


BAD = [
    ("regex", "(a", "InvalidRegexError", "unclosed group"),
    ("regex", "(?=x)x", "InvalidRegexError", "look-around"),
    ("regex", "a{2,1}", "InvalidRegexError", "invalid repetition count range"),
    ("regex", r"(a)\1", "InvalidRegexError", "backreferences are not supported"),
    ("json_schema", '{"type": "object", ', "InvalidSchemaError", "not valid JSON"),
    ("json_schema", "[1, 2]", "InvalidSchemaError", "must be an object or a boolean"),
    ("json_schema", '{"type": "strng"}', "InvalidSchemaError", "'strng' is not valid"),
    ("json_schema", '{"$ref": "#/$defs/x"}', "InvalidSchemaError", "points at nothing"),
    ("json_schema", '{"type": "array", "uniqueItems": true}', "UnsupportedSchemaError", "'uniqueItems'"),
    ("json_schema", '{"const": 9007199254740993}', "UnsupportedSchemaError", "beyond ±2**53"),
    ("json_schema", '{"type": "string", "pattern": "(a"}', "InvalidRegexError", "pattern '(a' at #"),
    ("grammar", 'start: "a" b\nb: ( "c"\n', "GrammarSyntaxError", "at line 2, column 10"),
    ("grammar", "start: undefined_rule", "GrammarSyntaxError", "undefined_rule"),
    ("grammar", 'root ::= "a"', "GrammarSyntaxError", "looks like GBNF"),
]


@pytest.mark.parametrize(("key", "value", "error", "cause"), BAD, ids=[f"{k}:{v}" for k, v, _, _ in BAD])
def test_a_constraint_that_does_not_compile_is_refused_at_its_line(
    key: str, value: str, error: str, cause: str
) -> None:
    with pytest.raises(IRVerifyError) as info:
        parse_ir(_gen(f"{key} = {quote(value)}"))
    message = str(info.value)
    assert message.startswith('in function @f, op `%2 = gen %1 "x" {'), message
    assert "(line 5): " in message, message
    assert f"gen 'x': {key} does not compile ({error}): " in message, message
    assert cause in message, message
    # the module is fine without the constraint
    parse_ir(_gen("temperature = 0.5"))


def test_bad_choices_and_lone_surrogates_are_refused() -> None:
    with pytest.raises(
        IRVerifyError,
        match=r"gen 'x': choices is not valid \(InvalidChoicesError\): choices has duplicates \['a'\]",
    ):
        parse_ir(_gen('choices = ["a", "b", "a"]'))
    with pytest.raises(IRVerifyError, match="gen 'x': choices is not valid .*empty string"):
        parse_ir(_gen('choices = ["a", ""]'))
    with pytest.raises(IRVerifyError, match=r"gen 'x': regex has a lone surrogate \(U\+D800\) at position 1"):
        parse_ir(_gen('regex = "a\\ud800"'))


def test_a_bad_constraint_in_a_gen_chain_segment_names_the_segment_and_its_gen() -> None:
    text = (
        "module {\n  func @f() {\n    %0 = start\n"
        '    %1 = gen.chain %0 {segments = [{gen = "a", max_tokens = 4}, {text = ", age="}, '
        '{gen = "b", json_schema = "{\\"type\\": \\"strng\\"}"}]}\n'
        "    return %1\n  }\n}\n"
    )
    with pytest.raises(IRVerifyError) as info:
        parse_ir(text)
    message = str(info.value)
    assert "(line 4): gen segment 2 'b': json_schema does not compile (InvalidSchemaError)" in message, (
        message
    )


def test_the_builder_refuses_a_bad_constraint_at_the_gen_call() -> None:
    """The DSL records through the builder, and reports its errors at the program's line."""
    f = ModuleBuilder().function("f")
    s = f.start()
    with pytest.raises(IRVerifyError, match=r"gen 'x': regex does not compile \(InvalidRegexError\)"):
        f.gen(s, "x", regex="(a")
    with pytest.raises(IRVerifyError, match="gen 'y': json_schema does not compile .*uniqueItems"):
        f.gen(s, "y", json_schema='{"type": "array", "uniqueItems": true}')
    # the generic op is checked when the module is verified, without a line
    mb = ModuleBuilder()
    g = mb.function("g")
    g.ret(g.op("gen", [g.start()], "z", {"grammar": "start: ("})[0])
    with pytest.raises(
        IRVerifyError, match=r"^in function @g, op `%1 = gen %0 \"z\" .*`: gen 'z': grammar does not compile"
    ):
        mb.build()


GOOD = [
    ("regex", r"[0-9]+"),
    ("regex", r"\p{L}+ [A-Z]{2,3}"),
    ("regex", ""),
    ("json_schema", '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'),
    (
        "json_schema",
        '{"type": "object", "properties": {"name": {"type": "string"}}}',
    ),  # extra keys: llguidance
    ("json_schema", '{"type": "string", "format": "date-time"}'),
    ("json_schema", "true"),
    ("grammar", 'start: "yes" | "no"'),
    ("grammar", 'start: "Answer: " ans\nans: %json {"type": "integer"}'),
    ("grammar", "start: /[a-z]+/ <|im_end|>"),  # a special token: only the model's tokenizer knows it
    # admitting no output depends on the model's vocabulary: such a gen fails when it runs
    ("regex", r"[^\s\S]"),
    ("json_schema", "false"),
    ("json_schema", '{"type": "integer", "minimum": 5, "maximum": 3}'),
]


@pytest.mark.parametrize(("key", "value"), GOOD, ids=[f"{k}:{v}" for k, v in GOOD])
def test_valid_constraints_verify_and_round_trip(key: str, value: str) -> None:
    text = _gen(f"{key} = {quote(value)}")
    module = parse_ir(text)
    assert module.functions[0].ops[2].attrs[key] == value
    printed = print_ir(module)
    assert parse_ir(printed) == module and print_ir(parse_ir(printed)) == printed
    mb = ModuleBuilder()
    f = mb.function("f")
    f.ret(f.gen(f.start(), "x", **{key: value}))
    verify(mb.build())


def test_choices_and_dtype_constraints_verify() -> None:
    parse_ir(_gen('choices = ["red", "green", "greenish"]'))
    for dtype in ("int", "float", "bool", "str"):
        parse_ir(_gen(f'dtype = "{dtype}"'))


def test_verifying_again_compiles_nothing_again() -> None:
    """A module is verified after every pass and once more when a batch runs: a constraint is
    compiled once, and a batch of programs sharing a schema compiles it once."""
    described = {"type": "string", "description": str(uuid.uuid4())}  # compiled by no test before
    schema = json.dumps({"type": "object", "properties": {"id": described}})
    mb = ModuleBuilder()
    for i in range(20):
        f = mb.function(f"p{i}")
        f.ret(f.op("gen", [f.text(f.start(), f"record {i}: ")], "r", {"json_schema": schema})[0])
    compiler = ir_attrs._tokenizer_free_compiler()
    before = compiler.cache_info()["misses"]
    module = mb.build()
    assert compiler.cache_info()["misses"] == before + 1
    checked = ir_attrs._constraint_problem.cache_info()
    verify(module)
    verify(parse_ir(print_ir(module)))
    assert compiler.cache_info()["misses"] == before + 1
    after = ir_attrs._constraint_problem.cache_info()
    assert after.misses == checked.misses and after.hits > checked.hits


def test_importing_and_verifying_unconstrained_ir_stays_light() -> None:
    """The constraint code (torch, llguidance) is imported only to check a constraint."""
    plain, constrained = _gen('dtype = "int"'), _gen('regex = "[0-9]+"')
    code = (
        "import sys\n"
        "from llmir_lang.ir import parse_ir\n"
        f"parse_ir({plain!r})\n"
        "heavy = [m for m in ('torch', 'llguidance', 'llmir_lang.executor.constraints') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        f"parse_ir({constrained!r})\n"
        "assert 'llmir_lang.executor.constraints' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_llmir_ir_reports_a_schema_no_engine_enforces_at_the_gens_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It traced, and the gen failed only when the program ran (after the gens before it)."""
    from llmir_lang import __main__ as cli_main

    (tmp_path / "prog.py").write_text(
        "import llmir_lang as llmir\n\n"
        "@llmir.function\n"
        "def prog(s, q):\n"
        "    s += 'Q: ' + q + '\\nA:' + llmir.gen('a', max_tokens=4)\n"
        "    s += llmir.gen('tags', json_schema={'type': 'array', 'uniqueItems': True}, max_tokens=16)\n"
    )
    assert cli_main.main(["ir", str(tmp_path / "prog.py")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(
        "error: program 'prog' (prog.py:6): gen 'tags': json_schema does not compile (UnsupportedSchemaError): "
        "unsupported JSON-schema keyword 'uniqueItems'"
    ), err
