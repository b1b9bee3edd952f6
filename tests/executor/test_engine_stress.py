"""Random mixed workloads: every request resolves, nothing leaks, nothing deadlocks."""

from __future__ import annotations

import os
import random
import time

import pytest

from llmir_lang.executor.engine import Engine
from llmir_lang.executor.sampling_params import SamplingParams

EXTRA = [
    (p, k, s)
    for s in range(int(os.environ.get("LLMIR_STRESS_SEEDS", "0")))
    for p, k in ((1, 200), (4, 240), (2, 1000))
]


def _constraint_matcher(eng: Engine, compiler_box: list, pattern: str):
    from llmir_lang.executor.constraints import ConstraintCompiler, TokenizerInfo, spec_from_regex

    if not compiler_box:
        info = TokenizerInfo.from_hf(eng.tokenizer.hf, vocab_size=eng.config.vocab_size, eos_token_ids=[0])
        compiler_box.append(ConstraintCompiler(info, outlines_isolation="inline"))
    return compiler_box[0].compile(spec_from_regex(pattern)).new_matcher()


@pytest.mark.parametrize("page_size, kv_tokens, seed", [(1, 220, 0), (4, 260, 1), (1, 4000, 2)] + EXTRA)
def test_random_workload_resolves_and_leaks_nothing(checkpoints, page_size, kv_tokens, seed):
    folder, _ = checkpoints("llama")
    rng = random.Random(seed)
    compiler: list = []
    with Engine(str(folder), device="cpu", kv_memory=kv_tokens * 512, page_size=page_size) as eng:
        futures = []
        prefixes = [[rng.randrange(1, 300) for _ in range(rng.randrange(5, 40))] for _ in range(3)]
        for i in range(40):
            kind = rng.choice(["plain", "plain", "chain", "constrained", "abort"])
            prompt = rng.choice(prefixes) + [rng.randrange(1, 300) for _ in range(rng.randrange(1, 12))]
            params = SamplingParams(
                max_new_tokens=rng.randrange(1, 24),
                temperature=rng.choice([0.0, 0.8]),
                seed=i,
                stop=rng.choice([[], ["e"], ["ab", "x"]]),
                ignore_eos=rng.random() < 0.5,
            )
            if kind == "chain":
                text = eng.tokenizer.decode(prompt)
                steps = [
                    ("gen", params, None),
                    ("text", rng.choice([" name: ", ", ", "\n"])),
                    ("gen", SamplingParams(max_new_tokens=rng.randrange(1, 8), ignore_eos=True), None),
                ]
                futures.append(("chain", eng.submit_chain(text or "x", steps)))
            elif kind == "constrained":
                m = _constraint_matcher(
                    eng, compiler, rng.choice([r"[a-z]{2,8}", r"(yes|no|maybe)", r"ab[0-9]+cd"])
                )
                futures.append(("constrained", eng.submit(prompt, params, matcher=m)))
            else:
                fut = eng.submit(prompt, params)
                futures.append((kind, fut))
                if kind == "abort" and rng.random() < 0.7:
                    time.sleep(rng.random() * 0.01)
                    eng.abort(fut.rid)
        for kind, fut in futures:
            res = fut.result(timeout=120)
            assert res.finish_reason in ("stop", "length", "abort", "constraint_error"), (kind, res)
            if kind == "constrained":
                assert res.finish_reason != "constraint_error", res.error
        stats = eng.stats()
        assert stats["cache"]["protected_tokens"] == 0
        assert stats["pool"]["used"] == stats["cache"]["cached_tokens"]
