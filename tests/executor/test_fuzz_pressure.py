"""One engine, a deliberately tiny KV pool, many concurrent requests: a seeded differential test.

Each example draws a workload on one engine whose pool holds a few requests at most (so requests
queue, the radix cache evicts and running requests are retracted): prompts from a few shared prefix
families, greedy and seeded sampling, random ``max_new_tokens``, stop strings, stop token ids,
``min_new_tokens``, ``ignore_eos``, regex / choices constraints, ``score_async`` calls, requests too
big for the pool, and aborts at chosen moments. Everything happens on the engine thread at chosen
loop turns (a hook around ``Engine._step`` submits and aborts; stream callbacks abort other
requests or their own), so an example runs the same way every time: no sleeps, no timing.

Abort moments: ``inbox`` (right after submission, before the engine read it), ``turn`` (between
steps, wherever the request is then: waiting, part-way through a chunked prefill, running),
``cancel`` (``future.cancel()``), ``self`` (its own stream callback, after k tokens) and ``peer``
(another request's stream callback: mid-step, the request possibly in the same batch).

Oracle: every request that is not aborted gives the greedy tokens (or the seeded sample) it gives
alone on a fresh engine with a roomy pool; an aborted one ends with finish_reason "abort" (a
cancelled future with CancelledError) and a prefix of those tokens. Invariants: nothing hangs,
every error is typed (``llmir_lang.errors``), each stream ends with exactly one final chunk, and
afterwards nothing is queued or locked, every used slot is cached, and a flush frees the pool.
"""

from __future__ import annotations

import random
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest
from stress_helpers import HANG_S, alone, collect, dump

from llmir_lang.errors import LLMIRError, OutOfKVMemoryError
from llmir_lang.executor.attention import ForwardMode
from llmir_lang.executor.constraints import spec_from_choices, spec_from_regex
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.request import StreamChunk
from llmir_lang.executor.sampling_params import SamplingParams

TIE = 1e-4  # top-2 logprobs closer than this: a different greedy token is float noise
TOKENS = range(3, 300)  # the test tokenizer's ordinary ids (0..2 are special)
REGEXES = [r"[a-z]{2,6}", r"(yes|no|maybe)", r"ab[0-9]+cd"]
CHOICES = [["alpha", "beta", "gamma"], ["yes", "no"], ["Paris", "London", "Par"]]
STOPS = [["e"], ["ab", "x"], [" the"], ["o"]]

# engine settings: tiny pools of page size 1 / 2 / 4, chunked prefill, few or many running
# requests, speculative drafts (on by default on the CPU), mixed steps, run-ahead, the prefix
# cache off, deferred text work (CUDA's default, forced here on the CPU)
CONFIGS = [
    dict(kv_tokens=72, page_size=1, chunked_prefill_size=16, max_prefill_tokens=24, max_running_requests=8),
    dict(kv_tokens=96, page_size=4, chunked_prefill_size=8, speculative_draft_tokens=0, max_running_requests=4),
    dict(kv_tokens=64, page_size=1, speculative_draft_tokens=0, run_ahead=True),
    dict(kv_tokens=80, page_size=2, chunked_prefill_size=12, jump_forward=False, max_mixed_extend=0),
    dict(kv_tokens=72, page_size=1, chunked_prefill_size=8, enable_prefix_cache=False),
    dict(kv_tokens=120, page_size=1, chunked_prefill_size=16, max_running_requests=3),
    dict(kv_tokens=80, page_size=1, chunked_prefill_size=16, defer_text=True),
    dict(kv_tokens=64, page_size=4, speculative_draft_tokens=0, run_ahead=True, defer_text=True, max_running_requests=6),
]  # fmt: skip
EXAMPLES = [(seed, CONFIGS[seed % len(CONFIGS)]) for seed in range(24)]


@dataclass(eq=False)
class Job:
    i: int
    kind: str  # gen | score | chain | edge (needs the whole pool) | big (more than the pool)
    prompt: Any  # token ids (a chain: its text)
    params: SamplingParams | None = None
    conts: list[list[int]] = field(default_factory=list)  # score continuations
    steps: list = field(default_factory=list)  # a chain's steps after its first generation
    arrive: int = 0  # loop turn at which the hook submits it
    abort: str = ""  # "" | inbox | turn | cancel | self | peer
    abort_at: int = 0  # the turn (turn, cancel) or the token count (self, peer's) of the abort
    victims: list[Job] = field(default_factory=list)  # aborted from this job's stream callback
    fut: Future | None = None
    chunks: list[StreamChunk] = field(default_factory=list)
    callback_errors: list[BaseException] = field(default_factory=list)
    abort_result: bool | None = None  # what abort() / cancel() returned
    aborted_in: str = ""  # where the request was when the abort ran
    error: BaseException | None = None
    result: Any = None


# ---- drawing ---------------------------------------------------------------------------------
def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.choice(TOKENS) for _ in range(n)]


def draw_params(rng: random.Random, constrained: bool) -> SamplingParams:
    kw: dict = dict(max_new_tokens=rng.choice([0, 1, 2]) if rng.random() < 0.08 else rng.randint(3, 20))
    if rng.random() < 0.15:
        kw.update(temperature=0.8, seed=rng.randrange(1000))
    kw["ignore_eos"] = rng.random() < 0.5
    r = rng.random()
    if r < 0.2:
        kw["stop"] = rng.choice(STOPS)
    elif r < 0.35:
        kw["stop_token_ids"] = _ids(rng, rng.randint(10, 60))
    if rng.random() < 0.2 and kw["max_new_tokens"]:
        kw["min_new_tokens"] = rng.randint(1, kw["max_new_tokens"])
    if constrained:
        spec = (
            spec_from_regex(rng.choice(REGEXES))
            if rng.random() < 0.6
            else spec_from_choices(rng.choice(CHOICES))
        )
        kw.update(constraint=spec, max_new_tokens=rng.randint(4, 12), min_new_tokens=0)
    return SamplingParams(**kw)


def draw_jobs(eng: Engine, rng: random.Random, n: int) -> list[Job]:
    capacity, page = eng.pool.capacity, eng.pool.page_size
    families = [_ids(rng, rng.randint(4, 24)) for _ in range(3)]
    families.append(_ids(rng, 3) * 4)  # repeats: prompt-lookup drafts find them (verify steps)
    jobs: list[Job] = []
    for i in range(n):
        kind = rng.choices(["gen", "score", "chain", "edge", "big"], [20, 2, 2, 0.5, 1])[0]
        prompt = rng.choice(families) + _ids(rng, rng.randint(1, 14))
        if kind == "gen":
            job = Job(i, "gen", prompt, draw_params(rng, constrained=rng.random() < 0.15))
            job.abort = rng.choices(["", "inbox", "turn", "cancel", "self", "peer"], [14, 1, 2, 1, 1, 2])[0]
        elif kind == "score":
            job = Job(
                i, "score", prompt, conts=[_ids(rng, rng.randint(1, 4)) for _ in range(rng.randint(1, 3))]
            )
            job.abort = rng.choices(["", "cancel"], [4, 1])[0]
        elif kind == "chain":  # gen, text, gen: one request whose tokens are re-pointed in between
            text = eng.tokenizer.decode(rng.choice(families)[:10] + _ids(rng, rng.randint(1, 8))) or "x"
            small = dict(max_new_tokens=rng.randint(1, 6), ignore_eos=True)
            steps = [("text", rng.choice([" name: ", ", ", "\n"])), ("gen", SamplingParams(**small), None)]
            job = Job(i, "chain", text, SamplingParams(**small, stop=rng.choice([[], ["e"]])), steps=steps)
            job.abort = rng.choices(["", "turn", "self", "peer"], [6, 1, 1, 2])[0]
        elif kind == "edge":  # prompt + max_new_tokens + a page: exactly the pool
            m = rng.randint(1, 6)
            edge = rng.choice(families) + _ids(rng, capacity)
            job = Job(
                i, "edge", edge[: capacity - page - m], SamplingParams(max_new_tokens=m, ignore_eos=True)
            )
        elif rng.random() < 0.5:  # a prompt longer than the whole pool
            job = Job(i, "big", _ids(rng, capacity + rng.randint(1, 8)), SamplingParams(max_new_tokens=4))
        else:  # a short prompt whose max_new_tokens outgrow the pool
            job = Job(i, "big", prompt, SamplingParams(max_new_tokens=capacity - len(prompt)))
        job.arrive = 0 if i < n // 3 else rng.randint(1, 40)
        job.abort_at = (
            job.arrive + rng.randint(0, 12) if job.abort in ("turn", "cancel") else rng.randint(1, 8)
        )
        jobs.append(job)
    streams = [j for j in jobs if j.kind in ("gen", "chain")]
    for job in jobs:
        if job.abort == "peer":
            peers = [g for g in streams if g is not job and not g.abort]
            if peers:
                rng.choice(peers).victims.append(job)
            else:
                job.abort = ""
    return jobs


# ---- running ---------------------------------------------------------------------------------
def where(eng: Engine, rid: int) -> str:
    """Where request ``rid`` is now (engine thread): for the coverage report and failure text."""
    with eng._inbox.mutex:
        if any(getattr(x, "rid", None) == rid for x in eng._inbox.queue):
            return "inbox"
    batch = getattr(eng, "_batch", None)  # the step being processed (an abort from a stream callback)
    if batch is not None:
        for k, r in enumerate(batch.reqs):
            if r.rid == rid and not r.finished:
                if batch.draft_lens and batch.draft_lens[k]:
                    return "step-drafted"  # its KV runs past its tokens: the draft's
                decode_row = batch.mode is ForwardMode.DECODE or k >= len(batch.reqs) - batch.num_decode
                return "step-decode" if decode_row else "step-extend"  # extend: maybe in no queue
    s = eng.scheduler
    if any(r.rid == rid and r.finished for r in s.all_requests()):
        return "done"  # finished earlier in this step; it leaves the queues after the step
    if any(r.rid == rid for r in s.waiting):
        return "waiting"
    if s.chunked is not None and s.chunked.rid == rid:
        return "chunked"
    if any(r.rid == rid for r in s.running):
        return "running"
    if any(r.rid == rid for r in s.extending):
        return "extending"
    return "done"


class Driver:
    """Submits and aborts the jobs at their loop turns, on the engine thread."""

    def __init__(self, eng: Engine, jobs: list[Job]):
        self.eng, self.jobs, self.turn = eng, jobs, 0
        self.cover: dict[str, int] = {}
        step = eng._step

        def hooked_step() -> None:
            self.on_turn()
            step()

        eng._step = hooked_step  # type: ignore[method-assign]

    def pending(self) -> bool:
        return any(
            j.arrive > self.turn or (j.abort in ("turn", "cancel") and j.abort_at > self.turn)
            for j in self.jobs
        )

    def kick(self) -> None:
        """The engine is idle before every turn's work is done: go on at the next turn that has some."""
        if self.eng.scheduler.has_work():
            return
        later = [j.arrive for j in self.jobs if j.arrive > self.turn]
        later += [j.abort_at for j in self.jobs if j.abort in ("turn", "cancel") and j.abort_at > self.turn]
        self.turn = min(later) - 1
        self.on_turn()

    def on_turn(self) -> None:
        self.turn += 1
        t = self.turn - 1  # turn 0: the first batch, submitted before the first step
        for job in self.jobs:
            if job.arrive == t:
                self.submit(job)
        for job in self.jobs:
            if job.fut is not None and job.abort in ("turn", "cancel") and job.abort_at == t:
                self.abort(job)

    def submit(self, job: Job) -> None:
        eng = self.eng
        try:
            if job.kind == "score":
                job.fut = eng.score_async(job.prompt, job.conts)
            elif job.kind == "chain":
                steps = [("gen", job.params, None), *job.steps]
                job.fut = eng.submit_chain(job.prompt, steps, stream=lambda c, job=job: self.on_chunk(job, c))
            else:
                job.fut = eng.submit(job.prompt, job.params, stream=lambda c, job=job: self.on_chunk(job, c))
        except LLMIRError as e:
            job.error = e
            return
        if job.abort == "inbox":
            self.abort(job)

    def abort(self, victim: Job) -> None:
        assert victim.fut is not None
        if victim.kind == "score":
            victim.aborted_in = "score"
            victim.abort_result = victim.fut.cancel()
            return
        victim.aborted_in = where(self.eng, victim.fut.rid)  # type: ignore[attr-defined]
        self.cover[victim.aborted_in] = self.cover.get(victim.aborted_in, 0) + 1
        if victim.abort == "cancel":
            done = victim.fut.cancel()
        else:
            done = self.eng.abort(victim.fut.rid)  # type: ignore[attr-defined]
        # an abort from a stream callback that this abort's text work ran may have ended it first
        victim.abort_result = bool(victim.abort_result) or done

    def on_chunk(self, job: Job, chunk: StreamChunk) -> None:
        try:
            job.chunks.append(chunk)
            n = sum(len(c.token_ids) for c in job.chunks)
            if job.abort == "self" and job.abort_result is None and n >= job.abort_at and not chunk.finished:
                self.abort(job)
            for v in job.victims:
                if v.abort_result is None and v.fut is not None and n >= v.abort_at:
                    self.abort(v)
        except BaseException as e:  # noqa: BLE001 - the engine would swallow it
            job.callback_errors.append(e)
            raise


def run_jobs(eng: Engine, jobs: list[Job]) -> Driver:
    driver = Driver(eng, jobs)
    eng.call_in_engine_thread(driver.on_turn)  # turn 0: the first batch arrives at once
    while eng.call_in_engine_thread(driver.pending):
        eng.call_in_engine_thread(driver.kick)  # a no-op unless the engine went idle
        eng.call_in_engine_thread(lambda: None)  # at least one loop turn between looks
    collect(eng, jobs, lambda job: f"job {job.i} ({job.kind}, abort {job.abort!r})")
    return driver


# ---- oracle and checks -----------------------------------------------------------------------
def same_tokens(got: list[int], want: Any, prefix_ok: bool, what: str) -> None:
    """``got`` equals the alone run's tokens (a prefix of them if ``prefix_ok``); a difference is
    allowed only where the alone run's two best tokens were within TIE of each other."""
    ref, tops = want.token_ids, want.top_logprobs
    n = next((k for k, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    if n == len(got) and (prefix_ok or n == len(ref)):
        return
    tied = tops and n < len(tops) and len(tops[n]) > 1 and tops[n][0][1] - tops[n][1][1] < TIE
    assert tied, f"{what}: tokens differ at {n}\n got {got}\nwant {ref}"


def check_job(eng: Engine, oracle: Engine, job: Job) -> None:
    what = f"job {job.i} {job.kind} abort={job.abort!r}@{job.aborted_in or '-'} {job.prompt} {job.params}"
    if job.kind == "big":
        assert isinstance(job.error, OutOfKVMemoryError), f"{what}: {job.error!r}"
        assert "KV slots" in str(job.error) and "kv_memory" in str(job.error)
        return
    if job.error is not None:
        raise AssertionError(f"{what}: failed with {job.error!r}") from job.error
    assert not job.callback_errors, f"{what}: its stream callback raised {job.callback_errors!r}"
    aborted = bool(job.abort_result)
    if job.aborted_in not in ("", "done", "score"):  # the request was live when the abort ran
        assert aborted, f"{what}: abort() returned {job.abort_result}"
    if job.kind == "score":
        if job.result is None:
            assert aborted, what
            return
        want = alone(oracle, job)
        for g, w in zip(job.result, want, strict=True):
            assert g == pytest.approx(w, abs=1e-4), (what, job.result, want)
        return
    res = job.result
    if job.abort == "cancel" and aborted:
        assert res is None and job.fut is not None and job.fut.cancelled(), (what, res)
    else:
        assert res is not None, what
        # one final chunk, the last, and the stream's text is the result's
        finals = [k for k, c in enumerate(job.chunks) if c.finished]
        assert finals == [len(job.chunks) - 1], f"{what}: final chunks at {finals} of {len(job.chunks)}"
        assert job.chunks[-1].finish_reason == res.finish_reason, what
        if job.kind != "chain":  # a chain streams every generation, its result is the last one
            assert "".join(c.text for c in job.chunks) == res.text, what
        if aborted:  # or it had ended already, at a stop string in forced text (the next check's)
            stopped = res.finish_reason == "stop" and isinstance(res.matched_stop, str)
            assert res.finish_reason == "abort" or stopped, f"{what}: abort() returned True, result {res}"
        else:
            assert res.finish_reason in ("stop", "length"), f"{what}: {res}"
    if job.abort == "inbox":
        # aborted before the engine read it: it never runs
        assert aborted, f"{what}: abort right after submit returned {job.abort_result}"
        if res is not None:  # only the constraint's forced opening (jump-forward at submission)
            assert len(res.token_ids) == res.meta["jump_forward_tokens"], (what, res)
            assert res.cached_tokens == 0, (what, res)
    if res is None:
        return
    want = alone(oracle, job)
    assert job.params is not None
    if job.kind == "chain":  # each generation as alone; an aborted one's last: a prefix
        got_steps, want_steps = res.meta["steps"], want.meta["steps"]
        cut = res.finish_reason == "abort"
        assert len(got_steps) <= len(want_steps) if cut else len(got_steps) == len(want_steps), what
        for k, (g, w) in enumerate(zip(got_steps, want_steps)):
            partial = cut and k == len(got_steps) - 1
            same_tokens(g.token_ids, w, partial, f"{what} step {k}: {got_steps}")
            if g.token_ids != w.token_ids[: len(g.token_ids)]:
                return  # a near-tie: what follows cannot be compared
            if not partial:
                assert (g.finish_reason, g.text) == (w.finish_reason, w.text), (what, k, g, w)
        if not cut:
            assert res.meta["chain_text"] == want.meta["chain_text"], (what, res, want)
        return
    if res.finish_reason == "abort":
        if (
            job.params.constraint is not None
            and eng.jump_forward
            and res.token_ids != want.token_ids[: len(res.token_ids)]
        ):
            # jump-forward re-tokenizes the output's end with the forced text: a prefix as text only
            assert want.text.startswith(res.text), (what, res, want)
        else:
            same_tokens(res.token_ids, want, True, what)
        return
    same_tokens(res.token_ids, want, False, what)
    if res.token_ids == want.token_ids:
        assert (res.finish_reason, res.text) == (want.finish_reason, want.text), (what, res, want)


def settle(eng: Engine) -> None:
    """Let aborts queued by cancelled futures run; then nothing may be left."""
    for _ in range(1000):
        if not eng.call_in_engine_thread(eng.scheduler.has_work):
            return
    raise AssertionError(f"requests left after every future resolved\n{dump(eng)}")


def check_idle_engine(eng: Engine) -> None:
    """No request holds KV, no node stays locked, every used slot is cached; a flush frees all."""

    def look() -> tuple[list, list]:
        locked, stack = [], list(eng.cache.root.children.values())
        while stack:
            node = stack.pop()
            if node.lock_ref:
                locked.append(node)
            stack.extend(node.children.values())
        return locked, eng.scheduler.all_requests()

    locked, left = eng.call_in_engine_thread(look)
    assert not locked and not left, (locked, left, dump(eng))
    stats = eng.stats()
    assert stats["cache"]["protected_tokens"] == 0, dump(eng)
    assert stats["pool"]["used"] == stats["cache"]["cached_tokens"], dump(eng)
    eng.flush_cache()
    pool = eng.stats()["pool"]
    assert pool["free"] == pool["capacity"] and pool["used"] == 0, pool


@pytest.mark.parametrize("seed, settings", EXAMPLES, ids=[f"seed{s}" for s, _ in EXAMPLES])
def test_tiny_pool_workload_matches_requests_run_alone(alone_engines, seed, settings):
    folder, oracle_for = alone_engines
    settings = dict(settings)
    kv_tokens = settings.pop("kv_tokens")
    defer_text = settings.pop("defer_text", False)
    rng = random.Random(seed)
    with Engine(folder, device="cpu", kv_memory=kv_tokens * 512, **settings) as eng:
        assert eng.pool.capacity == kv_tokens
        eng.outputs.defer_text = defer_text
        jobs = draw_jobs(eng, rng, 40)
        driver = run_jobs(eng, jobs)
        settle(eng)
        stats = eng.stats()
        # the pool was under pressure: requests were retracted or the cache evicted
        assert stats["retractions"] + stats["cache"]["evictions"] > 0, stats
        check_idle_engine(eng)
        oracle = oracle_for(eng.jump_forward)
        for job in jobs:
            check_job(eng, oracle, job)
        # the engine keeps serving
        last = Job(-1, "gen", _ids(rng, 10), SamplingParams(max_new_tokens=6))
        last.result = eng.submit(last.prompt, last.params, stream=last.chunks.append).result(timeout=HANG_S)
        check_job(eng, oracle, last)
        check_idle_engine(eng)
        print(f"seed {seed}: aborts landed in {driver.cover}; retractions {stats['retractions']}")
