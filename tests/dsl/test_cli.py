"""``python -m llmir_lang ir|run``: IR before/after the pipeline, and running a program."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmir_lang.__main__ import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dsl_qa.py"


def test_ir_prints_before_and_after(capsys):
    assert main(["ir", f"{EXAMPLE}:skeleton"]) == 0
    out = capsys.readouterr().out
    before, after = out.split("// IR after")
    assert "func @skeleton(%topic: text)" in before and "fork" in before and "pin" not in before
    assert 'group = "g0"' in after and 'pin = "p0"' in after


def test_ir_with_arguments_passes_and_each_pass(capsys):
    assert (
        main(["ir", f"{EXAMPLE}:chat", "--arg", "first=Hi", "--arg", "second=Bye", "--print-after-all"]) == 0
    )
    out = capsys.readouterr().out
    for name in ("canonicalize", "prefix-share", "fork-join", "select-trie", "fuse-constants"):
        assert f"// IR after {name}" in out
    assert '"Hi"' in out and "gen.chain" in out.split("// IR after fuse-constants")[1]
    assert main(["ir", f"{EXAMPLE}:qa", "--passes", ""]) == 0
    assert "the pipeline is empty" in capsys.readouterr().out


def test_bad_targets(capsys):
    with pytest.raises(SystemExit):
        main(["ir", "no_colon.py"])
    with pytest.raises(SystemExit):
        main(["ir", f"{EXAMPLE}:nope"])
    assert main(["ir", f"{EXAMPLE}:qa", "--passes", "bogus"]) == 1
    assert "unknown pass" in capsys.readouterr().err


def test_run_on_a_model(capsys, random_model_dir):
    args = ["run", f"{EXAMPLE}:qa", "--arg", "question=What is 1 + 1?", "--model", str(random_model_dir)]
    assert main([*args, "--max-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Q: What is 3 + 4?")
    stats = json.loads(lines[-1])
    assert stats["requests"] == 1
