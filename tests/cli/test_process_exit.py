"""``shorten_teardown``: what is garbage when the command ends is still collected (its finalizers
run); the rest is frozen, out of the teardown's collections; never with triton loaded."""

from __future__ import annotations

import gc
import subprocess
import sys
import types

import pytest

from llmir_lang.cli.process_exit import shorten_teardown

SCRIPT = """
import gc, sys
from llmir_lang.cli.process_exit import shorten_teardown

class Cycle:
    def __init__(self):
        self.me = self
    def __del__(self):
        print("finalized", flush=True)

Cycle()  # garbage in a reference cycle: only a collection finalizes it
shorten_teardown()
print("frozen", gc.get_freeze_count() > 0, flush=True)
"""


def test_garbage_is_finalized_and_the_rest_frozen() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split("\n")[:2] == ["finalized", "frozen True"]
    assert out.stderr == ""


def test_nothing_is_frozen_with_triton_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    before = gc.get_freeze_count()
    shorten_teardown()
    assert gc.get_freeze_count() == before


def test_the_command_line_ends_with_the_same_output(tmp_path) -> None:
    """``python -m llmir_lang`` (main() without argv) shortens its teardown; what it printed
    and its exit status are the command's."""
    prog = tmp_path / "prog.py"
    prog.write_text("import llmir_lang as llmir\n\n@llmir.function\ndef p(s, q):\n    s += q\n")
    out = subprocess.run(
        [sys.executable, "-m", "llmir_lang", "ir", f"{prog}:p", "--arg", "q=hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.startswith("// IR before the pipeline\n") and '"hi"' in out.stdout
