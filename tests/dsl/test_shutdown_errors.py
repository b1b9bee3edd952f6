"""A program in flight when its engine shuts down fails with a DSL error whose ``__cause__`` is the
engine's typed ``EngineClosedError``, so a service can catch it by type (it was only text in the
message: ``ChainResult`` carried the error as a string)."""

from __future__ import annotations

import pytest

import llmir_lang as llmir
from llmir_lang.dsl.errors import GenerationError
from llmir_lang.errors import EngineClosedError


@llmir.function
def long_answer(s, q):
    s += "Q: " + q + llmir.gen("a", max_tokens=2000, ignore_eos=True)


def test_a_run_in_flight_at_shutdown_keeps_the_engine_error_as_its_cause(random_model_dir):
    rt = llmir.Runtime(str(random_model_dir), device="cpu", kv_memory="16MB")
    state = long_answer.run(backend=rt, q="x", stream=True)
    chunks = state.text_iter("a")
    next(chunks)  # the generation is running
    rt.shutdown()
    with pytest.raises(GenerationError) as info:
        for _ in chunks:
            pass
        if state.error() is not None:
            raise state.error()
    assert isinstance(info.value.__cause__, EngineClosedError), repr(info.value.__cause__)
    assert isinstance(state.error(), GenerationError)
    assert isinstance(state.error().__cause__, EngineClosedError)
