"""Randomized engine-level stress of the scheduler and the KV bookkeeping, against an oracle.

Each example draws engine settings (KV pool from tiny to roomy, page size 1 / 4 / 16, small prefill
chunks and budgets, few running requests, mixed steps, speculative drafts, jump-forward, run-ahead)
and a workload (shared prefixes, prompts longer than a chunk, near and over the pool's size, greedy
and seeded sampling, stop strings and ids, regex / choices constraints, chains, scores, aborts by
``abort`` / ``future.cancel()`` / closing a stream, submitted at once or from several threads).

The oracle: every request that ends normally gives the tokens the same request gives alone on a
fresh roomy engine (up to the first near-tie of the oracle's top-2 logprobs: float noise, counted),
an aborted one a prefix of them; a request is refused with OutOfKVMemoryError exactly when the
admission rule says it could not fit alone; nothing hangs; afterwards nothing is queued, nothing is
locked, every used slot is cached, and the engine keeps serving.

``LLMIR_STRESS_EXAMPLES=N`` runs N more seeds (``LLMIR_STRESS_FIRST`` the first one);
``LLMIR_STRESS_VERBOSE=1`` prints each example's settings.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from stress_helpers import HANG_S, alone, collect, dump

from llmir_lang.errors import OutOfKVMemoryError
from llmir_lang.executor.constraints import spec_from_choices, spec_from_regex
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.sampling_params import SamplingParams

BASE_SEEDS = list(range(12))  # about 10 s here
FIRST = int(os.environ.get("LLMIR_STRESS_FIRST", "1000"))
EXTRA = list(range(FIRST, FIRST + int(os.environ.get("LLMIR_STRESS_EXAMPLES", "0"))))
VERBOSE = bool(os.environ.get("LLMIR_STRESS_VERBOSE"))
TIE = 1e-4  # top-2 logprobs closer than this: a different token is float noise, not a bug
TOKENS = range(3, 300)  # ids of the tokenizer's ordinary tokens (0..2 are special)
REGEXES = [r"[a-z]{2,8}", r"(yes|no|maybe)", r"ab[0-9]+cd", r"[0-9]{3}-[a-z]{1,4}"]
CHOICES = [["alpha", "beta", "gamma"], ["yes", "no"], ["Paris", "London", "Par"]]

NOISE = {"ties": 0, "compared": 0}  # near-ties met by the oracle comparison (reported at the end)
COVER = {"retractions": 0, "evictions": 0, "oom": 0, "aborted": 0, "examples": 0}


@dataclass
class Job:
    kind: str  # plain | chain | score | big | over
    prompt: Any  # token ids, or text for a chain
    params: SamplingParams | None = None
    steps: list = field(default_factory=list)  # chain steps after the first gen
    conts: list = field(default_factory=list)  # score continuations
    abort: str = ""  # "" | abort | cancel | stream
    delay: float = 0.0
    fut: Any = None
    stream: Any = None
    error: BaseException | None = None
    result: Any = None


@pytest.mark.parametrize("seed", BASE_SEEDS + EXTRA)
def test_random_engine_workload_matches_requests_run_alone(alone_engines, seed):
    folder, oracle = alone_engines
    run_example(folder, oracle, seed)


# ---- drawing ---------------------------------------------------------------------------------
def draw_engine(rng: random.Random) -> dict:
    page = rng.choice([1, 1, 4, 16])
    size = rng.choice(["tiny", "small", "small", "roomy"])
    kv = {"tiny": rng.randint(24, 128), "small": rng.randint(150, 320), "roomy": 3000}[size]
    kv = max(kv, 3 * page)
    return dict(
        enable_prefix_cache=rng.random() < 0.85,
        kv_memory=kv * 512,
        page_size=page,
        chunked_prefill_size=rng.choice([None, 4, 8, 16, 33]),
        max_prefill_tokens=rng.choice([None, 5, 12, 40, 64]),
        max_running_requests=rng.choice([1, 2, 3, 256]),
        max_mixed_extend=rng.choice([0, 8]),
        speculative_draft_tokens=rng.choice([0, 3]),
        jump_forward=rng.random() < 0.5,
        run_ahead=rng.random() < 0.3,
    )


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.choice(TOKENS) for _ in range(n)]


def draw_params(rng: random.Random, allow_constraint: bool = True) -> SamplingParams:
    greedy = rng.random() < 0.7
    kw: dict = dict(
        max_new_tokens=rng.randint(1, rng.choice([8, 24, 48])),
        temperature=0.0 if greedy else 0.8,
        seed=None if greedy else rng.randrange(1000),
        ignore_eos=rng.random() < 0.5,
    )
    r = rng.random()
    if r < 0.15:
        kw["stop"] = rng.choice([["e"], ["ab", "x"], ["\n"], ["s"]])
    elif r < 0.3:
        kw["stop_token_ids"] = _ids(rng, rng.randint(1, 30))
    if rng.random() < 0.1:
        kw["min_new_tokens"] = rng.randint(0, kw["max_new_tokens"])
    if allow_constraint and rng.random() < 0.25:
        if rng.random() < 0.6:
            kw["constraint"] = spec_from_regex(rng.choice(REGEXES))
        else:
            kw["constraint"] = spec_from_choices(rng.choice(CHOICES))
        kw["max_new_tokens"] = rng.randint(4, 16)
        kw["min_new_tokens"] = 0
    return SamplingParams(**kw)


def draw_jobs(rng: random.Random, eng: Engine) -> list[Job]:
    cap, page = eng.pool.capacity, eng.pool.page_size
    prefixes = [_ids(rng, rng.randint(0, 60)) for _ in range(3)]
    jobs: list[Job] = []
    for _ in range(rng.randint(4, rng.choice([14, 24]))):
        kind = rng.choices(["plain", "chain", "score", "big", "over"], [10, 3, 1, 1.5, 1])[0]
        base = rng.choice(prefixes) + _ids(rng, rng.randint(1, 40))
        if kind == "plain":
            job = Job("plain", base, draw_params(rng))
            job.abort = rng.choices(["", "abort", "cancel", "stream"], [12, 1, 1, 1])[0]
        elif kind == "chain":
            text = eng.tokenizer.decode(base) or "x"
            steps: list = []
            for _ in range(rng.randint(1, 2)):
                steps.append(("text", rng.choice([" name: ", ", ", "\n", " and "])))
                steps.append(("gen", draw_params(rng), None))
            job = Job("chain", text, draw_params(rng), steps=steps)
        elif kind == "score":
            conts = [_ids(rng, rng.randint(1, 4)) for _ in range(rng.randint(1, 3))]
            job = Job("score", base, conts=conts)
        else:  # a prompt whose need is at the pool's size (big) or just over it (over)
            m = rng.randint(1, 8)
            need = cap - rng.randint(0, 3) if kind == "big" else cap + rng.randint(1, 4)
            n = need - m - page
            if n < 1 or n >= eng.config.context_len - m:
                continue
            prompt = (rng.choice(prefixes) + _ids(rng, n))[:n]
            job = Job(kind, prompt, SamplingParams(max_new_tokens=m, ignore_eos=rng.random() < 0.5))
        job.delay = rng.random() * 0.02
        jobs.append(job)
    return jobs


# ---- running ---------------------------------------------------------------------------------
def submit(eng: Engine, job: Job, rng: random.Random) -> None:
    try:
        if job.kind == "score":
            job.result = eng.score(job.prompt, job.conts)
            return
        if job.kind == "chain":
            job.fut = eng.submit_chain(job.prompt, [("gen", job.params, None), *job.steps])
            return
        if job.abort == "stream":
            job.stream = eng.generate(job.prompt, job.params, stream=True)
            job.fut = job.stream._fut
            for i, _ in enumerate(job.stream):
                if i >= rng.randint(0, 3):
                    break
            job.stream.close()
            return
        job.fut = eng.submit(job.prompt, job.params)
        if job.abort:
            time.sleep(rng.random() * 0.01)
            if job.abort == "cancel":
                job.fut.cancel()
            else:
                eng.abort(job.fut.rid)
    except BaseException as e:  # noqa: BLE001 - OutOfKVMemoryError is the expected one
        job.error = e


def run_jobs(eng: Engine, jobs: list[Job], rng: random.Random) -> None:
    mode = rng.choice(["once", "threads"])
    if mode == "once":
        for job in jobs:
            submit(eng, job, random.Random(rng.random()))
    else:
        parts: list[list[Job]] = [[] for _ in range(rng.randint(2, 3))]
        for job in jobs:
            rng.choice(parts).append(job)

        def worker(part: list[Job], r: random.Random) -> None:
            for job in part:
                time.sleep(job.delay)
                submit(eng, job, r)

        threads = [threading.Thread(target=worker, args=(p, random.Random(rng.random()))) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HANG_S)
            assert not t.is_alive(), f"a submitting thread hung\n{dump(eng)}"
    collect(eng, jobs, lambda job: f"request {job.fut.rid} ({job.kind})")


# ---- oracle ----------------------------------------------------------------------------------
def agree(got: list[int], want: Any, prefix_ok: bool, what: str) -> bool:
    """``got`` equals ``want.token_ids`` (a prefix of it when ``prefix_ok``) up to the first
    near-tie; returns False when a near-tie cut the comparison (what follows can not be compared)."""
    ref = want.token_ids
    tops = want.top_logprobs
    NOISE["compared"] += 1
    for i, (a, b) in enumerate(zip(got, ref)):
        if a != b:
            if tops and i < len(tops) and len(tops[i]) > 1 and tops[i][0][1] - tops[i][1][1] < TIE:
                NOISE["ties"] += 1
                return False
            raise AssertionError(f"{what}: token {i} is {a}, alone {b}\n got {got}\nwant {ref}")
    if len(got) > len(ref) or (not prefix_ok and len(got) != len(ref)):
        n = min(len(got), len(ref))
        if tops and n < len(tops) and len(tops[n]) > 1 and tops[n][0][1] - tops[n][1][1] < TIE:
            NOISE["ties"] += 1
            return False
        raise AssertionError(f"{what}: {len(got)} tokens, alone {len(ref)}\n got {got}\nwant {ref}")
    return True


def check_job(eng: Engine, oracle: Engine, job: Job) -> None:
    cap, page, ctx = eng.pool.capacity, eng.pool.page_size, eng.config.context_len
    what = f"{job.kind} {job.prompt!r:.60} {job.params}"
    if job.kind == "score":  # prefill-only requests of the prompt and each longer continuation
        too_big = len(job.prompt) + max(len(c) if len(c) > 1 else 0 for c in job.conts) + page > cap
    else:
        n = len(job.prompt) if job.kind != "chain" else len(eng.encode(job.prompt))
        too_big = n + min(job.params.max_new_tokens, ctx - n) + page > cap
    if too_big:
        assert isinstance(job.error, OutOfKVMemoryError), (
            f"{what}: expected OutOfKVMemoryError, got {job.error!r}"
        )
        return
    if job.error is not None:
        raise AssertionError(f"{what}: failed with {job.error!r}") from job.error
    if job.result is None:
        assert job.abort == "cancel", what
        return
    want = alone(oracle, job)
    if job.kind == "score":
        for g, w in zip(job.result, want):
            assert g == pytest.approx(w, abs=1e-3), (what, job.result, want)
        return
    res = job.result
    what += f" -> {res.finish_reason} {res.error or ''} {res.meta}"
    if job.kind == "chain":
        got_steps = res.meta["steps"]
        want_steps = want.meta["steps"]
        for k, (g, w) in enumerate(zip(got_steps, want_steps)):
            if g.finish_reason == "error" and "OutOfKVMemoryError" in (g.error or ""):
                # a later generation outgrew the pool: alone on a pool of that size, it does too
                # (the roomy oracle's is compared up to here)
                same = Engine(eng.model_path, device="cpu", **eng._stress_settings)
                try:
                    steps = [("gen", job.params, None), *job.steps]
                    alone_small = same.submit_chain(job.prompt, steps).result(timeout=HANG_S)
                finally:
                    same.shutdown()
                a = alone_small.meta["steps"]
                assert len(a) == k + 1 and a[k].finish_reason == "error", (what, a)
                assert "OutOfKVMemoryError" in (a[k].error or ""), (what, a[k])
                return
            assert g.finish_reason in ("stop", "length", "constraint_error"), (what, k, g)
            if not agree(g.token_ids, w, False, f"{what} step {k}"):
                return
            assert g.finish_reason == w.finish_reason, (what, k, g, w)
        assert len(got_steps) == len(want_steps), (what, got_steps, want_steps)
        return
    if res.finish_reason == "abort":
        assert job.abort, (what, res)
        if job.params.constraint is not None and eng.jump_forward:
            # jump-forward re-tokenizes the output's end with the forced text ("Pa" "r" then
            # "Pa" "ris"): an aborted output is a prefix of the alone one as text only
            text = eng.tokenizer.decode(res.token_ids)
            assert eng.tokenizer.decode(want.token_ids).startswith(text), (what, res, want)
            return
        agree(res.token_ids, want, True, what)
        return
    assert res.finish_reason in ("stop", "length", "constraint_error"), (what, res)
    if agree(res.token_ids, want, False, what):
        assert res.finish_reason == want.finish_reason, (what, res, want)


def settle(eng: Engine) -> None:
    """Wait for queued aborts of finished requests to run; then nothing may be left."""
    deadline = time.time() + 10
    while eng.call_in_engine_thread(eng.scheduler.has_work):
        assert time.time() < deadline, f"requests left after every future resolved\n{dump(eng)}"
        time.sleep(0.01)


def run_example(folder: str, oracle, seed: int) -> None:
    rng = random.Random(seed)
    settings = draw_engine(rng)
    eng = Engine(folder, device="cpu", **settings)
    eng._stress_settings = settings  # type: ignore[attr-defined]
    try:
        jobs = draw_jobs(rng, eng)
        if VERBOSE:
            print(seed, settings, [(j.kind, j.abort) for j in jobs], flush=True)
        run_jobs(eng, jobs, rng)
        settle(eng)
        stats = eng.stats()
        COVER["examples"] += 1
        COVER["retractions"] += stats["retractions"]
        COVER["evictions"] += stats["cache"]["evictions"]
        COVER["oom"] += sum(isinstance(j.error, OutOfKVMemoryError) for j in jobs)
        COVER["aborted"] += sum(getattr(j.result, "finish_reason", "") == "abort" for j in jobs)
        assert stats["cache"]["protected_tokens"] == 0, dump(eng)
        assert stats["pool"]["used"] == stats["cache"]["cached_tokens"], dump(eng)
        ref = oracle(settings["jump_forward"])
        for job in jobs:
            check_job(eng, ref, job)
        # the engine keeps serving
        last = Job("plain", _ids(rng, 12), SamplingParams(max_new_tokens=6))
        last.result = eng.generate(last.prompt, last.params)
        check_job(eng, ref, last)
    finally:
        eng.shutdown()


def teardown_module(module) -> None:
    if VERBOSE:
        print(f"\nstress coverage: {COVER}")
    if NOISE["ties"]:
        print(f"\nstress: {NOISE['ties']} near-ties in {NOISE['compared']} comparisons")
