from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture()
def fake():
    from fake_backend import FakeBackend

    backend = FakeBackend()
    yield backend
    backend.pool.shutdown(wait=True)
