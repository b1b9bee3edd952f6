"""The DSL tour in the top README runs as written, on the bundled model."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_tour_runs(capsys):
    text = README.read_text()
    start = text.index("```python", text.index("## A tour of the DSL")) + len("```python")
    code = text[start : text.index("```", start)]
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_tour"})
    out = capsys.readouterr().out
    assert "12" in out.splitlines()[0]
    assert "'role': 'assistant'" in out
