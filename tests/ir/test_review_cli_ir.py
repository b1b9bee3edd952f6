"""``llmir ir`` as a user meets it (review): the program's own pipeline, program files that exit
or raise, targets that are not programs, broken tokenizers, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmir_lang import __main__ as cli_main
from llmir_lang.ir import parse_ir
from llmir_lang.models import TINY_MODEL_DIR

ROLES_PROGRAM = (
    "import llmir_lang as llmir\n\n"
    "@llmir.function\n"
    "def chat(s, q):\n"
    "    s += llmir.user(q)\n"
    "    s += llmir.assistant(llmir.gen('a', max_tokens=4))\n"
)
PLAIN_PROGRAM = (
    "import llmir_lang as llmir\n\n"
    "@llmir.function\n"
    "def qa(s, q):\n"
    "    s += 'Q: ' + q + '\\nA:' + llmir.gen('a', max_tokens=4)\n"
)


def _sections(out: str) -> list[str]:
    """The modules of ``llmir ir``'s output (each after a ``//`` header line)."""
    parts = [p.strip("\n") for p in out.split("// ")[1:]]
    return [p.split("\n", 1)[1] + "\n" for p in parts if "\n" in p and p.split("\n", 1)[1].strip()]


def test_the_program_s_own_empty_pipeline_is_the_one_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `@llmir.function(passes="")` runs call by call; `llmir ir` showed the default pipeline instead
    (tmp_path / "prog.py").write_text(
        "import llmir_lang as llmir\n\n"
        "@llmir.function(passes='')\n"
        "def p(s):\n"
        "    s += 'a' + llmir.gen('x', max_tokens=2) + 'b' + llmir.gen('y', max_tokens=2)\n"
    )
    assert cli_main.main(["ir", str(tmp_path / "prog.py")]) == 0
    out = capsys.readouterr().out
    assert "// the pipeline is empty: the IR is unchanged" in out and "gen.chain" not in out
    assert cli_main.main(["ir", str(tmp_path / "prog.py"), "--passes", "fuse-constants"]) == 0
    assert "// IR after 'fuse-constants'" in (out := capsys.readouterr().out) and "gen.chain" in out


def test_a_program_file_that_exits_when_imported_is_a_one_line_error(tmp_path: Path) -> None:
    # sys.exit() (or an argparse script) at the top level ended `llmir ir` silently with its code
    (tmp_path / "script.py").write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(SystemExit) as info:
        cli_main.main(["ir", f"{tmp_path / 'script.py'}:f"])
    message = str(info.value.code)
    assert message.startswith(f"error: importing {tmp_path / 'script.py'} called sys.exit(3)"), message
    assert 'if __name__ == "__main__"' in message and "\n" not in message


def test_an_import_error_of_several_lines_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "raises.py").write_text("raise RuntimeError('no config\\nlook in /etc')\n")
    with pytest.raises(SystemExit, match=r"raised RuntimeError: no config / look in /etc$"):
        cli_main.main(["ir", f"{tmp_path / 'raises.py'}:f"])


@pytest.mark.parametrize(
    ("name", "what"), [("LIMIT", "the int 3"), ("Person", "a class"), ("TEMPLATE", "the str 'Q: {q}'")]
)
def test_a_target_that_is_not_a_function_is_named_as_such(tmp_path: Path, name: str, what: str) -> None:
    # was "@function decorates a function, got int" / "the first parameter ... must be named 's'"
    (tmp_path / "prog.py").write_text(
        "from pydantic import BaseModel\n\nLIMIT = 3\nTEMPLATE = 'Q: {q}'\n\n"
        "class Person(BaseModel):\n    name: str\n"
    )
    with pytest.raises(SystemExit) as info:
        cli_main.main(["ir", f"{tmp_path / 'prog.py'}:{name}"])
    assert str(info.value.code) == (
        f"error: {tmp_path / 'prog.py'}:{name} is not a program (it is {what}); "
        "name a function decorated with @llmir.function"
    )


def test_a_plain_function_is_still_taken_and_a_wrong_one_says_it_is_not_a_program(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "prog.py").write_text("def body(s, q):\n    s += 'Q: ' + q\n\ndef helper(x):\n    return x\n")
    assert cli_main.main(["ir", f"{tmp_path / 'prog.py'}:body", "--passes", ""]) == 0
    assert '%1 = text %0 "Q: "' in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"helper is not an @llmir.function, and as a plain function"):
        cli_main.main(["ir", f"{tmp_path / 'prog.py'}:helper"])


def test_an_error_the_traced_program_raises_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "prog.py").write_text(
        "import llmir_lang as llmir\n\n@llmir.function\ndef p(s):\n    raise ValueError('first\\nsecond')\n"
    )
    assert cli_main.main(["ir", str(tmp_path / "prog.py")]) == 1
    err = capsys.readouterr().err
    assert err.endswith("ValueError: first / second\n") and err.count("\n") == 1, err


def test_a_parameter_computed_with_but_not_given_gets_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "prog.py").write_text(
        "import llmir_lang as llmir\n\n@llmir.function\ndef p(s, n, q):\n"
        "    for i in range(n):\n        s += q + llmir.gen(f'g{i}', max_tokens=2)\n"
    )
    assert cli_main.main(["ir", str(tmp_path / "prog.py")]) == 1
    err = capsys.readouterr().err
    assert "'TracedText' object cannot be interpreted as an integer" in err, err
    assert "traced without --arg for n, q" in err and "give --arg NAME=VALUE" in err and err.count("\n") == 1
    assert cli_main.main(["ir", str(tmp_path / "prog.py"), "--arg", "n=2"]) == 0
    assert '"g1"' in capsys.readouterr().out


def _tokenizer_copy(folder: Path, config: object) -> Path:
    folder.mkdir()
    shutil.copy(TINY_MODEL_DIR / "tokenizer.json", folder / "tokenizer.json")
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "tokenizer_config.json").write_text(text)
    return folder


def test_a_tokenizer_that_does_not_load_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "prog.py").write_text(ROLES_PROGRAM)
    broken = _tokenizer_copy(tmp_path / "broken", "{not json")
    # was a JSONDecodeError traceback from transformers
    assert cli_main.main(["ir", str(tmp_path / "prog.py"), "--model", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: --model {str(broken)!r}: its tokenizer does not load (JSONDecodeError: "
    ), err
    assert err.count("\n") == 1


def test_a_tokenizer_without_a_chat_template_matters_only_to_programs_with_roles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = json.loads((TINY_MODEL_DIR / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    folder = _tokenizer_copy(tmp_path / "no_template", config)
    (tmp_path / "plain.py").write_text(PLAIN_PROGRAM)
    (tmp_path / "chat.py").write_text(ROLES_PROGRAM)
    assert cli_main.main(["ir", str(tmp_path / "plain.py"), "--model", str(folder)]) == 0
    assert all(parse_ir(m) for m in _sections(capsys.readouterr().out))
    assert cli_main.main(["ir", str(tmp_path / "chat.py"), "--model", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "the program has roles: give --model a checkpoint whose tokenizer has a chat template" in err
    assert err.count("\n") == 1


def test_ir_output_parses_back_section_by_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "prog.py").write_text(
        "import llmir_lang as llmir\n\n@llmir.function\ndef p(s, q):\n"
        "    s += llmir.system('sys \"quoted\" \\\\ back } \\u2028 \\x00')\n"
        "    s += llmir.user(q)\n"
        "    f = s.fork(2)\n"
        "    f += lambda i: llmir.assistant(llmir.gen('a', max_tokens=2, stop=['}', '\\n'], regex='[a-z]+\\\\}'))\n"
        "    f.join()\n"
        "    s += llmir.select('c', choices=['x', 'y\"'])\n"
    )
    assert cli_main.main(["ir", str(tmp_path / "prog.py"), "--print-after-all", "--arg", 'q=é "}" \\']) == 0
    sections = _sections(capsys.readouterr().out)
    assert len(sections) == 6  # before, and after each of the five passes
    for text in sections:
        assert parse_ir(text) is not None


def test_a_value_name_the_terminal_cannot_write_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "prog.py").write_text(
        "import llmir_lang as llmir\n\n@llmir.function\ndef p(s, café):\n    s += café\n"
    )
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    cmd = [sys.executable, "-m", "llmir_lang", "ir", str(tmp_path / "prog.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and proc.stdout == "", proc
    assert proc.stderr.startswith("error: the IR holds a value name that standard output's encoding (ascii)")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    env["PYTHONIOENCODING"] = "utf-8"
    proc = subprocess.run(cmd, capture_output=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "%café" in proc.stdout.decode("utf-8")
