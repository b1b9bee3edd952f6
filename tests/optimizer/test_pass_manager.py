"""Pass manager: pipeline strings, options, errors, the empty pipeline, verification per pass."""

from __future__ import annotations

import re

import pytest

from llmir_lang.errors import IRVerifyError
from llmir_lang.ir import Module, parse_ir, print_ir
from llmir_lang.ir.module import Function
from llmir_lang.optimizer import (
    DEFAULT_PIPELINE,
    PASS_REGISTRY,
    ChatTemplate,
    PassManager,
    PassPipelineError,
    parse_pipeline,
    register_pass,
)

BATCH = """\
module {
  func @a() {
    %0 = start
    %1 = role.begin %0 "user"
    %2 = text %1 "Shared words here. First"
    %3 = gen %2 "x" {max_tokens = 4}
    return %3
  }
  func @b() {
    %0 = start
    %1 = role.begin %0 "user"
    %2 = text %1 "Shared words here. Second"
    %3 = gen %2 "x" {max_tokens = 4}
    return %3
  }
}
"""


def test_default_pipeline_names_are_registered() -> None:
    assert [name for name, _ in parse_pipeline(DEFAULT_PIPELINE)] == [
        "canonicalize",
        "prefix-share",
        "fork-join",
        "select-trie",
        "fuse-constants",
    ]
    assert set(PASS_REGISTRY) >= {
        "canonicalize",
        "prefix-share",
        "fork-join",
        "select-trie",
        "fuse-constants",
    }


def test_empty_pipeline_is_the_identity() -> None:
    module = parse_ir(BATCH)
    for pipeline in ("", "   "):
        assert PassManager(pipeline).run(module) is module
        assert PassManager(pipeline).run_text(BATCH) == BATCH


def test_unknown_pass_lists_the_known_ones() -> None:
    with pytest.raises(PassPipelineError) as info:
        PassManager("canonicalize,prefix-shar")
    message = str(info.value)
    assert "unknown pass 'prefix-shar'" in message
    for name in PASS_REGISTRY:
        assert name in message


@pytest.mark.parametrize(
    "pipeline", ["canonicalize,,fork-join", "canonicalize;fork-join", "fork-join{", "canonicalize,"]
)
def test_malformed_pipelines(pipeline: str) -> None:
    with pytest.raises(PassPipelineError):
        PassManager(pipeline)


def test_options_in_the_string_and_in_the_mapping() -> None:
    module = parse_ir(BATCH)
    pinned = print_ir(PassManager("prefix-share").run(module))
    assert 'pin = "p0"' in pinned
    # The shared prefix is 1 role marker + 18 characters long; min_length above it plans nothing.
    assert "pin" not in print_ir(PassManager("prefix-share{min_length=100}").run(module))
    assert "pin" not in print_ir(
        PassManager("prefix-share", {"prefix-share": {"min_length": 100}}).run(module)
    )
    with pytest.raises(PassPipelineError, match="accepts: min_length"):
        PassManager("prefix-share{min_len=3}")
    with pytest.raises(PassPipelineError, match="accepts: none"):
        PassManager("fork-join", {"fork-join": {"x": 1}})
    with pytest.raises(PassPipelineError, match="unknown pass 'nope'"):
        PassManager("fork-join", {"nope": {}})
    with pytest.raises(PassPipelineError, match="key=value"):
        PassManager("prefix-share{3}")


def test_whitespace_in_pipeline_and_trace() -> None:
    manager = PassManager(" canonicalize , prefix-share ")
    assert manager.pass_names == ["canonicalize", "prefix-share"]
    trace = manager.trace(parse_ir(BATCH))
    assert [name for name, _ in trace] == ["canonicalize", "prefix-share"]
    assert trace[-1][1] == manager.run(parse_ir(BATCH))


def test_a_pass_that_breaks_the_ir_is_reported_by_name() -> None:
    name = "test-break-ir"

    @register_pass(name)
    def break_ir(module: Module) -> Module:
        fn = module.functions[0]
        return Module((Function(fn.name, fn.params, fn.ops[:-1]),))  # drops the return

    try:
        with pytest.raises(IRVerifyError, match="pass test-break-ir produced invalid IR"):
            PassManager(name).run(parse_ir(BATCH))
        # verifying the final module only (the interpreter's setting) still names the pass
        with pytest.raises(IRVerifyError, match="pass test-break-ir produced invalid IR"):
            PassManager(f"canonicalize,{name},fork-join", verify_each=False).run(parse_ir(BATCH))
        # a later pass does not hide it either: its input was already invalid
        assert PassManager("canonicalize", verify_each=False).run(parse_ir(BATCH)) is not None
    finally:
        del PASS_REGISTRY[name]


def test_passes_are_idempotent_on_their_own_output() -> None:
    once = PassManager(DEFAULT_PIPELINE).run(parse_ir(BATCH))
    assert PassManager("prefix-share,fork-join,select-trie,fuse-constants").run(once) == once


@pytest.mark.parametrize(
    ("pipeline", "got"),
    [
        ("prefix-share{min_length=abc}", "got 'abc'"),
        ("prefix-share{min_length=}", "got ''"),
        ("prefix-share{min_length=-1}", "got -1"),
        ("prefix-share{min_length=1.5}", "got '1.5'"),  # the text: it does not read as an int
        ("prefix-share{min_length=true}", "got 'true'"),
        ("canonicalize,prefix-share{min_length=x},fork-join", "got 'x'"),
    ],
)
def test_bad_option_values_fail_when_the_pipeline_is_parsed(pipeline: str, got: str) -> None:
    expected = f"pass prefix-share: option min_length must be an integer >= 0, {got}"
    with pytest.raises(PassPipelineError) as info:
        parse_pipeline(pipeline)  # what the server checks before running anything
    assert str(info.value) == expected
    with pytest.raises(PassPipelineError) as info:
        PassManager(pipeline)
    assert str(info.value) == expected


def test_a_bad_option_fails_even_where_the_pass_would_never_read_it() -> None:
    # One function, no fork: prefix-share finds no shared node and never compared min_length.
    single = 'module {\n  func @f() {\n    %0 = start\n    %1 = text %0 "x"\n    return %1\n  }\n}\n'
    assert PassManager("prefix-share{min_length=0}").run_text(single) == single
    with pytest.raises(PassPipelineError, match="min_length must be an integer >= 0"):
        PassManager("prefix-share{min_length=x}").run_text(single)


def test_option_values_in_the_mapping_are_checked_too() -> None:
    with pytest.raises(PassPipelineError, match=r"option min_length must be an integer >= 0, got '3'"):
        PassManager("prefix-share", {"prefix-share": {"min_length": "3"}})
    with pytest.raises(
        PassPipelineError, match="option template must be a RoleRenderer or a callable or None, got 5"
    ):
        PassManager("canonicalize", {"canonicalize": {"template": 5}})
    template = ChatTemplate({"user": ("<u>", "</u>")})
    for ok in (None, template, lambda role, begin: role):
        PassManager("canonicalize", {"canonicalize": {"template": ok}})


def test_an_object_option_in_the_string_says_where_it_goes() -> None:
    with pytest.raises(PassPipelineError) as info:
        PassManager("canonicalize{template=chatml}")
    message = str(info.value)
    assert message.startswith(
        "pass canonicalize: option template must be a RoleRenderer or a callable or None"
    )
    assert "got 'chatml'" in message and "options mapping" in message


def test_an_option_given_twice_is_an_error() -> None:
    with pytest.raises(PassPipelineError, match="option min_length is given twice"):
        PassManager("prefix-share{min_length=1, min_length=2}")


def test_option_types_come_from_the_pass_signature() -> None:
    name = "test-typed-options"
    seen: list[dict[str, object]] = []

    @register_pass(name, bounds={"ratio": (0.0, 1.0), "shift": (None, None)})
    def typed(
        module: Module,
        *,
        count: int = 1,
        shift: int = 0,
        ratio: float = 0.5,
        label: str = "",
        flag: bool = False,
    ) -> Module:
        seen.append({"count": count, "shift": shift, "ratio": ratio, "label": label, "flag": flag})
        return module

    try:
        [(_, opts)] = parse_pipeline(f"{name}{{count=3, shift=-2, ratio=1, label=4, flag=true}}")
        assert opts == {"count": 3, "shift": -2, "ratio": 1, "label": "4", "flag": True}
        assert type(opts["label"]) is str  # a string option keeps the text, even "4"
        PassManager(name).run(parse_ir(BATCH))
        assert seen == [{"count": 1, "shift": 0, "ratio": 0.5, "label": "", "flag": False}]
        for bad, fragment in [
            ("count=-1", "option count must be an integer >= 0, got -1"),
            ("ratio=1.5", "option ratio must be a finite number in [0, 1], got 1.5"),
            ("ratio=inf", "option ratio must be a finite number in [0, 1], got 'inf'"),
            ("flag=1", "option flag must be true or false, got '1'"),
            ("nope=1", "has no option 'nope'; it accepts: count, shift, ratio, label, flag"),
        ]:
            with pytest.raises(
                PassPipelineError, match=re.escape(f"pass {name}") + ".*" + re.escape(fragment)
            ):
                PassManager(f"{name}{{{bad}}}")
    finally:
        del PASS_REGISTRY[name]
    with pytest.raises(ValueError, match="not its options"):
        register_pass("test-bad-bounds", bounds={"missing": (0, 1)})(typed)
    assert "test-bad-bounds" not in PASS_REGISTRY
