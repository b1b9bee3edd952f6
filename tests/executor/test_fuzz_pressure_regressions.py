"""Minimal repros of what tests/executor/test_fuzz_pressure.py found, one test per finding.

Most are aborts from a stream callback: it runs on the engine thread in the middle of a step, where
the request to abort may be in no queue, in a verify step's extend, in a step launched ahead, or
ending already."""

from __future__ import annotations

import pytest

from llmir_lang.executor import speculate
from llmir_lang.executor.constraints import spec_from_regex
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.engine_text import stop_hit, visible_len
from llmir_lang.executor.request import Req, StreamChunk
from llmir_lang.executor.sampling_params import SamplingParams

A = [5, 17, 42, 99, 3, 7, 250, 11]
B = [9, 8, 7, 6, 5, 4]
C = [21, 22, 23, 24, 25]
LONG = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(checkpoints):
    return str(checkpoints("llama")[0])


def _leaks_nothing(eng: Engine) -> None:
    stats = eng.stats()
    assert stats["cache"]["protected_tokens"] == 0
    assert stats["pool"]["used"] == stats["cache"]["cached_tokens"]
    assert not eng.call_in_engine_thread(eng.scheduler.has_work)
    eng.flush_cache()
    assert eng.stats()["pool"]["used"] == 0


def _one_final_chunk(chunks: list[StreamChunk], result) -> None:
    assert [c.finished for c in chunks][-1:] == [True] and sum(c.finished for c in chunks) == 1, chunks
    assert [t for c in chunks for t in c.token_ids] == result.token_ids


def test_abort_of_a_request_submitted_by_the_same_callback(folder):
    # the request is still in the engine's inbox: abort() returned False and it ran to its end
    with Engine(folder, device="cpu", kv_memory="8MB") as eng:
        box: dict = {"chunks": []}

        def on_chunk(chunk: StreamChunk) -> None:
            if "b" not in box:
                box["b"] = eng.submit(B, LONG, stream=box["chunks"].append)
                box["aborted"] = eng.abort(box["b"].rid)

        eng.submit(A, SamplingParams(max_new_tokens=3, ignore_eos=True), stream=on_chunk).result(timeout=60)
        rb = box["b"].result(timeout=60)
        assert box["aborted"] is True
        assert rb.finish_reason == "abort" and rb.token_ids == []
        _one_final_chunk(box["chunks"], rb)
        assert not eng.abort(rb.rid)
        _leaks_nothing(eng)


def _a_aborts_b(eng: Engine, when, b_params: SamplingParams = LONG, box: dict | None = None) -> tuple:
    """Submit A (``LONG``) and B in one loop turn, so both are admitted into the same first step
    and decode in the same steps, A first; A's stream callback aborts B once, at the first of its
    chunks where ``when(box)`` holds (``box["n"]``: A's chunks so far, ``box["tokens"]``: its
    tokens, ``box["b"]``: B's future). Returns (A's result, B's result, the box, which also holds
    B's chunks: ``box["chunks"]``)."""
    box = {} if box is None else box
    box.update(chunks=[], n=0, tokens=0)

    def on_chunk(chunk: StreamChunk) -> None:
        box["n"] += 1
        box["tokens"] += len(chunk.token_ids)
        if "aborted" not in box and when(box):
            box["aborted"] = eng.abort(box["b"].rid)

    def submit_both():
        a = eng.submit(A, LONG, stream=on_chunk)
        box["b"] = eng.submit(B, b_params, stream=box["chunks"].append)
        return a

    ra = eng.call_in_engine_thread(submit_both).result(timeout=60)
    rb = box["b"].result(timeout=60)
    assert box["aborted"] is True and rb.finish_reason == "abort"
    _one_final_chunk(box["chunks"], rb)
    return ra, rb, box


@pytest.mark.parametrize(
    "drafts, abort_at, b_max, b_tokens",
    [
        # admitted in this prefill step, B is in no queue until the step ends: abort() returned False
        (None, 1, 12, 0),
        # aborted by A's callback in the decode step where B takes its last token, B still got that
        # token appended: a chunk after its final chunk, and a second final chunk at max_new_tokens
        (0, 3, 3, 2),
    ],
    ids=["admitted-in-this-step", "mid-step"],
)
def test_a_request_aborted_by_an_earlier_requests_callback_in_the_same_step(
    folder, drafts, abort_at, b_max, b_tokens
):
    with Engine(folder, device="cpu", kv_memory="8MB", speculative_draft_tokens=drafts) as eng:
        b_params = SamplingParams(max_new_tokens=b_max, ignore_eos=True)
        ra, rb, _ = _a_aborts_b(eng, lambda box: box["tokens"] >= abort_at, b_params)
        assert len(rb.token_ids) == b_tokens
        assert ra.completion_tokens == 12
        _leaks_nothing(eng)


def test_abort_during_a_verify_step_of_the_aborted_request(folder, monkeypatch):
    # its KV slots then run past its tokens (the draft's): caching them raised RadixCacheError into
    # the aborting callback, whose own stream the engine then dropped
    with Engine(folder, device="cpu", kv_memory="8MB", speculative_draft_tokens=3) as eng:
        box: dict = {}

        def draft_for_b(proc, req, cfg):  # B drafts two tokens at every step, A never
            room = req.params.max_new_tokens - len(req.output_ids) - 1
            return [11, 12] if req.rid == box["b"].rid and room >= 2 and not req.finished else []

        def at_a_drafted_step(seen: dict) -> bool:  # seen is box
            batch = eng._batch
            if seen["n"] != 3 or batch is None or not batch.draft_lens:
                return False
            b = next(r for r in batch.reqs if r.rid == seen["b"].rid)
            seen["drafted"] = batch.draft_lens[batch.reqs.index(b)]
            return True

        monkeypatch.setattr(speculate, "propose", draft_for_b)
        ra, rb, _ = _a_aborts_b(eng, at_a_drafted_step, box=box)
        assert box["drafted"] == 2
        assert box["n"] == 12 and ra.completion_tokens == 12  # A's stream ran to its end
        monkeypatch.undo()
        # the cache holds B's computed KV only: a prompt continuing B's output is answered as alone
        cont = B + rb.token_ids + [7]
        got = eng.generate(cont, SamplingParams(max_new_tokens=4, ignore_eos=True)).token_ids
        eng.flush_cache()
        assert got == eng.generate(cont, SamplingParams(max_new_tokens=4, ignore_eos=True)).token_ids
        _leaks_nothing(eng)


def test_abort_while_the_next_decode_step_runs_ahead(folder):
    # run-ahead (CUDA's default): while the host reads a step's tokens the next step is launched,
    # with a slot for a token the host has not appended yet; aborting then raised RadixCacheError
    with Engine(folder, device="cpu", kv_memory="8MB", run_ahead=True, speculative_draft_tokens=0) as eng:

        def with_a_step_ahead(box: dict) -> bool:
            if box["n"] != 4:
                return False
            box["ahead"] = eng._ahead is not None
            return True

        ra, _, box = _a_aborts_b(eng, with_a_step_ahead)
        assert box["ahead"] and box["n"] == 12 and ra.completion_tokens == 12
        assert eng.num_run_ahead_steps > 0
        _leaks_nothing(eng)


def test_an_abort_run_by_another_aborts_text_work_ends_the_request_once(folder):
    # deferred text work (CUDA's default): abort() flushes it first, and a stream callback there
    # aborted the same request: it ended twice (two final chunks, abort() True twice)
    with Engine(folder, device="cpu", kv_memory="8MB", max_running_requests=2) as eng:
        eng.outputs.defer_text = True
        box: dict = {"chunks": [], "aborts": []}

        def on_chunk(chunk: StreamChunk) -> None:
            if chunk.token_ids and len(box["aborts"]) < 2:
                box["aborts"].append(eng.abort(box["b"].rid))

        def submit_all():
            a = eng.submit(A, LONG, stream=on_chunk)
            c = eng.submit(C, LONG, stream=on_chunk)
            box["b"] = eng.submit(B, LONG, stream=box["chunks"].append)  # waits: two run at most
            return a, c

        a, c = eng.call_in_engine_thread(submit_all)
        a.result(timeout=60), c.result(timeout=60)
        rb = box["b"].result(timeout=60)
        assert rb.finish_reason == "abort" and sorted(box["aborts"]) == [False, True]
        _one_final_chunk(box["chunks"], rb)
        _leaks_nothing(eng)


def _req(params: SamplingParams) -> Req:
    return Req(rid=0, prompt_ids=[1], params=params, future=None, decoder=None)  # type: ignore[arg-type]


def test_a_stop_string_held_by_min_new_tokens_never_stops():
    # the search window after the held text was as long as the longest stop string for all of
    # them: it found a shorter one inside the held text ("x" here), cut the output there, and the
    # stream had already shown it
    req = _req(SamplingParams(stop=["ab", "x"], min_new_tokens=2))
    req.text = "x"
    assert not stop_hit(req, True)
    req.text += "y"
    assert not stop_hit(req, False) and req.text == "xy"
    # one that straddles the held text's end still stops
    req = _req(SamplingParams(stop=["ab", "x"], min_new_tokens=2))
    req.text = "a"
    assert not stop_hit(req, True)
    req.text += "b"
    assert stop_hit(req, False) and req.text == "" and req.matched_stop == "ab"


def test_forced_text_is_not_streamed_before_its_stop_check():
    # jump-forward appends the constraint's forced text after the stop check; the next check may
    # cut inside it, so the stream must not show it yet
    req = _req(SamplingParams(stop=["o"]))
    req.text = "L"
    assert not stop_hit(req, False)
    req.text += "ondon"  # forced
    assert visible_len(req) == 1


def test_forced_text_with_a_stop_string_streams_what_the_result_holds(folder):
    with Engine(folder, device="cpu", kv_memory="8MB") as eng:
        chunks: list[StreamChunk] = []
        sp = SamplingParams(max_new_tokens=8, stop=["y"], constraint=spec_from_regex(r"[0-9]yz[0-9]"))
        res = eng.submit(A, sp, stream=chunks.append).result(timeout=60)
        assert res.meta["jump_forward_tokens"] > 0 and res.matched_stop == "y"
        assert len(res.text) == 1 and res.text.isdigit()
        assert "".join(c.text for c in chunks) == res.text


def test_a_chain_aborted_as_its_next_generation_starts_reports_that_generation(folder):
    # its first generation ended in this step and the next one waits for the step's end to be
    # set up; aborted in between, its last step reported the first generation's tokens again
    with Engine(folder, device="cpu", kv_memory="8MB", speculative_draft_tokens=0) as eng:
        box: dict = {"chunks": [], "n": 0}
        gen = SamplingParams(max_new_tokens=3, ignore_eos=True)

        def on_chunk(chunk: StreamChunk) -> None:
            box["n"] += len(chunk.token_ids)
            if box["n"] == 3:  # the step in which the chain's first generation took its last token
                box["aborted"] = eng.abort(box["chain"].rid)

        def submit_both():  # one loop turn: they decode in the same steps, the chain first
            box["chain"] = eng.submit_chain(
                "the quick brown", [("gen", gen, None), ("text", " fox"), ("gen", LONG, None)],
                stream=box["chunks"].append,
            )  # fmt: skip
            return eng.submit(A, LONG, stream=on_chunk)

        eng.call_in_engine_thread(submit_both).result(timeout=60)
        res = box["chain"].result(timeout=60)
        first, last = res.meta["steps"]
        assert box["aborted"] is True and res.finish_reason == last.finish_reason == "abort"
        assert first.finish_reason == "length" and len(first.token_ids) == 3
        assert last.token_ids == [] and last.text == ""
        assert box["chunks"][-1].finished and box["chunks"][-1].index == 1
        assert box["chunks"][-1].token_ids == []
        _leaks_nothing(eng)


@pytest.mark.parametrize(
    "gen, n, reason",
    [
        (SamplingParams(max_new_tokens=3, ignore_eos=True), 3, "length"),
        (SamplingParams(max_new_tokens=8, constraint=spec_from_regex(r"[0-9]{2}")), 2, "stop"),
    ],
)
def test_a_chain_aborted_by_the_chunk_that_ends_a_generation_keeps_its_reason(folder, gen, n, reason):
    # the chain aborts itself from the callback of its first generation's last chunk: that
    # generation had ended (length / stop) but was reported "abort", and code after the chunk set
    # up the next generation of the finished request
    with Engine(folder, device="cpu", kv_memory="8MB", speculative_draft_tokens=0) as eng:
        box: dict = {"chunks": []}

        def on_chunk(chunk: StreamChunk) -> None:
            box["chunks"].append(chunk)
            if sum(len(c.token_ids) for c in box["chunks"] if c.index == 0) == n and "aborted" not in box:
                box["aborted"] = None  # the abort's own final chunk comes back here
                box["aborted"] = eng.abort(box["chain"].rid)

        steps = [("gen", gen, None), ("text", " fox"), ("gen", LONG, None)]
        box["chain"] = eng.submit_chain("the quick brown", steps, stream=on_chunk)
        res = box["chain"].result(timeout=60)
        eng.call_in_engine_thread(lambda: None)  # the callback has returned
        first, last = res.meta["steps"]
        assert box["aborted"] is True and res.finish_reason == last.finish_reason == "abort"
        assert first.finish_reason == reason and len(first.token_ids) == n
        assert first.text == "".join(c.text for c in box["chunks"] if c.index == 0)
        assert last.token_ids == [] and last.text == ""
        assert res.meta["chain_text"] == first.text + " fox"
        _one_final_chunk([c for c in box["chunks"] if c.index == 1], last)
        assert box["chunks"][-1].index == 1 and box["chunks"][-1].finish_reason == "abort"
        _leaks_nothing(eng)
