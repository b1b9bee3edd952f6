"""Prompt-lookup speculative decoding: the draft lookup, and the engine's outputs with it on/off."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from hf_fixtures import hf_greedy

from llmir_lang import errors
from llmir_lang.executor.attention import ForwardMode
from llmir_lang.executor.backend import ChainRequest, EngineBackend, GenStep
from llmir_lang.executor.constraints import spec_from_json_schema
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.executor.speculate import SpecConfig, lookup_draft, propose
from llmir_lang.models.tiny_tasks import SCHEMAS, extraction_items


# ---- the lookup ------------------------------------------------------------------------------
def test_lookup_takes_the_latest_occurrence_of_the_longest_suffix():
    # the 2-gram (1, 2) occurs at 0 and at 4; the latest one is followed by 8, 9
    assert lookup_draft([1, 2, 3, 4, 1, 2, 8, 9, 5, 1, 2], 3) == [8, 9, 5]
    # a 3-gram match wins over a later 1-gram one
    assert lookup_draft([7, 8, 9, 1, 5, 9, 2, 7, 8, 9], 2) == [1, 5]
    assert lookup_draft([1, 2, 3, 4, 5, 1, 2], 10) == [3, 4, 5, 1, 2]  # up to the end, not past it
    assert lookup_draft([1, 2, 3, 4, 5, 1, 2], 2) == [3, 4]


def test_lookup_refuses_what_predicts_poorly():
    assert lookup_draft([1, 2, 3, 4], 4) == []  # nothing repeats
    assert lookup_draft([2, 3, 4, 2, 5, 9, 2], 3) == []  # a lone token seen twice before: ambiguous
    assert lookup_draft([2, 3, 4, 5, 9, 2], 3) == [3, 4, 5]  # seen once: fine
    assert lookup_draft([5], 3) == [] and lookup_draft([], 3) == [] and lookup_draft([1, 1], 0) == []


def test_lookup_agree_drafts_what_every_occurrence_of_a_lone_token_agrees_on():
    # 5 occurs three times, followed by 6 7 8 / 6 7 9 / 6 7 8: they agree on 6 7
    ids = [5, 6, 7, 8, 0, 5, 6, 7, 9, 1, 5, 6, 7, 8, 2, 5]
    assert lookup_draft(ids, 3) == []  # ambiguous without agree
    assert lookup_draft(ids, 3, agree=True) == [6, 7]
    assert lookup_draft([5, 6, 0, 5, 7, 1, 5], 2, agree=True) == []  # the next token differs
    # an occurrence near the end counts with what follows it before the last token
    assert lookup_draft([5, 6, 7, 2, 5, 9, 5], 2, agree=True) == []
    assert lookup_draft([5, 6, 7, 2, 5, 6, 5], 2, agree=True) == [6]
    assert lookup_draft([5, 6, 7, 2, 5, 6, 7, 3, 5], 2, agree=True) == [6, 7]


def test_lookup_matches_whole_tokens_only():
    # 256 = bytes 00 01 00 00 and 1 = 01 00 00 00: the byte pattern of [1] sits inside 256's bytes
    # one byte in, which must not count as an occurrence of the token 1
    assert lookup_draft([256, 0, 7, 1], 2) == []
    assert lookup_draft([256, 1, 0, 0, 1, 256], 3) == [1, 0, 0]
    # the search window bounds how far back it looks
    ids = [9, 4, 4] + [0, 1, 2, 3, 5, 6] * 3 + [9]
    assert lookup_draft(ids, 2) == [4, 4]
    assert lookup_draft(ids, 2, window=10) == []


def test_keys_after_forced_text_come_from_the_tokens_sampled_since():
    # prompt: ... 40 41 ... 40 (twice) ... 55 56 57 58; output: syntax 90 91 (earlier field), a
    # value, then forced syntax 90 91 and one sampled token
    prompt = [1, 40, 41, 2, 3, 55, 56, 57, 58, 4, 40, 7]
    req = SimpleNamespace(
        finished=False, rebase_to=None, params=SamplingParams(max_new_tokens=50), matcher=None,
        prompt_ids=prompt, seq_len=0, forced_end=-1, output_ids=[],
    )  # fmt: skip
    proc = SimpleNamespace(engine=SimpleNamespace(config=SimpleNamespace(context_len=1000)))
    cfg = SpecConfig(draft_tokens=3)

    def propose_for(output, forced_end, after_forced=True):
        req.output_ids, req.forced_end = output, forced_end
        req.fill_ids = prompt + output
        req.seq_len = len(req.fill_ids)
        cfg.after_forced = after_forced
        return propose(proc, req, cfg)

    # 55 occurs once in the prompt: right after forced text the lone token is the key
    assert propose_for([90, 91, 33, 90, 91, 55], 5) == [56, 57, 58]
    # without the rule the 2-gram (91, 55) and the lone 55 are not looked up (min_ngram 2)
    assert propose_for([90, 91, 33, 90, 91, 55], 5, after_forced=False) == []
    # a key never reaches into the forced text or the output before it: (91, 33) matched the
    # earlier field, and the rule drafts nothing here (91 is not in the prompt)
    assert propose_for([90, 91, 33, 90, 91], 4, after_forced=False) == [33, 90, 91]
    assert propose_for([90, 91, 33, 90, 91], 4) == []
    # a lone token seen twice in the prompt drafts what both occurrences agree on (41 2 / 7: none
    # here), or is refused without agree; two tokens sampled since: 2-gram
    assert propose_for([90, 91, 40], 2) == []
    cfg.agree = False
    assert propose_for([90, 91, 40], 2) == []
    cfg.agree = True
    prompt[11] = 41  # now both occurrences of 40 go on with 41: an agreed draft, shorter than room
    assert propose_for([90, 91, 40], 2) == [41]
    prompt[11] = 7
    assert propose_for([90, 91, 3, 55], 2) == [56, 57, 58]
    # past max_ngram tokens since the forced text, the ordinary lookup applies
    assert propose_for([90, 91, 2, 3, 55, 56], 2) == propose_for([90, 91, 2, 3, 55, 56], -1) == [57, 58, 4]


# ---- the engine ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """The bundled model, whose extraction task copies names from the prompt."""
    eng = Engine(device="cpu", kv_memory="16MB")
    yield eng
    eng.shutdown()


def _steps(eng: Engine) -> list[ForwardMode | str]:
    """Record the kind of every step the engine runs from now on (undo with ``del eng.runner.run``)."""
    orig = eng.runner.run
    seen: list = []

    def run(sb):
        seen.append("spec" if sb.draft_lens else sb.mode)
        return orig(sb)

    eng.runner.run = run  # type: ignore[method-assign]
    return seen


def test_extraction_greedy_output_is_the_same_with_fewer_forwards(tiny):
    check_spec_equals_plain(tiny, atol=1e-4)


def check_spec_equals_plain(tiny: Engine, atol: float) -> None:
    """Greedy extraction one request at a time with drafts of 6 and with speculation off: the
    same tokens and text, logprobs within ``atol``, one forward fewer per kept draft token, and the
    KV of rejected drafts back in the pool. Leaves ``speculative_draft_tokens`` at 6."""
    items = extraction_items(6, seed=31)
    params = {"max_new_tokens": 64, "stop": ["\n"], "return_logprob": True}
    out, calls = {}, {}
    # run-ahead (the CUDA default) computes one step more for a request that stops on a token;
    # the forward counts below compare speculation against plain steps alone
    ahead = tiny.run_ahead
    tiny.call_in_engine_thread(lambda: setattr(tiny, "run_ahead", False))
    try:
        for k in (0, 6):
            tiny.speculative_draft_tokens = k
            tiny.flush_cache()
            before = tiny.stats()["forward_calls"]
            out[k] = [tiny.generate(p, params) for _, p, _ in items]  # one at a time: batch 1
            calls[k] = tiny.stats()["forward_calls"] - before
    finally:
        tiny.speculative_draft_tokens = 6
        tiny.call_in_engine_thread(lambda: setattr(tiny, "run_ahead", ahead))
    for a, b in zip(out[6], out[0]):
        assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
        assert len(a.logprobs) == len(a.token_ids)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=atol)
        assert b.meta["spec_draft_tokens"] == 0
    accepted = sum(r.meta["spec_accepted_tokens"] for r in out[6])
    assert accepted > 0 and all(r.meta["spec_accepted_tokens"] <= r.meta["spec_draft_tokens"] for r in out[6])
    assert calls[6] == calls[0] - accepted  # every kept draft token is one decode step saved
    # the KV of rejected draft tokens went back: after flushing the cache the pool is whole
    tiny.flush_cache()
    assert tiny.pool.num_free == tiny.pool.capacity


def test_constrained_json_with_jump_forward_keeps_its_output(tiny):
    backend = EngineBackend(tiny)
    items = extraction_items(4, seed=32, kinds=("person", "event"))

    def req(kind: str, prompt: str) -> ChainRequest:
        spec = spec_from_json_schema(SCHEMAS[kind], whitespace="")
        return ChainRequest(prompt, [GenStep("x", SamplingParams(max_new_tokens=96), spec)])

    res = {}
    try:
        for k, after_forced in ((0, True), (6, True), (6, False)):
            tiny.speculative_draft_tokens = k
            tiny.outputs.spec.after_forced = after_forced
            tiny.flush_cache()
            res[k, after_forced] = [backend.run([req(kind, p)])[0].steps[0] for kind, p, _ in items]
    finally:
        tiny.speculative_draft_tokens = 6
        tiny.outputs.spec.after_forced = True
    for a, b, c, (_, _, gold) in zip(res[6, True], res[0, True], res[6, False], items):
        assert a.text == b.text == c.text and a.token_ids == b.token_ids == c.token_ids
        assert json.loads(a.text).keys() == gold.keys()
    kept = {key: sum(s.meta["spec_accepted_tokens"] for s in r) for key, r in res.items()}
    # keys from the value's own first tokens keep more draft tokens than keys through the syntax
    assert kept[6, True] > kept[6, False] > 0


@pytest.fixture(scope="module")
def rand(checkpoints):
    folder, hf = checkpoints("llama")
    eng = Engine(str(folder), device="cpu", kv_memory="8MB", page_size=4, speculative_draft_tokens=5)
    yield eng, hf
    eng.shutdown()


# a prompt that repeats itself, so a random-weight model's continuation often copies it
LOOP = [5, 17, 42, 99, 3, 7, 250, 11] * 4


def test_random_model_matches_transformers_greedy_with_paged_kv(rand):
    eng, hf = rand
    seen = _steps(eng)
    try:
        r = eng.generate(LOOP, {"max_new_tokens": 24, "ignore_eos": True})
    finally:
        del eng.runner.run
    assert r.token_ids == hf_greedy(hf, LOOP, 24)[0]
    assert len(r.token_ids) == 24 and r.finish_reason == "length"
    assert "spec" in seen and r.meta["spec_accepted_tokens"] > 0


@pytest.mark.parametrize(
    "params",
    [
        {"max_new_tokens": 7, "ignore_eos": True},  # max_new_tokens cuts a draft short
        {"max_new_tokens": 20, "repetition_penalty": 1.3, "frequency_penalty": 0.5},
        {"max_new_tokens": 20, "min_new_tokens": 12},
        {"max_new_tokens": 20, "return_logprob": True, "top_logprobs_num": 3},
    ],
    ids=["max-tokens", "penalties", "min-tokens", "logprobs"],
)
def test_greedy_rules_hold_per_position(rand, params):
    """Penalties, min_new_tokens and logprobs apply to each verified position as they would to the
    decode step at that position."""
    eng, _ = rand
    out = {}
    try:
        for k in (0, 5):
            eng.speculative_draft_tokens = k
            eng.flush_cache()
            out[k] = eng.generate(LOOP, dict(params))
    finally:
        eng.speculative_draft_tokens = 5
    a, b = out[5], out[0]
    assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    assert len(a.token_ids) <= params["max_new_tokens"]
    if params.get("return_logprob"):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-4)
        assert [[t for t, _ in row] for row in a.top_logprobs] == [
            [t for t, _ in row] for row in b.top_logprobs
        ]


def test_sampling_with_a_seed_is_reproducible_and_stays_in_the_vocabulary(rand):
    eng, _ = rand
    params = {"max_new_tokens": 16, "temperature": 0.8, "top_k": 20, "seed": 7, "ignore_eos": True}
    a = eng.generate(LOOP, dict(params))
    b = eng.generate(LOOP, dict(params))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 16
    assert all(0 <= t < eng.config.vocab_size for t in a.token_ids)


def test_no_drafts_past_the_batch_limit_and_a_batch_keeps_its_outputs(rand):
    eng, _ = rand
    prompts = [LOOP[i:] + LOOP[:i] for i in range(6)]
    params = {"max_new_tokens": 12, "ignore_eos": True}
    seen = _steps(eng)
    try:
        eng.speculative_draft_tokens = 0
        ref = eng.generate(prompts, params)
        eng.speculative_draft_tokens = 5
        seen.clear()
        res = eng.generate(prompts, params)  # 6 requests > speculative_max_batch (4)
    finally:
        del eng.runner.run
    assert [r.token_ids for r in res] == [r.token_ids for r in ref]
    # drafts appear only once the batch has shrunk to the limit (requests finish together here)
    assert "spec" not in seen
    assert all(r.meta["spec_draft_tokens"] == 0 for r in res)


def test_bad_options_are_refused(rand):
    eng, _ = rand
    with pytest.raises(errors.InvalidRequestError, match="speculative_draft_tokens"):
        eng.speculative_draft_tokens = -1
    with pytest.raises(errors.InvalidRequestError, match="speculative_max_batch"):
        Engine(device="cpu", kv_memory="4MB", speculative_max_batch=-2)


def test_short_extends_as_decode_rows_keep_the_tokens(tiny):
    """Jump-forward extends and speculative steps run as decode rows (the CUDA default, where the
    rows go into the decode graphs; here the eager decode path, padded to graph buckets): the same
    tokens as the extend path."""
    backend = EngineBackend(tiny)
    items = extraction_items(4, seed=33)
    runner = tiny.runner
    res = {}
    try:
        for rows in (0, 8):
            runner.max_row_extend, runner.pad_to_bucket = rows, bool(rows)
            tiny.flush_cache()
            before = runner.num_row_extends
            reqs = [
                ChainRequest(
                    p,
                    [
                        GenStep(
                            "x",
                            SamplingParams(max_new_tokens=96),
                            spec_from_json_schema(SCHEMAS[k], whitespace=""),
                        )
                    ],
                )
                for k, p, _ in items
            ]
            res[rows] = [s.steps[0] for s in backend.run(reqs)]  # a batch: mixed steps too
            res[rows] += [backend.run([r])[0].steps[0] for r in reqs]  # one at a time: drafts
            if rows:
                assert runner.num_row_extends > before
    finally:
        runner.max_row_extend, runner.pad_to_bucket = 0, False
    assert [s.token_ids for s in res[8]] == [s.token_ids for s in res[0]]
    assert sum(s.meta["spec_accepted_tokens"] for s in res[8]) > 0


def test_min_new_tokens_bans_a_stop_token_at_every_verified_position(rand):
    """A stop token the model would pick early is banned at each draft position until
    ``min_new_tokens`` exist, as it would be at each decode step."""
    eng, _ = rand
    try:
        eng.speculative_draft_tokens = 0
        free = eng.generate(LOOP, {"max_new_tokens": 16, "ignore_eos": True})
        stop = free.token_ids[2]
        params = {"max_new_tokens": 16, "ignore_eos": True, "stop_token_ids": [stop], "min_new_tokens": 10}
        ref = eng.generate(LOOP, dict(params))
        eng.speculative_draft_tokens = 5
        eng.flush_cache()
        got = eng.generate(LOOP, dict(params))
    finally:
        eng.speculative_draft_tokens = 5
    assert got.token_ids == ref.token_ids
    assert stop not in got.token_ids[:9]
    assert got.meta["spec_draft_tokens"] > 0  # the rule was applied at draft positions


def test_a_seed_gives_the_same_tokens_alone_and_in_a_batch_of_16(checkpoints):
    """Drafts are verified only while few requests decode, and a verify step sampled every draft
    position from the request's stream, rejected ones included: the same seed gave other text alone
    (speculated) than in a batch of 16 (not). Seeded noise keyed by output position fixes that."""
    folder, _ = checkpoints("llama")
    with Engine(str(folder), device="cpu", kv_memory="8MB") as eng:  # the CPU default drafts
        assert eng.speculative_draft_tokens > 0
        mates = [LOOP[i:] + LOOP[:i] for i in range(1, 16)]
        mate_params = [{"max_new_tokens": 24, "temperature": 1.0, "ignore_eos": True}] * 15
        drafted = accepted = 0
        for seed in (5, 99, 1234):
            # a low temperature, so that the random model copies its looping prompt and drafts
            params = {"max_new_tokens": 24, "temperature": 0.2, "seed": seed, "ignore_eos": True}
            eng.speculative_draft_tokens = 3
            alone = eng.generate(LOOP, dict(params))
            drafted += alone.meta["spec_draft_tokens"]
            accepted += alone.meta["spec_accepted_tokens"]
            batch = eng.generate([LOOP] + mates, [dict(params)] + mate_params)
            assert batch[0].meta["spec_draft_tokens"] == 0  # 16 decode: no drafts
            assert batch[0].token_ids == alone.token_ids
            eng.speculative_draft_tokens = 0
            assert eng.generate(LOOP, dict(params)).token_ids == alone.token_ids
        assert drafted > accepted > 0  # rejected draft positions and kept ones both occurred
