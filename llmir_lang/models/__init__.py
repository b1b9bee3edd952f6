"""Bundled models: ``llmir-tiny``, the default of ``Engine()``, and the tasks it was trained on.

``TINY_MODEL_DIR`` is the checkpoint folder (Hugging Face format); ``tiny_tasks`` holds the
generators and exact prompt formats of its synthetic training tasks.
"""

from __future__ import annotations

from pathlib import Path

TINY_MODEL_NAME = "llmir-tiny"
TINY_MODEL_DIR: Path = Path(__file__).resolve().parent / TINY_MODEL_NAME

__all__ = ["TINY_MODEL_DIR", "TINY_MODEL_NAME"]
