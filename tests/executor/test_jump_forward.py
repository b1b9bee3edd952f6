"""Jump-forward on the bundled model: how much is forced, and that it changes nothing but speed.

On compact JSON (``whitespace=""``) of ``tiny_tasks.SCHEMAS["person"]`` the model samples ``{"``,
the value tokens, the ``","`` / ``,"`` that ends a value, and the enum / boolean value; the engine
forces everything else: ``name``; ``age":``; ``city``; ``occupation":"``; ``","married":``; ``}``
(10 tokens). ``":"`` before a free string stays with the model (a value starting with ``:`` would
be spelled differently, see ``tests/executor/constraints/test_constraint_forced.py``).
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

from llmir_lang.executor.backend import ChainRequest, EngineBackend, GenStep
from llmir_lang.executor.constraints import spec_from_json_schema
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.models.tiny_tasks import EXTRACTION_KINDS, SCHEMAS, extraction_prompt, make_extraction_example

torch.set_num_threads(1)
PERSON_FORCED = 10


@pytest.fixture(scope="module")
def backend():
    be = EngineBackend(Engine(device="cpu"))
    yield be
    be.engine.shutdown()


def items(n: int, seed: int, kinds: tuple[str, ...] = EXTRACTION_KINDS) -> list[tuple[str, str, dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        text, record = make_extraction_example(rng, kind)
        out.append((kind, extraction_prompt(text, kind), record))
    return out


def request(kind: str, prompt: str) -> ChainRequest:
    spec = spec_from_json_schema(SCHEMAS[kind], whitespace="")
    return ChainRequest(prompt, [GenStep("x", SamplingParams(max_new_tokens=96), spec)])


def run(backend: EngineBackend, its: list, jump_forward: bool, batched: bool) -> list[Any]:
    eng = backend.engine
    saved = eng.jump_forward
    eng.jump_forward = jump_forward
    try:
        eng.flush_cache()
        reqs = [request(kind, prompt) for kind, prompt, _ in its]
        res = backend.run(reqs) if batched else [backend.run([r])[0] for r in reqs]
    finally:
        eng.jump_forward = saved
    return [r.steps[0] for r in res]


def test_person_records_force_every_key_and_waste_no_step(backend):
    eng = backend.engine
    eng.jump_forward = True
    for kind, prompt, gold in items(4, seed=11, kinds=("person",)):
        eng.flush_cache()
        before = eng.stats()["forward_calls"]
        step = backend.run([request(kind, prompt)])[0].steps[0]
        forwards = eng.stats()["forward_calls"] - before
        assert step.finish_reason == "stop"
        assert json.loads(step.text).keys() == gold.keys()
        assert step.meta["jump_forward_tokens"] == PERSON_FORCED, step.text
        # one forward per sampled token: no EOS step after the forced '}', no step wasted
        assert forwards == step.completion_tokens - PERSON_FORCED
        assert step.text.endswith("}") and len(step.token_ids) == step.completion_tokens


@pytest.mark.parametrize("batched", [False, True], ids=["sequential", "batched"])
def test_greedy_output_is_the_same_with_jump_forward_on_and_off(backend, batched):
    its = items(9, seed=23)
    on = run(backend, its, True, batched)
    off = run(backend, its, False, batched)
    assert [s.text for s in on] == [s.text for s in off]
    assert [s.token_ids for s in on] == [s.token_ids for s in off]  # the same tokens, not just text
    assert all(s.finish_reason == "stop" for s in on + off)
    assert sum(s.meta["jump_forward_tokens"] for s in on) >= 9 * len(its)
    assert all(s.meta["jump_forward_tokens"] == 0 for s in off)
