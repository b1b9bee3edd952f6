"""Test setup for the kernels: make ``llmir_lang.kernels`` importable from a source checkout.

``pyproject.toml`` maps ``kernels/`` to ``llmir_lang.kernels`` with ``package-dir``, but package
discovery (``include = ["llmir_lang*"]``) never finds it, so an editable install does not expose it.
Until packaging lists it, register the package from its folder so these tests run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def _ensure_kernels_package() -> None:
    try:
        import llmir_lang.kernels  # noqa: F401

        return
    except ModuleNotFoundError:
        pass
    import llmir_lang

    folder = Path(__file__).resolve().parents[2] / "kernels"
    spec = importlib.util.spec_from_file_location(
        "llmir_lang.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["llmir_lang.kernels"] = module
    llmir_lang.kernels = module  # type: ignore[attr-defined]
    spec.loader.exec_module(module)


_ensure_kernels_package()
