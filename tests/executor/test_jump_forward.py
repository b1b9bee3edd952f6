"""Jump-forward on the bundled model: how much is forced, and that it changes nothing but speed.

On compact JSON (``whitespace=""``) of ``tiny_tasks.SCHEMAS["person"]`` the model samples ``{"``,
the value tokens, the ``","`` / ``,"`` that ends a value, and the enum / boolean value; the engine
forces everything else: ``name``; ``age":``; ``city``; ``occupation":"``; ``","married":``; ``}``
(10 tokens). ``":"`` before a free string stays with the model (a value starting with ``:`` would
be spelled differently, see ``tests/executor/constraints/test_constraint_forced.py``).
``OutputProcessor.force_start`` moves the forced opening (``{"name``) before the first step; a
chain's next constrained generation gets it with its rebase.
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from llmir_lang.executor.backend import ChainRequest, EngineBackend, GenStep
from llmir_lang.executor.constraints import spec_from_choices, spec_from_json_schema, spec_from_regex
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.request import Req
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.executor.tokenizer import IncrementalDecoder
from llmir_lang.models.tiny_tasks import (
    SCHEMAS,
    extraction_items,
)

torch.set_num_threads(1)
# forced per person record: the opening `{"name` before the first step (Engine.submit calls
# force_start), then every later key and its punctuation
PERSON_FORCED = 11


@pytest.fixture(scope="module")
def backend():
    be = EngineBackend(Engine(device="cpu"))
    yield be
    be.engine.shutdown()


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
    for kind, prompt, gold in extraction_items(4, seed=11, kinds=("person",)):
        eng.flush_cache()
        before = eng.stats()["forward_calls"]
        step = backend.run([request(kind, prompt)])[0].steps[0]
        forwards = eng.stats()["forward_calls"] - before
        assert step.finish_reason == "stop"
        assert json.loads(step.text).keys() == gold.keys()
        assert step.meta["jump_forward_tokens"] == PERSON_FORCED, step.text
        # one forward per sampled token that no verified draft supplied (speculation is on by
        # default on the CPU): no EOS step after the forced '}', no step wasted
        accepted = step.meta["spec_accepted_tokens"]
        assert forwards == step.completion_tokens - PERSON_FORCED - accepted
        assert step.text.endswith("}") and len(step.token_ids) == step.completion_tokens


@pytest.mark.parametrize("batched", [False, True], ids=["sequential", "batched"])
def test_greedy_output_is_the_same_with_jump_forward_on_and_off(backend, batched):
    its = extraction_items(9, seed=23)
    on = run(backend, its, True, batched)
    off = run(backend, its, False, batched)
    assert [s.text for s in on] == [s.text for s in off]
    assert [s.token_ids for s in on] == [s.token_ids for s in off]  # the same tokens, not just text
    assert all(s.finish_reason == "stop" for s in on + off)
    assert sum(s.meta["jump_forward_tokens"] for s in on) >= 9 * len(its)
    assert all(s.meta["jump_forward_tokens"] == 0 for s in off)


@pytest.mark.parametrize(
    "pattern",
    ["日本", "本", "[😀é]{3}", "日(本|曜)日", "ab日本語cd", "(😀|😃)x"],
)
def test_forced_multibyte_characters_stay_whole(backend, pattern):
    """Forced bytes that end inside a character, or finish one the model began, are kept as the
    matcher's tokens and decoded like sampled ones: the text is the constraint's, never U+FFFD,
    and the tokens are those of a run without jump-forward."""
    import re

    def one(jump_forward: bool) -> Any:
        eng = backend.engine
        saved, eng.jump_forward = eng.jump_forward, jump_forward
        try:
            req = ChainRequest(
                "Q: What is 3 + 4?\nA: ",
                [GenStep("x", SamplingParams(max_new_tokens=16), spec_from_regex(pattern))],
            )
            return backend.run([req])[0].steps[0]
        finally:
            eng.jump_forward = saved

    on, off = one(True), one(False)
    assert re.fullmatch(pattern, on.text), on.text
    assert on.finish_reason == "stop" and on.text == off.text and on.token_ids == off.token_ids


def test_jump_forward_never_outgrows_max_new_tokens(backend):
    long_keys = {
        "type": "object",
        "properties": {"a_very_long_property_name_number_one": {"type": "integer"}},
        "required": ["a_very_long_property_name_number_one"],
    }
    for n in (2, 3, 5, 8):
        req = ChainRequest(
            "JSON:\n", [GenStep("x", SamplingParams(max_new_tokens=n), spec_from_json_schema(long_keys))]
        )
        step = backend.run([req])[0].steps[0]
        assert len(step.token_ids) == n and step.finish_reason == "length", (n, step.token_ids)


def fresh_req(backend: EngineBackend, spec: Any, max_new_tokens: int = 32) -> Req:
    eng = backend.engine
    matcher = backend._matcher(spec)[0]
    return Req(
        rid=0,
        prompt_ids=eng.tokenizer.encode("Person JSON:\n"),
        params=SamplingParams(max_new_tokens=max_new_tokens),
        future=Future(),
        decoder=IncrementalDecoder(eng.tokenizer, True),
        matcher=matcher,
    )


def test_force_start_puts_the_forced_opening_before_the_first_step(backend):
    eng = backend.engine
    req = fresh_req(backend, spec_from_json_schema(SCHEMAS["person"], whitespace=""))
    forced = eng.outputs.force_start(req)
    assert req.output_ids == forced == eng.tokenizer.encode('{"name', add_special_tokens=False)
    assert req.text == '{"name' and req.num_forced == 2
    assert req.matcher.forced_text() == '":"'  # the matcher stands after the forced tokens
    assert eng.outputs.force_start(req) == []  # only before the first token

    # a constraint forced to its end still leaves the model one token to write
    whole = fresh_req(backend, spec_from_choices(["alphabet soup"]))
    forced = eng.outputs.force_start(whole)
    assert forced and not whole.matcher.is_terminated()
    assert eng.tokenizer.decode(forced) + whole.matcher.forced_text() == "alphabet soup"
    capped = fresh_req(backend, spec_from_json_schema(SCHEMAS["person"], whitespace=""), max_new_tokens=2)
    assert len(eng.outputs.force_start(capped)) == 1


def test_chained_constrained_generation_starts_forced(backend):
    """A chain's next constrained generation gets its forced opening with the rebase (no extra
    step), and the tokens equal those with jump-forward off."""
    spec = spec_from_json_schema(SCHEMAS["person"], whitespace="")
    steps = [
        GenStep("a", SamplingParams(max_new_tokens=64), spec),
        "\nPerson JSON:\n",
        GenStep("b", SamplingParams(max_new_tokens=64), spec),
    ]
    its = extraction_items(2, seed=4, kinds=("person",))
    eng = backend.engine
    out: dict[bool, list] = {}
    for jf in (True, False):
        eng.jump_forward = jf
        eng.flush_cache()
        out[jf] = backend.run([ChainRequest(prompt, steps) for _, prompt, _ in its])
    eng.jump_forward = True
    for on, off in zip(out[True], out[False]):
        assert [s.token_ids for s in on.steps] == [s.token_ids for s in off.steps]
        assert on.text == off.text
        a, b = (s.meta["jump_forward_tokens"] for s in on.steps)  # counted over the chain
        assert a == PERSON_FORCED and b - a == PERSON_FORCED  # both start with '{"name' forced


def test_constraint_masks_are_computed_while_the_model_runs(backend):
    eng = backend.engine
    before = eng.outputs.masks_overlapped
    out = run(backend, extraction_items(3, seed=31), True, True)
    assert all(s.finish_reason == "stop" for s in out)
    assert eng.outputs.masks_overlapped > before  # the masks of those steps came from start_masks


def test_overlapped_mask_rows_follow_the_requests_that_still_sample(backend):
    """A request that drops out between the forward and sampling (it reached max_new_tokens)
    takes its row out of the overlapped mask; the others keep theirs, in order."""
    eng = backend.engine
    words = (eng.config.vocab_size + 31) // 32
    mask = torch.arange(3 * words, dtype=torch.int32).view(3, words)
    fut: Future = Future()
    fut.set_result(([7, 8, 9], mask))
    reqs = [fresh_req(backend, None) for _ in range(2)]
    reqs[0].rid, reqs[1].rid = 7, 9
    rows = eng.outputs._pending_rows(fut, reqs, eng.config.vocab_size)
    assert rows is not None and torch.equal(rows, mask[[0, 2]])
    done: Future = Future()
    done.set_result(([7, 9], mask[:2]))
    same = eng.outputs._pending_rows(done, reqs, eng.config.vocab_size)
    assert same is not None and torch.equal(same, mask[:2])


def test_shutdown_stops_the_mask_worker():
    be = EngineBackend(Engine(device="cpu"))
    run(be, extraction_items(1, seed=2), True, False)
    pool = be.engine.outputs._mask_pool
    assert pool is not None
    workers = list(pool._threads)  # this engine's mask thread(s)
    assert workers and all(t.is_alive() for t in workers)
    be.engine.shutdown()
    for t in workers:
        t.join(timeout=5)
    assert be.engine.outputs._mask_pool is None and not any(t.is_alive() for t in workers)


def test_forced_tokens_keep_one_logprob_and_one_top_list_per_output_token(backend):
    """Jump-forward's forced tokens (before the first step and between steps) get logprob 0.0 and
    top alternatives ``[(token, 0.0)]``: the top lists were shorter than the tokens (19 for 22 on a
    JSON record), so a client zipping them gave later tokens another token's alternatives."""
    eng = backend.engine
    kind, prompt, _ = extraction_items(1, seed=11, kinds=("person",))[0]
    spec = spec_from_json_schema(SCHEMAS[kind], whitespace="")
    params = SamplingParams(max_new_tokens=96, return_logprob=True, top_logprobs_num=3)
    res = eng.submit(prompt, params, matcher=eng.compile_constraint(spec).new_matcher()).result(timeout=120)
    n = len(res.token_ids)
    assert len(res.logprobs) == n and len(res.top_logprobs) == n
    forced = [i for i, lp in enumerate(res.logprobs) if lp == 0.0]
    assert len(forced) >= PERSON_FORCED
    for i, (tok, lp, top) in enumerate(zip(res.token_ids, res.logprobs, res.top_logprobs)):
        if i in forced:
            assert top == [(tok, 0.0)] or top[0] == (tok, 0.0), (i, tok, top)
        else:  # a sampled token: its own alternatives, the best first
            assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] and top[0][1] >= lp - 1e-6


def test_finishing_rebase_that_retokenizes_computed_tokens_drops_their_kv(backend):
    """Jump-forward may re-tokenize output tokens whose KV is computed together with the forced
    text (a non-canonical spelling the model sampled). When that forced text completes the
    constraint, the rebase is committed at once and the KV of the changed tokens given back: the
    commit used to refuse, and the request took one more step that sampled EOS (an EOS at the end
    of the output even with ``ignore_eos``)."""
    eng = backend.engine

    def commit(cache_len: int) -> tuple:
        sched = eng.scheduler
        used = eng.pool.stats()["used"]
        req = Req(rid=-1, prompt_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=8), future=None, decoder=None)  # type: ignore[arg-type]
        req.output_ids = [10, 11, 12]  # KV computed for the prompt and 10, 11; 12 just sampled
        req.kv_slots = sched._alloc(5, None)
        req.cache_len = cache_len  # pretend that much of it is the radix cache's
        req.rebase_to = ([5, 6, 7], [10, 20, 21])  # 11 12 + forced text -> 20 21
        ok = eng.outputs._commit_forced(req)
        got = (ok, list(req.output_ids), req.kv_len, req.rebase_to is None)
        req.cache_len = 0
        sched.release(req, cache_kv=False)
        assert eng.pool.stats()["used"] == used
        return got

    assert eng.call_in_engine_thread(lambda: commit(0)) == (True, [10, 20, 21], 4, True)
    # KV the radix cache holds is not the request's to drop: the rebase waits for a step
    assert eng.call_in_engine_thread(lambda: commit(5)) == (False, [10, 11, 12], 5, False)


@pytest.mark.parametrize("stop", [{"stop_regex": [r"answer"]}, {"stop": ["answer"]}, {"stop_regex": [r"is \d"]}])
def test_a_stop_inside_forced_text_ends_the_output_as_with_jump_forward_off(backend, stop):
    """A stop string or regex match inside the text jump-forward forces (after the check of the
    token before it) ends the output at the next check, cut where it starts: the same text as with
    jump-forward off, where the model writes the forced text token by token."""
    eng = backend.engine
    ids = eng.encode("Q: What is 3 + 4?\nA:")
    spec = spec_from_regex(r" The answer is [0-9]+\.")
    got = {}
    for jf in (True, False):
        saved, eng.jump_forward = eng.jump_forward, jf
        try:
            got[jf] = eng.generate(ids, {"max_new_tokens": 16, "constraint": spec, **stop})
        finally:
            eng.jump_forward = saved
    assert got[True].meta["jump_forward_tokens"] > 0 and got[False].meta["jump_forward_tokens"] == 0
    assert got[True].text == got[False].text
    assert got[True].finish_reason == got[False].finish_reason == "stop"
    assert got[True].matched_stop == got[False].matched_stop == next(iter(stop.values()))[0]
