"""``llmir`` entry point: subcommands listed, ``bench`` dispatch and its errors, lazy exports."""

from __future__ import annotations

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
    assert cli_main.main(["ir", str(ROOT / "examples" / "dsl_stream_async.py")]) == 0
    assert "func @chat(" in capsys.readouterr().out
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
