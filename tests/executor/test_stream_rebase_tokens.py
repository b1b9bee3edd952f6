"""A stream's token ids under jump-forward re-tokenization (found by the server fuzz,
``tests/server/test_fuzz_server.py``).

With a constraint, the model samples ``f`` and the constraint forces ``alse``; jump-forward
re-tokenizes the output's end with the forced text, and ``false`` (one token) replaces ``f``, in
``req.rebase_to`` until the scheduler applies it after the step. ``stream_text`` streamed the old
``req.output_ids`` (``f``), so ``false`` never went out: the chunks' token ids joined differed from
``GenerateResult.token_ids``. It streams the pending output now.
"""

from __future__ import annotations

import pytest
import torch

from llmir_lang.executor.constraints import spec_from_json_schema
from llmir_lang.executor.engine import Engine

torch.set_num_threads(1)

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["answer", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine():
    eng = Engine(device="cpu", kv_memory="32MB")
    yield eng
    eng.shutdown()


def test_streamed_token_ids_are_the_results_after_jump_forward_retokenizes(engine):
    tok = engine.tokenizer
    matcher = engine.compile_constraint(spec_from_json_schema(SCHEMA)).new_matcher()
    chunks = []
    params = {"temperature": 0.0, "max_new_tokens": 34}
    res = engine.submit("Q: What is 18 + 7?\nA: ", params, stream=chunks.append, matcher=matcher).result(60)
    # the case this is about: "false" (one token) in the output, and jump-forward forced text
    assert tok.encode("false", add_special_tokens=False)[0] in res.token_ids
    assert res.meta["jump_forward_tokens"] > 0
    assert "".join(c.text for c in chunks) == res.text
    assert [t for c in chunks for t in c.token_ids] == res.token_ids
