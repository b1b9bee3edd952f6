"""The package list in pyproject.toml covers every subpackage, and kernels/ maps to llmir_lang.kernels."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "llmir_lang").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {sorted(found - listed)}"
    assert cfg["package-dir"]["llmir_lang.kernels"] == "kernels"


def test_kernels_import_as_subpackage():
    import llmir_lang.kernels as k

    assert Path(k.__file__).parent == ROOT / "kernels"


def test_lazy_public_names_match_the_frontend():
    """``llmir_lang._PUBLIC`` repeats ``llmir_lang.dsl.__all__`` (the frontend is imported lazily):
    the two lists must not drift apart, and every name must resolve."""
    import llmir_lang
    from llmir_lang import dsl

    assert sorted(llmir_lang._PUBLIC) == sorted(dsl.__all__)
    for name in llmir_lang.__all__:
        assert getattr(llmir_lang, name) is not None, name
