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


def test_ir_says_when_python_code_saw_a_placeholder(capsys, tmp_path):
    # a branch on a generated value follows one path in the trace: the printed IR says so
    prog = tmp_path / "branch.py"
    prog.write_text(
        "import llmir_lang as llmir\n\n"
        "@llmir.function\n"
        "def qa(s):\n"
        "    s += 'Q: 2 + 3?\\nA: ' + llmir.gen('answer', max_tokens=4)\n"
        "    if s['answer'].strip().isdigit():\n"
        "        s += ' Double: ' + llmir.gen('double', max_tokens=4)\n"
    )
    assert main(["ir", f"{prog}:qa", "--passes", ""]) == 0
    out = capsys.readouterr().out
    assert "placeholder texts ({answer} for s['answer'])" in out and "double" not in out
    assert main(["ir", f"{EXAMPLE}:skeleton"]) == 0
    assert "placeholder" not in capsys.readouterr().out


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
