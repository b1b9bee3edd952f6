"""``llmir`` entry point: subcommands listed, ``bench`` dispatch and its errors, lazy exports,
one-line errors instead of tracebacks, typed ``--arg`` values, the README's command line section."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

import llmir_lang
from llmir_lang import __main__ as cli_main
from llmir_lang.cli import bench

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("ir", "run", "extract", "serve", "bench"):
        assert f"    {name} " in out, out


def test_extract_help_names_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main.main(["extract", "--help"])
    out = capsys.readouterr().out
    for option in (
        "--schema",
        "--input",
        "--output",
        "--text-field",
        "--id-field",
        "--prompt-file",
        "--model",
    ):
        assert option in out


def test_bench_lists_and_rejects_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main.main(["bench"]) == 2
    assert "engine" in capsys.readouterr().out
    assert cli_main.main(["bench", "no-such-bench"]) == 2
    assert "unknown benchmark 'no-such-bench'" in capsys.readouterr().err


def test_bench_without_benchmarks_folder_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: None)
    assert cli_main.main(["bench", "engine"]) == 2
    assert "source tree only" in capsys.readouterr().err


def test_bench_runs_the_script_with_its_arguments() -> None:
    # --help of a real benchmark: its own argparse answers, through a child process
    done = subprocess.run(
        [sys.executable, "-m", "llmir_lang", "bench", "json", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and "bench_json" in done.stdout


def test_serve_dispatches_to_the_server_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main.main(["serve", "--port", "not-a-port"]) == 2


def test_remote_backends_are_lazy_exports() -> None:
    from llmir_lang.executor.remote import Endpoint, OpenAI

    assert llmir_lang.Endpoint is Endpoint and llmir_lang.OpenAI is OpenAI
    assert {"Endpoint", "OpenAI"} <= set(llmir_lang.__all__) and "OpenAI" in dir(llmir_lang)


def test_program_name_may_be_left_out_when_the_file_has_one(capsys: pytest.CaptureFixture[str]) -> None:
    target = str(ROOT / "examples" / "dsl_stream_async.py")
    assert cli_main.main(["ir", target, "--arg", 'questions=["Hi", "Bye"]']) == 0
    out = capsys.readouterr().out
    assert "func @chat(" in out and '"Bye"' in out
    # its loop over the questions cannot be traced without them: a typed error that says so
    assert cli_main.main(["ir", target]) == 1
    err = capsys.readouterr().err
    assert "parameter 'questions' is iterated" in err and "--arg questions=" in err
    with pytest.raises(SystemExit, match="3 programs"):
        cli_main.main(["ir", str(ROOT / "examples" / "dsl_qa.py")])


def test_extract_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "x"}\n')
    base = [
        "extract",
        "--schema",
        "person",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output",
        str(tmp_path / "o"),
    ]
    assert cli_main.main([*base, "--prompt-file", str(tmp_path / "missing.txt")]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("no placeholder")
    assert cli_main.main([*base, "--prompt-file", str(tmp_path / "p.txt")]) == 1
    assert "{text}" in capsys.readouterr().err
    assert cli_main.main([*base[:4], str(tmp_path / "nope.jsonl"), *base[5:]]) == 1
    assert "no such file" in capsys.readouterr().err


def test_extract_help_describes_the_command_and_its_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main.main(["extract", "--help"])
    out = capsys.readouterr().out
    assert "Batch structured extraction" in out and "--retry-failed" in out
    assert "exit status: 0 every record" in out and "130 interrupted" in out and '"line:N"' in out


def test_readme_command_line_matches_the_commands() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Command line") : text.index("\n## ", text.index("## Command line") + 1)]
    parser = argparse.ArgumentParser()
    from llmir_lang.cli.extract import add_arguments

    add_arguments(parser)
    options = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    missing = sorted(o for o in options if o not in section)
    assert not missing, f"README's Command line section omits {missing}"
    folder = bench.benchmarks_dir()
    assert folder is not None
    listed = re.search(r"llmir bench ([\w|]+)", section)
    assert listed is not None and set(listed[1].split("|")) == set(bench.available(folder))


def test_unusable_inputs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "x"}\n')
    (tmp_path / "latin1.csv").write_bytes(b"id,text\n1,ok\n2,caf\xe9\n")
    (tmp_path / "latin1.txt").write_bytes(b"Text: {text}\nna\xefve\n")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("")
    (tmp_path / "syntax.py").write_text("class Broken(:\n    pass\n")
    (tmp_path / "raises.py").write_text("raise RuntimeError('no database')\n")
    base = ["extract", "--schema", "person", "--input", str(tmp_path / "in.jsonl"), "--output"]
    out = str(tmp_path / "o.jsonl")
    for args, message in (
        ([*base, out, "--input", str(tmp_path / "latin1.csv")], "latin1.csv': line 3 is not UTF-8"),
        (
            [*base, out, "--prompt-file", str(tmp_path / "latin1.txt")],
            "latin1.txt' is not UTF-8 (line 2, byte 3)",
        ),
        ([*base, str(tmp_path / "outdir")], "is a directory"),
        ([*base, str(tmp_path / "afile" / "sub" / "o.jsonl")], "cannot create its folder"),
        ([*base, out, "--schema", f"{tmp_path / 'syntax.py'}:M"], "syntax.py, line 1: syntax error"),
        ([*base, out, "--schema", f"{tmp_path / 'raises.py'}:M"], "raised RuntimeError: no database"),
    ):
        assert cli_main.main(args) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.jsonl").exists()


def test_program_files_that_fail_to_import_name_the_file_and_the_error(tmp_path: Path) -> None:
    (tmp_path / "syntax.py").write_text("import llmir_lang\n\ndef f(s:\n")
    (tmp_path / "raises.py").write_text("raise ValueError('bad config')\n")
    for command in ("ir", "run"):
        with pytest.raises(SystemExit, match=r"syntax\.py, line 3: syntax error"):
            cli_main.main([command, str(tmp_path / "syntax.py")])
        with pytest.raises(SystemExit, match=r"raises\.py raised ValueError: bad config"):
            cli_main.main([command, str(tmp_path / "raises.py")])


def test_ir_with_a_model_that_is_not_there_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = str(ROOT / "examples" / "dsl_stream_async.py")
    assert cli_main.main(["ir", target, "--model", str(tmp_path / "nope")]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert cli_main.main(["ir", target, "--model", str(tmp_path)]) == 1  # a folder without a tokenizer
    assert "tokenizer_config.json" in capsys.readouterr().err


def test_arg_values_are_typed(tmp_path: Path) -> None:
    (tmp_path / "prog.py").write_text(
        "import llmir_lang as llmir\n\n"
        "@llmir.function\n"
        "def prog(s, n: int, ratio: float, flag: bool, name: str, data, text):\n"
        "    s += text\n"
    )
    program = cli_main._load_program(str(tmp_path / "prog.py"))
    items = [
        "n=3", "ratio=0.5", "flag=yes", "name=42", "data=[1, {\"k\": null}]", "text=What is 7 + 5?",
        "max_tokens=3", "temperature=0.7", "stop=\"\\n\"",
    ]  # fmt: skip
    assert cli_main._arguments(items, program) == {
        "n": 3, "ratio": 0.5, "flag": True, "name": "42", "data": [1, {"k": None}], "text": "What is 7 + 5?",
        "max_tokens": 3, "temperature": 0.7, "stop": "\n",
    }  # fmt: skip
    with pytest.raises(SystemExit, match="expected int"):
        cli_main._arguments(["n=three"], program)
    with pytest.raises(SystemExit, match="expected a bool"):
        cli_main._arguments(["flag=maybe"], program)


def test_a_reader_that_leaves_ends_llmir_run_quietly(tmp_path: Path) -> None:
    """``llmir run ... | head -1``: the pipe closes early; no BrokenPipeError traceback."""
    prog = tmp_path / "prog.py"
    prog.write_text(
        "import llmir_lang as llmir\n\n@llmir.function\ndef prog(s, q):\n"
        "    s += 'Q: ' + q + '\\nA:' + llmir.gen('a', max_tokens=400, ignore_eos=True)\n"
    )
    cmd = [sys.executable, "-m", "llmir_lang", "run", f"{prog}:prog", "--arg", "q=What is 2 + 2?", "--stream"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(3) == b"Q: "
    proc.stdout.close()  # the reader leaves
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
