"""Pass manager: pipeline strings, options, errors, the empty pipeline, verification per pass."""

from __future__ import annotations

import pytest

from llmir_lang.errors import IRVerifyError
from llmir_lang.ir import Module, parse_ir, print_ir
from llmir_lang.ir.module import Function
from llmir_lang.optimizer import (
    DEFAULT_PIPELINE,
    PASS_REGISTRY,
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
