"""Every Python block of ``llmir_lang/dsl/README.md`` runs, in order, on the bundled model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import llmir_lang as llmir
from llmir_lang.dsl.testing import bundled_model_available

README = Path(llmir.__file__).resolve().parent / "dsl" / "README.md"


@pytest.mark.skipif(not bundled_model_available(), reason="the bundled model is not installed")
def test_readme_blocks_run(capsys):
    torch.set_num_threads(1)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 8
    namespace: dict = {"__name__": "readme"}
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        backend = llmir.get_default_backend()
        llmir.set_default_backend(None)
        if backend is not None:
            backend.shutdown()
    out = capsys.readouterr().out
    assert "12" in out.splitlines()[0]  # the few-shot answer of the first block
    assert "variable 'b' is never produced" in out
    assert namespace["fast"].text() == namespace["plain"].text()
