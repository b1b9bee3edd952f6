"""Golden tests, MLIR-lit style: each ``golden/*.ir`` file holds a pipeline (``// RUN:``), an input
module and, after ``// CHECK:``, the exact IR text the pipeline must print. ``// TEMPLATE: chatml``
renders roles with a fixed ChatML-like template.

Regenerate after a deliberate change with ``LLMIR_UPDATE_GOLDEN=1`` (then review the diff).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmir_lang.ir import parse_ir, print_ir
from llmir_lang.optimizer import ChatTemplate, PassManager

GOLDEN = Path(__file__).parent / "golden"
CHATML = ChatTemplate({r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ("system", "user", "assistant")})
CHECK = "// CHECK:\n"


def _split(path: Path) -> tuple[str, bool, str, str | None]:
    text = path.read_text(encoding="utf-8")
    source, _, expected = text.partition(CHECK)
    lines = source.splitlines()
    pipeline = next(line.removeprefix("// RUN:").strip() for line in lines if line.startswith("// RUN:"))
    template = any(line.startswith("// TEMPLATE: chatml") for line in lines)
    return pipeline, template, source, (expected if CHECK in text else None)


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.ir")), ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    pipeline, template, source, expected = _split(path)
    options = {"canonicalize": {"template": CHATML}} if template else None
    got = PassManager(pipeline, options).run_text(source)
    if os.environ.get("LLMIR_UPDATE_GOLDEN"):
        path.write_text(source + CHECK + got, encoding="utf-8")
        return
    assert expected is not None, f"{path.name} has no // CHECK: section; run with LLMIR_UPDATE_GOLDEN=1"
    assert got == expected
    # The output is itself valid IR that prints back to the same text.
    assert print_ir(parse_ir(got)) == got
