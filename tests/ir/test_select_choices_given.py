"""A select's ``choices_given``: the builder keeps repeated choices out of ``choices`` (each is
scored once) and records the program's list as indices; the verifier accepts one spelling of it;
it prints and parses back, and passes (select-trie) leave it as it is."""

from __future__ import annotations

import pytest

from llmir_lang.errors import IRVerifyError
from llmir_lang.ir import ModuleBuilder, parse_ir, print_ir
from llmir_lang.optimizer import DEFAULT_PIPELINE, run_pipeline


def _select_attrs(choices: list[str]) -> dict:
    mb = ModuleBuilder()
    f = mb.function("f")
    s = f.select(f.start(), "x", choices)
    f.ret(s)
    module = mb.build()
    return dict(next(op for op in module.functions[0].ops if op.kind == "select").attrs)


def _module(attrs: str) -> str:
    return f'module {{\n  func @f() {{\n    %0 = start\n    %1 = select %0 "x" {{{attrs}}}\n    return %1\n  }}\n}}\n'


def test_builder_scores_distinct_choices_and_records_the_order_given():
    attrs = _select_attrs(["yes", "no", "yes", "maybe", "no"])
    assert attrs["choices"] == ("yes", "no", "maybe")
    assert attrs["choices_given"] == (0, 1, 0, 2, 1)
    assert "choices_given" not in _select_attrs(["yes", "no"])  # no repeat: the IR is as before


def test_choices_given_prints_parses_back_and_survives_the_passes():
    text = _module('choices = ["yes", "no"], choices_given = [0, 1, 0, 0]')
    module = parse_ir(text)
    assert print_ir(module) == print_ir(parse_ir(print_ir(module)))
    optimized = run_pipeline(module, DEFAULT_PIPELINE)
    op = next(op for op in optimized.functions[0].ops if op.kind == "select")
    assert op.attrs["choices_given"] == (0, 1, 0, 0)
    assert op.attrs["trie_ends"] and len(op.attrs["trie_ends"]) == 2  # the trie is over distinct choices


@pytest.mark.parametrize(
    "attrs,fragment",
    [
        ('choices = ["a", "b"], choices_given = [0, 2, 0]', "index 2 names no choice"),
        ('choices = ["a", "b"], choices_given = [0, -1, 1]', "index -1 names no choice"),
        ('choices = ["a", "b"], choices_given = [1, 0, 1]', "choice 1 is used before choice 0"),
        ('choices = ["a", "b", "c"], choices_given = [0, 1, 0]', "choice 2 is never given"),
        ('choices = ["a", "b"], choices_given = [0, 1]', "no choice repeats"),
        ('choices = ["a", "b"], choices_given = ["a", "b", "a"]', "'choices_given' must be int[]"),
        ('choices = ["a", "a"], choices_given = [0, 1, 0]', "distinct"),
    ],
)
def test_verifier_refuses_a_bad_choices_given(attrs, fragment):
    with pytest.raises(IRVerifyError, match="select") as e:
        parse_ir(_module(attrs))
    assert fragment in str(e.value)
