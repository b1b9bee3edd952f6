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


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """A random-weight checkpoint with the bundled (or a locally trained) tokenizer, built once."""
    from llmir_lang.dsl.testing import random_checkpoint

    return random_checkpoint(tmp_path_factory.mktemp("dsl_model"))
