"""Grammar constraints never hang, and each grammar is checked once.

- Every ``llguidance.LLMatcher`` runs under explicit ``PARSER_LIMITS``: an ambiguous grammar that
  passes one ends its matcher with an error naming the limit, not a mask that grows without end.
- llguidance's forced-bytes loop has no limit: where a terminal swallows what must follow it, the
  first mask there never returned. ``lark_flow`` refuses the grammars it can tell; those it cannot
  (below) end the request through the matcher's ``_ForcingGuard``. Those tests run in a child
  process with a timeout, so a regression fails instead of hanging the test run.
- A lark grammar used by a gen is checked once (``engine_grammar`` knows its engine text).
- Without lark's private grammar parser the checks are skipped with one warning.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from llmir_lang.executor.constraints import (
    ConstraintCompiler,
    allocate_bitmask,
    fill_batch_bitmask,
    lark_checks,
    spec,
    spec_from_grammar,
)
from llmir_lang.executor.constraints import llguidance_backend as llg_backend

# Grammars lark_flow passes whose masks llguidance never returned from after the prefix (each
# step of its forced-bytes loop allows the one byte the terminal repeats); the prefix is text the
# grammar allows, taken byte by byte.
HANGING = {
    "a choice before the repeat": ('start: A "c"\nA: /[ab]c+/\n', "a"),
    "the follower set by an outer rule": ('start: "x" b "a" | "y" b "c"\nb: "k" A\nA: /a+/\n', "xk"),
    "a repeat after a repeat": ('start: A "a"\nA: "b"+ "a"+\n', "ba"),
    # llguidance's dialect, unchecked; the grammar's own options must not turn the guard's
    # copy's forcing back on (a directive at its top was overridden by this one)
    "forcing asked for": ('%llguidance {"no_forcing": false}\nstart: A "c"\nA: /[ab]c+/\n', "a"),
}
CHILD_TIMEOUT_S = 120  # the child loads a tokenizer and compiles; each mask is checked below


def _run_child(script: str) -> dict:
    """Run ``script`` in a fresh interpreter; a hang fails the test at the timeout."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child process hung (over {CHILD_TIMEOUT_S} s): a mask computation never returned")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_MATCHER_CHILD = """
import json, time
from llmir_lang.executor.constraints import (
    ConstraintCompiler, ConstraintSpec, TokenizerInfo, allocate_bitmask, fill_batch_bitmask,
    spec_from_grammar, spec_from_json_schema)
from llmir_lang.executor.constraints import lark_flow
from llmir_lang.executor.constraints.testing import train_test_tokenizer

hanging = json.loads(%r)
info = TokenizerInfo.from_hf(train_test_tokenizer("sentencepiece_bpe", 2000, 2_000_000))
compiler = ConstraintCompiler(info, outlines_isolation="inline")
normal = compiler.compile(spec_from_json_schema({"type": "object", "properties": {"n": {"type": "integer"}}}))
out = {}
for name, (grammar, prefix) in hanging.items():
    m = compiler.compile(spec_from_grammar(grammar)).new_matcher()
    for byte in prefix.encode():
        assert m.advance(info.token_bytes.index(bytes([byte])))
    other = normal.new_matcher()
    mask = allocate_bitmask(2, info.vocab_size)
    start = time.perf_counter()
    dead = fill_batch_bitmask([m, other], mask)
    out[name] = {
        "seconds": time.perf_counter() - start, "dead": dead, "error": m.error(),
        "limit": m.over_budget(), "forced": [m.forced_tokens(), m.forced_text()],
        "other_row_set": bool(mask[1].ne(0).any()), "other_error": other.error(),
    }
    m.rollback(len(prefix))  # the guard forgets the state: the start is fine again
    out[name]["after_rollback"] = fill_batch_bitmask([m], mask)

# the grammar the rule-based check refuses, with the check off: its start state hangs
lark_flow._swallowing_terminal = lambda *args: None
try:
    compiler.compile(ConstraintSpec("grammar", 'start: A "a"\\nA: /a+/\\n'))
    out["at_start"] = None
except Exception as e:
    out["at_start"] = [type(e).__name__, getattr(e, "limit", None), str(e)]
print(json.dumps(out))
"""


def test_a_grammar_whose_forced_text_never_ends_fails_the_request_not_the_process():
    out = _run_child(_MATCHER_CHILD % json.dumps(HANGING))
    for name in HANGING:
        got = out[name]
        assert got["dead"] == [0], (name, got)  # that row only: the other matcher's row is filled
        assert got["other_row_set"] and got["other_error"] is None, (name, got)
        assert got["seconds"] < 1.0, (name, got)
        assert "never ends" in got["error"] and "swallows what must follow it" in got["error"], got
        assert got["limit"] == "forced text" and got["forced"] == [[], ""], got
        assert got["after_rollback"] == [], got
    kind, limit, message = out["at_start"]
    assert (kind, limit) == ("ConstraintTooExpensiveError", "forced text"), out["at_start"]
    assert "never ends" in message


_ENGINE_CHILD = """
import json
from llmir_lang.executor.backend import ChainRequest, EngineBackend, GenStep
from llmir_lang.executor.constraints import spec_from_grammar, spec_from_json_schema
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.sampling_params import SamplingParams

backend = EngineBackend(Engine(device="cpu"))
specs = [
    spec_from_json_schema({"type": "object", "properties": {"name": {"type": "string"}}}),
    spec_from_grammar(%r),
    spec_from_grammar('start: "[" NUM ("," NUM)? "]"\\nNUM: /[1-9][0-9]?/\\n'),
]
reqs = [ChainRequest("Q: list two numbers.\\nA: ", [GenStep("x", SamplingParams(max_new_tokens=16), s)]) for s in specs]
results = backend.run(reqs)
backend.engine.shutdown()
print(json.dumps([[r.steps[0].finish_reason, r.steps[0].text, r.error] for r in results]))
"""


def test_the_engine_ends_that_request_and_the_batch_goes_on():
    grammar = HANGING["a choice before the repeat"][0]
    (json_reason, json_text, json_error), (reason, text, error), (ok_reason, ok_text, _) = _run_child(
        _ENGINE_CHILD % grammar
    )
    assert reason == "constraint_error" and "never ends" in error, (reason, text, error)
    assert re.fullmatch(r"[ab]c*", text), text  # the output so far is kept
    assert json_error is None and json_reason in ("stop", "length")
    assert ok_reason == "stop" and re.fullmatch(r"\[[1-9][0-9]?(,[1-9][0-9]?)?\]", ok_text), ok_text


# --- llguidance's own limits ------------------------------------------------------------------
def test_every_llguidance_matcher_is_made_under_the_limits():
    limits = llg_backend.parser_limits()
    for key, value in llg_backend.PARSER_LIMITS.items():
        assert getattr(limits, key) == value
    package = Path(llg_backend.__file__).parents[2]
    makers = [
        f"{path.relative_to(package)}:{i}"
        for path in package.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"LLMatcher\(", line)
    ]
    assert [m.split(":")[0] for m in makers] == ["executor/constraints/llguidance_backend.py"], makers


AMBIGUOUS = 'start: e\ne: e e | e "+" e | "a" | "b"\n'


@pytest.fixture()
def small_limits(parser_limits):
    """Limits small enough that ``AMBIGUOUS`` passes one within a few tokens."""
    parser_limits(max_items_in_row=60)


def test_an_ambiguous_grammar_ends_at_a_limit_and_says_so(small_limits, sp_info):
    compiled = ConstraintCompiler(sp_info).compile(spec_from_grammar(AMBIGUOUS))
    m = compiled.new_matcher()
    a = sp_info.token_bytes.index(b"a")
    mask = allocate_bitmask(1, sp_info.vocab_size)
    taken = 0
    while taken < 200 and not fill_batch_bitmask([m], mask) and m.advance(a):
        taken += 1
    assert 0 < taken < 200
    assert m.over_budget() == "max_items_in_row"
    assert "too ambiguous or too expensive" in m.error() and "Current row has" in m.error()
    # the refused token left the matcher as it was (matcher.py's contract): it rolls back, and
    # the step before the limit still works
    m.rollback(1)
    assert m.error() is None and fill_batch_bitmask([m], mask) == [] and m.advance(a)


def test_normal_grammars_and_schemas_stay_within_the_limits(compiler, bpe_hf):
    from llmir_lang.executor.constraints.testing import check_schema

    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}}}
    result = check_schema(compiler, bpe_hf, schema, [{"data": {"tags": ["a", "b"] * 20}, "valid": True}])
    assert result.fully_correct, result.failures
    grammar = (
        'start: expr\n?expr: expr "+" term | term\n?term: term "*" NUMBER | NUMBER\n%import common.NUMBER\n'
    )
    m = compiler.compile(spec_from_grammar(grammar)).new_matcher()
    for token in bpe_hf.encode("+".join(["12*3"] * 60), add_special_tokens=False):
        assert m.advance(token) and m.error() is None
    assert m.is_accepting()


# --- each grammar checked once ----------------------------------------------------------------
def test_a_gen_s_grammar_is_checked_once(monkeypatch):
    import llmir_lang as llmir

    grammar = 'start: "ok" NUM\nNUM: /\\d/\n'  # rewritten (\d), so its engine text differs
    assert spec_from_grammar(grammar).value != grammar
    lark_checks._checked.clear()
    spec._grammar_spec.cache_clear()
    calls = []
    real = lark_checks.flow_problem
    monkeypatch.setattr(lark_checks, "flow_problem", lambda *a: calls.append(a) or real(*a))

    @llmir.function
    def once(s):
        s += "Say ok: " + llmir.gen("x", grammar=grammar, max_tokens=4)

    rt = llmir.Runtime(device="cpu", kv_memory="64MB")
    try:
        state = once.run(backend=rt)
    finally:
        rt.shutdown()
    assert re.fullmatch(r"ok[0-9]", state["x"]), state["x"]
    assert len(calls) == 1


def test_the_engine_text_of_a_grammar_is_its_own():
    for grammar in (
        'start: W "x" S\nW: /\\w+/\nS: ESCAPED_STRING\n%import common.ESCAPED_STRING\n',
        'start: "b" "x"i~1..2\n',
        '%llguidance {}\nstart: "a"{2,3}\n',
    ):
        engine = lark_checks.engine_grammar(grammar)
        lark_checks._checked.clear()
        assert lark_checks.engine_grammar(engine) == engine  # rechecked from scratch: the same


# --- lark's private grammar parser ------------------------------------------------------------
@pytest.fixture()
def no_lark_parser(monkeypatch):
    import lark.load_grammar

    monkeypatch.delattr(lark.load_grammar, "_parse_grammar")
    lark_checks._lark_grammar_parser.cache_clear()
    lark_checks._is_plain_lark.cache_clear()
    yield
    monkeypatch.undo()
    lark_checks._lark_grammar_parser.cache_clear()
    lark_checks._is_plain_lark.cache_clear()


def test_without_lark_s_grammar_parser_the_checks_are_skipped_with_one_warning(no_lark_parser):
    with pytest.warns(RuntimeWarning, match=r"_parse_grammar.*lazy quantifiers") as caught:
        lazy = spec_from_grammar('start: /q+?/ "no-parser"\n')  # refused when lark is there
    assert lazy.value == 'start: /q+?/ "no-parser"\n' and len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec_from_grammar('start: /r+?/ "no-parser"\n')  # no second warning
