"""``--arg NAME=VALUE``: the help says how VALUE is read (annotation, else JSON, else text) and how
to quote it in a shell, and the errors say it where a value was read otherwise than meant."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmir_lang import __main__ as cli_main

PROGRAM = (
    "import llmir_lang as llmir\n\n"
    "@llmir.function\n"
    "def prog(s, q):\n"
    "    s += 'Q: ' + q + '\\nA:' + llmir.gen('a', max_tokens=4)\n\n"
    "@llmir.function\n"
    "def typed(s, q: str, n: int):\n"
    "    s += 'Q: ' + q + '\\nA:' + llmir.gen('a', max_tokens=n)\n"
)


@pytest.fixture
def prog(tmp_path: Path) -> str:
    (tmp_path / "prog.py").write_text(PROGRAM)
    return str(tmp_path / "prog.py")


@pytest.mark.parametrize("command", ["ir", "run"])
def test_help_says_how_values_are_read_and_quoted(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main.main([command, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # the help text, rewrapped on one line
    for fragment in (
        "split at its first '='",
        "annotated int, float, bool or str: VALUE converted to that type",
        "never read as JSON",
        "VALUE is read as JSON when it is JSON",
        "else kept as the text",
        "--arg q=3 passes the int 3",
        "--arg 'q=\"3\"' (or --arg q='\"3\"')",
        "--arg 'q=What is 7 + 5?' (text: not JSON)",
        "--arg 'items=[1, 2]' (JSON: a list)",
    ):
        assert fragment in out, (fragment, out)


def test_values_are_read_as_the_help_says(prog: str) -> None:
    plain = cli_main._load_program(f"{prog}:prog")
    typed = cli_main._load_program(f"{prog}:typed")
    assert cli_main._arguments(["q=3"], plain) == {"q": 3}
    assert cli_main._arguments(['q="3"'], plain) == {"q": "3"}
    assert cli_main._arguments(["q=What is 7 + 5?"], plain) == {"q": "What is 7 + 5?"}
    assert cli_main._arguments(["q=a=b"], plain) == {"q": "a=b"}  # split at the first '='
    assert cli_main._arguments(["q=3", "n=3"], typed) == {"q": "3", "n": 3}
    assert cli_main._arguments(['q="3"'], typed) == {"q": '"3"'}  # str: as written, not JSON


def test_a_value_read_as_json_is_named_in_the_programs_error(
    prog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main.main(["ir", f"{prog}:prog", "--arg", "q=3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    assert err.startswith("error: program 'prog' (prog.py:5): TypeError"), err
    assert "--arg q=3 was read as JSON, so q is the int 3, not text" in err, err
    assert "to pass the text 3, write --arg 'q=\"3\"', or annotate the parameter `q: str`" in err, err
    assert "see --help for how --arg values are read" in err, err
    # the quoted form the note gives is text, and traces
    assert cli_main.main(["ir", f"{prog}:prog", "--arg", 'q="3"']) == 0
    capsys.readouterr()
    assert cli_main.main(["ir", f"{prog}:prog", "--arg", 'q={"a": 1}']) == 1
    err = capsys.readouterr().err
    assert "so q is the dict {'a': 1}" in err and """--arg 'q="{\\"a\\": 1}"'""" in err, err


def test_an_error_unrelated_to_json_values_has_no_note(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main.main(["ir", f"{prog}:prog", "--arg", "q=text", "--arg", "max_tokens=-1"]) == 1
    err = capsys.readouterr().err
    assert "max_new_tokens must be an integer >= 0" in err and "note:" not in err, err


def test_argument_errors_say_how_to_write_the_value(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    typed = cli_main._load_program(f"{prog}:typed")
    with pytest.raises(
        SystemExit,
        match=r"--arg n='three': expected int, as the parameter n is annotated int; e\.g\. --arg n=3",
    ):
        cli_main._arguments(["n=three"], typed)
    with pytest.raises(
        SystemExit, match=r"must be written NAME=VALUE, as one shell word.*--arg 'q=What is 7 \+ 5\?'"
    ):
        cli_main._arguments(["q"], typed)
    # `--arg q=What is 7` unquoted: the shell made "is" and "7" words of their own
    with pytest.raises(SystemExit) as e:
        cli_main.main(["ir", f"{prog}:prog", "--arg", "q=What", "is", "7"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: is 7; the shell splits an unquoted --arg value at its spaces" in err, err
    assert "--arg 'q=What is 7 + 5?'" in err, err
    with pytest.raises(SystemExit) as e:  # without --arg, argparse's own message
        cli_main.main(["ir", f"{prog}:prog", "stray"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: stray" in err and "--arg" not in err, err
