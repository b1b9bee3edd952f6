"""Structured generation end to end on the bundled model (``Engine()``), through ``EngineBackend``.

- JSON schemas from the JSON-Schema-Test-Suite, a fixed JSONSchemaBench slice and
  ``tiny_tasks.SCHEMAS`` (also as a pydantic model): at least 500 generations finish, and every
  one that finishes parses and validates with ``jsonschema``. Outputs cut by ``max_new_tokens``
  (the tiny model was trained on three record kinds only, so on foreign schemas it sometimes
  writes a string that never ends) are checked token by token as prefixes the constraint allows.
- Jump-forward on vs off: the same greedy output on the extraction prompts.
- A constraint that dead-ends mid-generation ends only its own request (``constraint_error``).
- Bad constraints raise typed errors before any model step.
- regex / choices / dtype / grammar generations, and ``select`` scoring through the backend.

Everything runs as one batch per test (``EngineBackend.run``) with short ``max_new_tokens``.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing.exceptions
from pydantic import BaseModel, ConfigDict

from llmir_lang.errors import ConstraintError, InvalidRequestError
from llmir_lang.executor.backend import ChainRequest, ChainResult, EngineBackend, GenStep
from llmir_lang.executor.choices import CHOICES_METHODS, score_and_select
from llmir_lang.executor.constraints import (
    ConstraintCompiler,
    ConstraintSpec,
    GrammarSyntaxError,
    InvalidChoicesError,
    InvalidRegexError,
    TokenizerInfo,
    UnknownDtypeError,
    UnsatisfiableConstraintError,
    UnsupportedSchemaError,
    parse_dtype_value,
    spec_from_choices,
    spec_from_dtype,
    spec_from_grammar,
    spec_from_json_schema,
    spec_from_regex,
)
from llmir_lang.executor.constraints.testing import shared_data_dir
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.models.tiny_tasks import (
    EXTRACTION_KINDS,
    QA_ANSWER_CHOICES,
    SCHEMAS,
    extraction_items,
    extraction_prompt,
    few_shot_prompt,
    make_extraction_example,
)

SUITE_DIR = "json-schema-test-suite/tests/draft2020-12"
BENCH_PER_SPLIT = 6  # first schemas of each JSONSchemaBench split, in file-name order
SUITE_MAX_TOKENS = 56  # completed outputs of the suite schemas: p90 about 48 tokens
RECORD_MAX_TOKENS = 64  # the longest extraction record is about 45 tokens
EXTRACTIONS = 300
MIN_COMPLETED = 500
# A lexeme that is the empty intersection of two regexes: llguidance accepts the grammar and the
# first token ("ab"), and only finds out at the next step that nothing can follow.
DEAD_END_GRAMMAR = 'start: "ab" X\nX: /[a-c]/ & /[d-f]/\n'


class Person(BaseModel):
    """``SCHEMAS["person"]`` as a pydantic model (``json_schema=`` takes the class)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    age: int
    city: str
    occupation: str
    married: bool


@pytest.fixture(scope="module")
def backend():
    be = EngineBackend(Engine(device="cpu"))
    yield be
    be.engine.shutdown()


@pytest.fixture(scope="module")
def data_dir() -> Path:
    d = shared_data_dir()
    if not (d / "jsonschemabench").is_dir() or not (d / SUITE_DIR).is_dir():
        pytest.skip(f"shared test data not found at {d} (set LLMIR_SHARED_DATA)")
    return d


def gen(spec: Any, max_new_tokens: int, name: str = "x") -> GenStep:
    return GenStep(name, SamplingParams(max_new_tokens=max_new_tokens), spec)


def forward_calls(backend: EngineBackend) -> int:
    return backend.engine.stats()["forward_calls"]


# --- schema pool ----------------------------------------------------------------------------
def bench_split(stem: str) -> str:
    return stem.split("---")[0] if "---" in stem else re.sub(r"_\d+$", "", stem)


def suite_schemas(data: Path) -> list[tuple[str, Any]]:
    """Every JSON-Schema-Test-Suite schema, and the first ``BENCH_PER_SPLIT`` of each
    JSONSchemaBench split; only schemas ``jsonschema`` itself can check (its validator raises on a
    pattern in a syntax Python's ``re`` lacks, such as ``\\p{Letter}``, and on a ``$ref`` to a
    remote document)."""
    named: list[tuple[str, Any]] = []
    for path in sorted((data / SUITE_DIR).glob("*.json")):
        for i, case in enumerate(json.loads(path.read_text())):
            named.append((f"suite/{path.stem}/{i}", case["schema"]))
    per_split: Counter[str] = Counter()
    for path in sorted((data / "jsonschemabench").glob("*.json")):
        split = bench_split(path.stem)
        if per_split[split] < BENCH_PER_SPLIT:
            per_split[split] += 1
            named.append((f"bench/{path.stem}", json.loads(path.read_text())["schema"]))
    out = []
    for name, schema in named:
        try:
            with warnings.catch_warnings():  # "$schema not found, using the latest draft"
                warnings.simplefilter("ignore", DeprecationWarning)
                jsonschema.validators.validator_for(schema).check_schema(schema)
                jsonschema.validators.validator_for(schema)(schema).is_valid(None)
        except (jsonschema.SchemaError, re.error, referencing.exceptions.Unresolvable):
            continue
        out.append((name, schema))
    return out


def constraint_allows(compiler: ConstraintCompiler, spec: ConstraintSpec, token_ids: list[int]) -> bool:
    m = compiler.compile(spec).new_matcher()
    return all(m.advance(t) for t in token_ids) and m.error() is None


def test_500_json_generations_parse_and_validate(backend, data_dir):
    """Every completed output validates; at least 500 complete; cut outputs are valid prefixes."""
    calls: list[tuple[str, Any, ConstraintSpec, Any]] = []  # name, schema, spec, future
    rejected: Counter[str] = Counter()
    fixed_texts = {k: make_extraction_example(random.Random(7), k)[0] for k in EXTRACTION_KINDS}
    for i, (name, schema) in enumerate(suite_schemas(data_dir)):
        # alternate compact output and the default optional-space whitespace
        spec = spec_from_json_schema(schema, whitespace="" if i % 2 else None)
        kind = EXTRACTION_KINDS[i % 3]
        req = ChainRequest(extraction_prompt(fixed_texts[kind], kind), [gen(spec, SUITE_MAX_TOKENS)])
        try:
            calls.append((name, schema, spec, backend.submit(req)))
        except ConstraintError as e:  # refused at compile time, before any model step
            rejected[type(e).__name__] += 1
    for i, (kind, prompt, _) in enumerate(extraction_items(EXTRACTIONS, seed=11)):
        pydantic = kind == "person" and i % 2 == 1
        schema = Person.model_json_schema() if pydantic else SCHEMAS[kind]
        # json_schema= takes the pydantic class itself
        spec = spec_from_json_schema(Person if pydantic else schema, whitespace="" if i % 3 else None)
        req = ChainRequest(prompt, [gen(spec, RECORD_MAX_TOKENS)])
        name = f"records/{kind}/{i}" + ("/pydantic" if pydantic else "")
        calls.append((name, schema, spec, backend.submit(req)))
    # ConstraintError itself: llguidance refuses e.g. "maxItems": 2.0 (an integer in JSON Schema)
    allowed = {
        "UnsupportedSchemaError",
        "UnsatisfiableConstraintError",
        "InvalidRegexError",
        "ConstraintError",
    }
    assert set(rejected) <= allowed, rejected

    eng = backend.engine
    info = TokenizerInfo.from_hf(
        eng.tokenizer.hf, vocab_size=eng.config.vocab_size, eos_token_ids=eng.tokenizer.eos_token_ids
    )
    checker = ConstraintCompiler(info)
    completed, cut, bad = 0, 0, []
    engines: Counter[str] = Counter()
    for name, schema, spec, fut in calls:
        res: ChainResult = fut.result(timeout=600)
        assert res.error is None and len(res.steps) == 1, (name, res.error)
        step = res.steps[0]
        engines[str(step.meta.get("constraint_engine"))] += 1
        if step.finish_reason == "length":
            cut += 1
            if not constraint_allows(checker, spec, step.token_ids):
                bad.append((name, "cut output leaves the constraint", step.text[:120]))
            continue
        assert step.finish_reason == "stop", (name, step.finish_reason, step.error)
        try:
            instance = json.loads(step.text)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                jsonschema.validate(instance, schema)
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            bad.append((name, f"{type(e).__name__}: {str(e).splitlines()[0]}", step.text[:120]))
            continue
        if name.endswith("/pydantic"):
            Person.model_validate_json(step.text)  # the validated instance a program would get
        completed += 1
    print(
        f"{len(calls)} generations: {completed} completed and valid, {cut} cut by max_new_tokens; {engines}"
    )
    print(f"refused at compile time: {dict(rejected)}")
    assert not bad, f"{len(bad)} outputs broke their schema: {bad[:10]}"
    assert completed >= MIN_COMPLETED, f"only {completed} of {len(calls)} generations completed ({cut} cut)"
    assert engines["outlines-core"] > 0 and engines["llguidance"] > 0, engines  # both engines ran


# --- jump-forward ---------------------------------------------------------------------------
def run_extractions(backend, items, whitespace: str | None) -> list[Any]:
    reqs = [
        ChainRequest(
            prompt, [gen(spec_from_json_schema(SCHEMAS[kind], whitespace=whitespace), RECORD_MAX_TOKENS)]
        )
        for kind, prompt, _ in items
    ]
    return [r.steps[0] for r in backend.run(reqs)]


@pytest.mark.parametrize("whitespace", ["", None], ids=["compact", "default-ws"])
def test_jump_forward_gives_the_same_greedy_output(backend, whitespace):
    items = extraction_items(24, seed=5)
    eng = backend.engine
    saved = eng.jump_forward
    try:
        eng.jump_forward = True
        on = run_extractions(backend, items, whitespace)
        eng.jump_forward = False
        off = run_extractions(backend, items, whitespace)
    finally:
        eng.jump_forward = saved
    assert [s.text for s in on] == [s.text for s in off]
    assert all(s.finish_reason == "stop" for s in on + off)
    jumped = sum(s.meta["jump_forward_tokens"] for s in on)
    # with the optional space between JSON tokens little is forced: the space may come anywhere
    assert jumped > (2 * len(items) if whitespace == "" else 0)
    assert all(s.meta["jump_forward_tokens"] == 0 for s in off)
    assert sum(s.completion_tokens for s in on) == sum(s.completion_tokens for s in off)
    records = [json.loads(s.text) for s in on]
    assert sum(r == gold for r, (_, _, gold) in zip(records, items)) >= len(items) - 2


BFCL_PRIME = {
    "type": "object",
    "properties": {
        "get_prime_factors": {
            "type": "object",
            "properties": {"number": {"type": "integer"}, "formatted": {"type": "boolean"}},
            "required": ["number", "formatted"],
            "additionalProperties": False,
        }
    },
    "required": ["get_prime_factors"],
    "additionalProperties": False,
}  # JSONSchemaBench BFCL_simple_17


def test_jump_forward_keeps_forced_text_that_merges_into_the_tail(backend):
    spec = spec_from_json_schema(BFCL_PRIME)  # default whitespace: the model writes ' ' then '{"'
    reqs = [ChainRequest(prompt, [gen(spec, 48)]) for _, prompt, _ in extraction_items(20, seed=0)]
    texts = [r.steps[0].text for r in backend.run(reqs)]
    broken = [t for t in texts if '"number"' not in t]
    assert not broken, broken[:3]


# --- dead ends and bad input ----------------------------------------------------------------
def test_dead_end_ends_only_that_request(backend):
    items = extraction_items(6, seed=3)
    reqs = [
        ChainRequest(p, [gen(spec_from_json_schema(SCHEMAS[k], whitespace=""), RECORD_MAX_TOKENS)])
        for k, p, _ in items
    ]
    dead_spec = spec_from_grammar(DEAD_END_GRAMMAR)
    reqs.insert(3, ChainRequest(items[0][1], [gen(dead_spec, 16)]))
    results = backend.run(reqs)
    dead = results.pop(3)
    assert dead.steps[0].finish_reason == "constraint_error"
    assert dead.steps[0].text == "ab"  # the output so far is kept
    # the message differs by engine: an empty row ("the constraint admits no token here ...") or,
    # as llguidance sets the EOS bit of a stuck row, "token <eos> was sampled but the constraint
    # rejects it"
    assert dead.error and "constraint" in dead.error
    assert dead.steps[0].meta["constraint_engine"] == "llguidance"
    for (kind, _, _), res in zip(items, results):
        assert res.error is None and res.steps[0].finish_reason == "stop"
        jsonschema.validate(json.loads(res.steps[0].text), SCHEMAS[kind])


def test_bad_constraints_raise_typed_errors_before_any_model_step(backend):
    prompt = extraction_prompt("Meet Ann Lee.", "person")
    before = forward_calls(backend)

    def submit(spec: ConstraintSpec) -> None:
        backend.submit(ChainRequest(prompt, [gen(spec, 8)]))

    with pytest.raises(InvalidRegexError):
        submit(spec_from_regex("[0-9]+(ab"))
    with pytest.raises(UnsupportedSchemaError) as e:
        submit(
            spec_from_json_schema(
                {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
            )
        )
    assert e.value.keyword == "uniqueItems" and e.value.path == "#/properties/tags"
    assert "uniqueItems" in str(e.value) and "#/properties/tags" in str(e.value)
    with pytest.raises(UnsatisfiableConstraintError):
        submit(spec_from_json_schema({"type": "integer", "minimum": 5, "maximum": 3}))
    with pytest.raises(GrammarSyntaxError) as g:
        spec_from_grammar('start: "a" b\nb: ( "c"\n')
    assert g.value.line == 2 and g.value.column > 0
    with pytest.raises(GrammarSyntaxError):  # a spec built by hand is checked when compiled
        submit(ConstraintSpec("grammar", 'start: "a" b\nb: ( "c"\n'))
    with pytest.raises(InvalidChoicesError, match="empty"):
        spec_from_choices([])
    with pytest.raises(InvalidChoicesError, match="duplicates"):
        spec_from_choices(["yes", "no", "yes"])
    with pytest.raises(UnknownDtypeError, match="complex"):
        spec_from_dtype(complex)
    assert forward_calls(backend) == before  # nothing reached the model


def test_engine_generate_takes_a_constraint_in_its_sampling_params(backend):
    """``SamplingParams.constraint`` on the engine API (``generate`` / ``submit`` / streaming /
    chains): a spec, compiled at submission, or a compiled constraint; each request gets its own
    matcher. It used to be ignored: free text that finished normally, "7\nQ: What is"."""
    eng = backend.engine
    qa = few_shot_prompt([("What is 2 + 3?", "5")], "What is 4 + 4?")
    word = spec_from_regex("[a-z]{3}")
    for res in eng.generate([qa, qa], {"max_new_tokens": 8, "constraint": word}):
        assert re.fullmatch("[a-z]{3}", res.text) and res.finish_reason == "stop", res
        assert res.meta["constraint_engine"] == "outlines-core"
    compiled = eng.compile_constraint(spec_from_choices(["up", "down"]))
    streamed = eng.generate(qa, SamplingParams(max_new_tokens=8, constraint=compiled), stream=True)
    assert "".join(chunk.text for chunk in streamed) in ("up", "down")
    chain = eng.submit_chain(
        qa,
        [("gen", SamplingParams(max_new_tokens=6, constraint=spec_from_dtype(int)), None), ("text", " ok")],
    ).result()
    assert re.fullmatch(r"-?[0-9]+", chain.meta["steps"][0].text)
    before = forward_calls(backend)
    with pytest.raises(UnsupportedSchemaError, match="uniqueItems"):  # typed, at submission
        eng.generate([qa, qa], {"constraint": spec_from_json_schema({"type": "array", "uniqueItems": True})})
    with pytest.raises(InvalidRequestError, match="ConstraintSpec"):
        eng.generate(qa, {"constraint": "[a-z]{3}"})
    with pytest.raises(InvalidRequestError, match="matcher="):  # one request's state, not shareable
        eng.generate(qa, {"constraint": compiled.new_matcher()})
    with pytest.raises(InvalidRequestError, match="two constraints"):
        eng.submit(qa, {"constraint": word}, matcher=compiled.new_matcher())
    assert forward_calls(backend) == before


# --- the other constraint kinds -------------------------------------------------------------
def test_regex_choices_dtype_and_grammar_generations(backend):
    event = extraction_prompt("The Grand Chess Fair is on 2027-05-09 in Lakeport.", "event") + '{"title":'
    qa = few_shot_prompt([("What is 2 + 3?", "5"), ("Is 7 greater than 9?", "False")], "What is 4 + 4?")
    date = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    # bounded, so the tiny model cannot wander past max_new_tokens
    WORDS = r'"[A-Z][a-z]{1,8}( [A-Z][a-z]{1,8}){0,3}",'  # noqa: N806 - a pattern, like the others
    grammar = 'start: "[" NUM ("," NUM)? ("," NUM)? "]"\nNUM: /[1-9][0-9]?/\n'  # finite
    cases = [
        ("regex", ChainRequest(event, [gen(spec_from_regex(WORDS), 48)])),
        (
            "date",
            ChainRequest(
                extraction_prompt("It is on 2027-05-09.", "event"), [gen(spec_from_regex(date), 16)]
            ),
        ),
        ("choices", ChainRequest(qa, [gen(spec_from_choices(list(QA_ANSWER_CHOICES)), 8)])),
        ("int", ChainRequest(qa, [gen(spec_from_dtype(int), 8)])),
        ("float", ChainRequest(qa, [gen(spec_from_dtype(float), 12)])),
        ("bool", ChainRequest(qa, [gen(spec_from_dtype("bool"), 4)])),
        ("str", ChainRequest(qa, [gen(spec_from_dtype(str), 16)])),
        ("grammar", ChainRequest(qa, [gen(spec_from_grammar(grammar), 16)])),
        # a chain: constant text between two constrained generations, one engine request
        (
            "chain",
            ChainRequest(
                qa,
                [gen(spec_from_dtype(int), 6, "a"), " then ", gen(spec_from_choices(["up", "down"]), 4, "b")],
            ),
        ),
    ]
    results = dict(zip([c for c, _ in cases], backend.run([r for _, r in cases])))
    texts = {c: r.steps[0].text for c, r in results.items()}
    for c, r in results.items():
        assert r.error is None and all(s.finish_reason == "stop" for s in r.steps), (c, r)
        assert all(s.meta["constraint_engine"] in ("outlines-core", "llguidance") for s in r.steps)
    assert re.fullmatch(WORDS, texts["regex"])
    assert re.fullmatch(date, texts["date"])
    assert texts["choices"] in QA_ANSWER_CHOICES
    assert isinstance(parse_dtype_value(int, texts["int"]), int)
    assert isinstance(parse_dtype_value(float, texts["float"]), float)
    assert isinstance(parse_dtype_value(bool, texts["bool"]), bool)
    assert isinstance(parse_dtype_value(str, texts["str"]), str)
    assert re.fullmatch(r"\[[1-9][0-9]?(,[1-9][0-9]?){0,2}\]", texts["grammar"])
    chain = results["chain"]
    assert [s.name for s in chain.steps] == ["a", "b"]
    assert chain.text == f"{chain.steps[0].text} then {chain.steps[1].text}"
    assert chain.steps[1].text in ("up", "down")


@pytest.mark.parametrize("method", CHOICES_METHODS)
def test_select_scores_through_the_backend(backend, method):
    qa = few_shot_prompt([("What is 2 + 3?", "5"), ("Is 7 greater than 9?", "False")], "Is 9 greater than 4?")
    choices = list(QA_ANSWER_CHOICES)
    d = score_and_select(backend.score, qa, choices, method, unconditional_prompt="<|endoftext|>")
    assert d.choice in choices and d.method == method and len(d.scores) == len(choices)
    lps = d.meta["token_logprobs"]
    assert len(lps) == len(choices) and all(lp and all(x <= 0 for x in lp) for lp in lps)
