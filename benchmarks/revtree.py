"""A copy of ``llmir_lang`` as it was at a git revision, for benchmarks that compare the working
tree against it side by side (``--compare REV``): nothing in the checkout changes."""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path


def extract_package(repo: Path, rev: str, dest: Path) -> None:
    """Write ``rev``'s ``llmir_lang`` folder under ``dest`` (``git archive``)."""
    data = subprocess.run(
        ["git", "-C", str(repo), "archive", rev, "llmir_lang"], capture_output=True, check=True
    )
    with tempfile.TemporaryFile() as f:
        f.write(data.stdout)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(dest, filter="data")
