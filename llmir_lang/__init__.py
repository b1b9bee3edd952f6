"""llmir_lang: language-model programs, traced to an IR, optimized whole, run fast."""

from __future__ import annotations

__version__ = "0.1.0"
