"""Pipeline strings and the options mapping as a user writes them (review): every mistake is a
``PassPipelineError`` that says what is wrong, whether or not the pass is in the pipeline."""

from __future__ import annotations

import pytest

from llmir_lang.optimizer import ChatTemplate, PassManager, PassPipelineError


@pytest.mark.parametrize("pipeline", ["fork-join", "", "canonicalize,select-trie"])
def test_options_of_a_pass_outside_the_pipeline_are_checked_too(pipeline: str) -> None:
    # A misspelt option, or a bad value, was ignored silently when its pass was not in the
    # pipeline (the docstring: "every option one the pass accepts").
    with pytest.raises(
        PassPipelineError,
        match=r"pass prefix-share has no option\(s\) \['min_lenght'\]; it accepts: min_length",
    ):
        PassManager(pipeline, {"prefix-share": {"min_lenght": 3}})
    with pytest.raises(PassPipelineError, match="option min_length must be an integer >= 0, got -3"):
        PassManager(pipeline, {"prefix-share": {"min_length": -3}})
    # what the DSL passes on every run, whatever the pipeline, stays fine
    PassManager(pipeline, {"canonicalize": {"template": ChatTemplate({"user": ("<u>", "</u>")})}})
    PassManager(pipeline, {"canonicalize": {"template": None}})


@pytest.mark.parametrize("options", [5, "canonicalize", [("prefix-share", {})]])
def test_options_that_are_not_a_mapping_are_a_pipeline_error(options: object) -> None:
    with pytest.raises(PassPipelineError, match="options must map pass names to their options"):
        PassManager("prefix-share", options)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [5, None, "min_length=3"])
def test_options_of_one_pass_that_are_not_a_mapping_are_a_pipeline_error(value: object) -> None:
    # was a raw TypeError ("'int' object is not a mapping") when the pass was in the pipeline
    with pytest.raises(
        PassPipelineError, match="options of pass prefix-share must be a mapping .*accepts: min_length"
    ):
        PassManager("prefix-share", {"prefix-share": value})  # type: ignore[dict-item]


def test_a_brace_left_open_is_named() -> None:
    with pytest.raises(PassPipelineError) as info:
        PassManager("canonicalize,prefix-share{min_length=4")
    assert str(info.value).startswith(
        "the options of pass prefix-share at position 25 of pipeline 'canonicalize,prefix-share{min_length=4' "
        "have no closing '}'"
    )
    with pytest.raises(PassPipelineError, match=r"are not one \{...\} without braces inside"):
        PassManager("prefix-share{min_length=4}{min_length=5}")


def test_a_separator_other_than_a_comma_is_shown() -> None:
    with pytest.raises(
        PassPipelineError, match="at position 12 of pipeline 'canonicalize;fork-join', got ';'"
    ):
        PassManager("canonicalize;fork-join")


@pytest.mark.parametrize(
    "pipeline",
    [" canonicalize , fork-join ", "canonicalize,canonicalize", "prefix-share { min_length = 4 }", "\t"],
)
def test_whitespace_and_repeated_passes_are_accepted(pipeline: str) -> None:
    PassManager(pipeline)
