from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def server():
    """The bundled model served on a free loopback port for the whole session."""
    from server_harness import served

    with served("--max-tokens-limit", "960", "--max-request-bytes", "262144") as proc:
        yield proc


@pytest.fixture(scope="session")
def client(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        yield c
