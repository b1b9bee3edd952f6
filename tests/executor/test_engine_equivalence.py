"""The engine against Hugging Face transformers on the same random weights (fp32, CPU)."""

from __future__ import annotations

import random

import pytest
import torch
from hf_fixtures import ARCHS, hf_greedy

from llmir_lang.executor.attention import ForwardBatch, ForwardMode
from llmir_lang.executor.engine import Engine

GREEDY = {"max_new_tokens": 32, "ignore_eos": True, "return_logprob": True}


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 300) for _ in range(n)]


def _engine_logits(eng: Engine, ids: list[int]) -> torch.Tensor:
    """Prefill logits at every position, computed on the engine thread through the paged pool."""

    def run():
        slots = eng.pool.alloc(len(ids))
        try:
            n = len(ids)
            fb = ForwardBatch(
                mode=ForwardMode.EXTEND,
                input_ids=torch.tensor(ids),
                positions=torch.arange(n),
                out_cache_loc=slots,
                qo_indptr=torch.tensor([0, n]),
                kv_indptr=torch.tensor([0, n]),
                kv_indices=slots,
                batch_size=1,
            )
            return eng.model(fb, eng.backend)
        finally:
            eng.pool.free(slots)

    return eng.call_in_engine_thread(run)


@pytest.mark.parametrize("arch", ARCHS)
def test_single_prompt_logits_and_greedy(arch, checkpoints):
    folder, hf = checkpoints(arch)
    ids = _prompt(random.Random(1), 23)
    with Engine(str(folder), device="cpu", kv_memory="8MB") as eng:
        ours = _engine_logits(eng, ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        assert (ours - ref).abs().max().item() <= 1e-4
        r = eng.generate(ids, GREEDY)
    tokens, lps = hf_greedy(hf, ids, 32)
    assert r.token_ids == tokens
    assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) <= 1e-4
    assert r.finish_reason == "length" and r.completion_tokens == 32


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_eight_prompts(arch, checkpoints):
    folder, hf = checkpoints(arch)
    rng = random.Random(2)
    prompts = [_prompt(rng, n) for n in (1, 3, 7, 12, 20, 31, 45, 64)]
    with Engine(str(folder), device="cpu", kv_memory="8MB") as eng:
        results = eng.generate(prompts, {**GREEDY, "max_new_tokens": 16})
    for p, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(hf, p, 16)[0]


def test_shared_prefix_hits_cache(checkpoints):
    folder, hf = checkpoints("llama")
    rng = random.Random(3)
    prefix = _prompt(rng, 96)
    a, b = prefix + _prompt(rng, 5), prefix + _prompt(rng, 7)
    with Engine(str(folder), device="cpu", kv_memory="8MB") as eng:
        ra = eng.generate(a, GREEDY)
        rb = eng.generate(b, GREEDY)
        hit = eng.stats()["cache"]
    assert ra.cached_tokens == 0
    assert rb.cached_tokens >= 96
    assert hit["hit_tokens"] >= 96
    assert ra.token_ids == hf_greedy(hf, a, 32)[0]
    assert rb.token_ids == hf_greedy(hf, b, 32)[0]


def test_chunked_prefill_matches(checkpoints):
    folder, hf = checkpoints("qwen3")
    ids = _prompt(random.Random(4), 70)
    with Engine(
        str(folder),
        device="cpu",
        kv_memory="8MB",
        chunked_prefill_size=16,
        max_prefill_tokens=16,
        speculative_draft_tokens=0,  # the call count below assumes one token per decode step
    ) as eng:
        r = eng.generate(ids, GREEDY)
        calls = eng.stats()["forward_calls"]
    assert r.token_ids == hf_greedy(hf, ids, 32)[0]
    assert calls >= 5 + 31  # 70 prompt tokens in 16-token chunks, then 31 decode steps


@pytest.mark.parametrize("page_size", [1, 4])
def test_tiny_pool_forces_retraction(checkpoints, page_size):
    folder, hf = checkpoints("llama")
    rng = random.Random(5)
    prompts = [_prompt(rng, 20 + i) for i in range(6)]
    # 2 layers x 2 kv heads x 16 dims x (K and V) x 4 bytes = 512 bytes a token: room for 160 tokens,
    # while the six requests need about 6 x 55 tokens at the end
    with Engine(str(folder), device="cpu", kv_memory=160 * 512, page_size=page_size) as eng:
        results = eng.generate(prompts, GREEDY)
        stats = eng.stats()
    assert stats["retractions"] > 0
    for p, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(hf, p, 32)[0]
    # idle: every used slot belongs to the radix cache, nothing is locked, nothing leaked
    assert stats["pool"]["used"] == stats["cache"]["cached_tokens"]
    assert stats["cache"]["protected_tokens"] == 0
