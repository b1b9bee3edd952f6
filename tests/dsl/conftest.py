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


@pytest.fixture(scope="module")
def rt(request):
    """A Runtime on the bundled model, or on ``random_model_dir`` where the bundled one is absent."""
    import llmir_lang as llmir
    from llmir_lang.dsl.testing import bundled_model_available

    model = None if bundled_model_available() else str(request.getfixturevalue("random_model_dir"))
    runtime = llmir.Runtime(model, device="cpu", kv_memory="64MB")
    yield runtime
    runtime.shutdown()
