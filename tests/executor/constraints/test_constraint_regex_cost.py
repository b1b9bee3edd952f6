"""Regexes whose outlines-core index would be slow to build go to llguidance at once.

``\\d{1000}`` or ``\\w{1,200}`` used to hold the caller for the whole outlines-core deadline
(5 s) before llguidance, which compiles them in milliseconds, took over."""

from __future__ import annotations

import random
import re
import time

import pytest

from llmir_lang.executor.constraints import (
    ConstraintCompiler,
    InvalidRegexError,
    spec_from_choices,
    spec_from_regex,
)
from llmir_lang.executor.constraints.regex_cost import outlines_build_cost, too_costly_for_outlines
from llmir_lang.executor.constraints.testing import accepts_text

SLOW_IN_OUTLINES = [r"\d{1000}", r"\w{1,200}", r"[a-z]{3000}", r"\w+@\w+\.\w{60}", r"(\d{10}-){50}"]


@pytest.mark.parametrize("regex", SLOW_IN_OUTLINES)
def test_large_counted_repetitions_compile_fast_on_llguidance(bpe_info, bpe_hf, regex):
    compiler = ConstraintCompiler(bpe_info)  # a fresh cache: the build itself is timed
    start = time.perf_counter()
    compiled = compiler.compile(spec_from_regex(regex))
    assert time.perf_counter() - start < 2.0  # was the 5 s deadline, then llguidance
    assert compiled.engine == "llguidance"
    assert "counted repetitions" in compiled.meta.fallback_reason


def test_routed_regex_is_still_enforced(compiler, bpe_hf):
    compiled = compiler.compile(spec_from_regex(r"[0-9]{300}"))
    assert compiled.engine == "llguidance"
    assert accepts_text(compiled, bpe_hf, "7" * 300).accepted
    assert not accepts_text(compiled, bpe_hf, "7" * 299).accepted
    assert not accepts_text(compiled, bpe_hf, "7" * 299 + "x").accepted


def test_everyday_regexes_and_choices_stay_on_outlines_core(compiler):
    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdefghij") for _ in range(8)) for _ in range(2000)})
    for spec in [
        spec_from_regex(r"\d{3}-\d{4}"),
        spec_from_regex(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}"),
        spec_from_regex(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
        spec_from_regex(r"\w+ \w+"),
        spec_from_regex(r"(ab){300}"),
        spec_from_choices(words),  # a long alternation of literals builds fast
    ]:
        assert compiler.compile(spec).engine == "outlines-core", spec.describe()


def test_cost_estimate_reads_rust_syntax():
    assert outlines_build_cost(r"\w{60}") == outlines_build_cost(r"(?:\w){60}") == 200 * 60
    assert outlines_build_cost(r"(\w{10}){10}") == 200 * 100  # nested counts multiply
    assert outlines_build_cost(r"(?P<year>\d{4})-(?<m>\d{2})") == 15 * 6
    assert outlines_build_cost(r"\pL{5}") == outlines_build_cost(r"\p{Greek}{5}") == 200 * 5
    assert outlines_build_cost(r"[\x{80}-\x{FFFF}]{10}") == outlines_build_cost(r"[^a]{10}") == 20 * 10
    assert outlines_build_cost(r"[]a]{10}") == outlines_build_cost(r"[[:alpha:]]{10}") == 8 * 10
    assert outlines_build_cost(r"a+b*c?|d") == 0  # no counted repetition
    for unreadable in ("(a", "a{2", "[a-z", "(?"):
        assert outlines_build_cost(unreadable) == 0  # left to the engines' own errors
    # a larger vocabulary makes every state dearer: the budget shrinks with it
    assert too_costly_for_outlines(r"\w{5}", 32000) is None
    assert too_costly_for_outlines(r"\w{5}", 128000) is not None


@pytest.mark.parametrize("regex", ["a{2", "(a", r"\d{5,2}"])
def test_bad_regexes_are_still_named(compiler, regex):
    with pytest.raises(InvalidRegexError, match=re.escape(repr(regex))):
        compiler.compile(spec_from_regex(regex))
