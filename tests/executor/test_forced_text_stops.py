"""A stop inside jump-forward's forced text ends the output there on every path that ends it.

Jump-forward appends the constraint's forced text after the stop check of the token before it, so
the next check searches it. Paths that end the request before that check (an abort, forced text
that completes the constraint, a stop token id sampled right after it) reported the forced text
uncut, stop string included, where the same request with jump-forward off stops at the string.
"""

from __future__ import annotations

import pytest

from llmir_lang.executor.constraints import spec_from_regex
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.request import StreamChunk
from llmir_lang.executor.sampling_params import SamplingParams

A = [5, 17, 42, 99, 3, 7, 250, 11]
# a digit, then "yz" forced: the first sampled digit's check comes before "yz" is in the text
DIGIT_YZ_DIGIT = r"[0-9]yz[0-9]"


@pytest.fixture(scope="module")
def eng(checkpoints):
    folder, _ = checkpoints("llama")
    with Engine(str(folder), device="cpu", kv_memory="8MB", speculative_draft_tokens=0) as e:
        yield e


def _digit_ids(eng: Engine) -> list[int]:
    return [eng.tokenizer.encode(str(d), add_special_tokens=False)[-1] for d in range(10)]


def _on_and_off(eng: Engine, params: SamplingParams):
    got = {}
    for jf in (True, False):
        saved, eng.jump_forward = eng.jump_forward, jf
        try:
            got[jf] = eng.generate(A, params)
        finally:
            eng.jump_forward = saved
    assert got[True].meta["jump_forward_tokens"] > 0 and got[False].meta["jump_forward_tokens"] == 0
    return got[True], got[False]


def _aborted_on_first_chunk(eng: Engine, params: SamplingParams) -> tuple[object, list[StreamChunk], dict]:
    """Submit ``params`` and abort the request from its own stream callback at its first chunk: the
    one jump-forward streams right after it appended the forced text (held back until checked)."""
    box: dict = {"chunks": []}

    def on_chunk(chunk: StreamChunk) -> None:
        box["chunks"].append(chunk)
        if "aborted" not in box:
            box["aborted"] = None  # the abort's own final chunk comes back here
            box["aborted"] = eng.abort(box["fut"].rid)

    box["fut"] = eng.submit(A, params, stream=on_chunk)
    res = box["fut"].result(timeout=60)
    eng.call_in_engine_thread(lambda: None)  # the callback has returned: box["aborted"] is set
    return res, box["chunks"], box


@pytest.mark.parametrize("stop", [{"stop": ["y"]}, {"stop_regex": [r"y+z"]}])
def test_an_abort_after_forced_text_with_a_stop_reports_the_stop(eng, stop):
    # the abort lands between the forced "yz" and the check that would have cut it: the result and
    # the stream held "4yz" with finish_reason "abort". The stop was in the text before the abort,
    # so the request ended there: "stop", as without the abort
    params = SamplingParams(max_new_tokens=8, constraint=spec_from_regex(DIGIT_YZ_DIGIT), **stop)
    res, chunks, box = _aborted_on_first_chunk(eng, params)
    assert box["aborted"] is True and res.meta["jump_forward_tokens"] > 0
    assert len(res.text) == 1 and res.text.isdigit(), res
    assert res.finish_reason == "stop" and res.matched_stop == next(iter(stop.values()))[0]
    assert "".join(c.text for c in chunks) == res.text
    assert [c.finished for c in chunks][-1:] == [True] and sum(c.finished for c in chunks) == 1
    assert chunks[-1].finish_reason == "stop"
    # the same request not aborted ends the same way
    alone = eng.generate(A, params)
    assert (alone.text, alone.finish_reason, alone.matched_stop) == (res.text, "stop", res.matched_stop)


def test_an_abort_after_forced_text_without_a_stop_stays_an_abort(eng):
    params = SamplingParams(max_new_tokens=8, stop=["q"], constraint=spec_from_regex(DIGIT_YZ_DIGIT))
    res, chunks, box = _aborted_on_first_chunk(eng, params)
    assert box["aborted"] is True and res.finish_reason == "abort" and res.matched_stop is None
    assert len(res.text) == 3 and res.text.endswith("yz")
    assert "".join(c.text for c in chunks) == res.text


def test_a_chain_aborted_after_forced_text_with_a_stop_reports_that_generation_stopped(eng):
    # the generation ended by its stop string before the abort: it reports "stop", cut there; the
    # next generation had not started: it is reported aborted, with nothing, and so is the chain
    box: dict = {"chunks": []}
    gen = SamplingParams(max_new_tokens=8, stop=["y"], constraint=spec_from_regex(DIGIT_YZ_DIGIT))
    then = SamplingParams(max_new_tokens=4, ignore_eos=True)

    def on_chunk(chunk: StreamChunk) -> None:
        box["chunks"].append(chunk)
        if "aborted" not in box:
            box["aborted"] = None
            box["aborted"] = eng.abort(box["fut"].rid)

    steps = [("gen", gen, None), ("text", " and"), ("gen", then, None)]
    box["fut"] = eng.submit_chain("the quick brown", steps, stream=on_chunk)
    res = box["fut"].result(timeout=60)
    eng.call_in_engine_thread(lambda: None)
    first, second = res.meta["steps"]
    assert box["aborted"] is True and res.finish_reason == second.finish_reason == "abort"
    assert first.finish_reason == "stop" and first.matched_stop == "y"
    assert len(first.text) == 1 and first.text.isdigit(), first
    assert second.text == "" and second.token_ids == []
    assert res.meta["chain_text"].startswith(first.text + " and")
    assert "".join(c.text for c in box["chunks"] if c.index == 0) == first.text
    assert [c.finished for c in box["chunks"]][-1:] == [True] and sum(c.finished for c in box["chunks"]) == 1


@pytest.mark.parametrize("stop", [{"stop": ["y"]}, {"stop_regex": [r"yz"]}])
def test_forced_text_that_completes_the_constraint_is_cut_at_its_stop(eng, stop):
    # "yz" is forced and ends the constraint: the request finished at once, "4yz", matched None
    params = SamplingParams(max_new_tokens=8, constraint=spec_from_regex(r"[0-9]yz"), **stop)
    on, off = _on_and_off(eng, params)
    assert (on.text, on.finish_reason, on.matched_stop) == (off.text, off.finish_reason, off.matched_stop)
    assert len(on.text) == 1 and on.matched_stop == next(iter(stop.values()))[0]


@pytest.mark.parametrize("pattern", [r"[ab]yz[0-9]", r"ayz[0-9]"])  # forced after a token / at the start
def test_a_stop_token_after_forced_text_does_not_hide_its_stop(eng, pattern):
    # a stop token id ends the output ahead of the stop strings: the forced "yz" before it went
    # unsearched ("byz4", matched_stop the digit's id)
    params = SamplingParams(
        max_new_tokens=8, stop=["y"], stop_token_ids=_digit_ids(eng), constraint=spec_from_regex(pattern)
    )
    on, off = _on_and_off(eng, params)
    assert (on.text, on.finish_reason, on.matched_stop) == (off.text, off.finish_reason, off.matched_stop)
    assert on.text in ("a", "b") and on.matched_stop == "y"


def test_a_chain_aborted_in_the_inbox_after_a_forced_opening_with_a_stop(eng):
    # the opening "xyz" is forced at submission; aborted before the engine read the request, its
    # first generation ended at "y" and the chain went on to its next generation, which queued it
    # for an extend: the finished request then ran that step and cached its KV
    gen = SamplingParams(max_new_tokens=8, stop=["y"], constraint=spec_from_regex(r"xyz[0-9]"))
    steps = [("gen", gen, None), ("text", " and"), ("gen", SamplingParams(max_new_tokens=3), None)]
    eng.flush_cache()
    before = eng.stats()["forward_calls"]

    def submit_and_abort():
        fut = eng.submit_chain("the quick", steps)
        return fut, eng.abort(fut.rid)

    fut, aborted = eng.call_in_engine_thread(submit_and_abort)
    res = fut.result(timeout=60)
    first, second = res.meta["steps"]
    assert aborted is True and res.finish_reason == second.finish_reason == "abort"
    assert (first.text, first.finish_reason, first.matched_stop) == ("x", "stop", "y")
    assert second.token_ids == [] and res.meta["chain_text"] == "x and"
    for _ in range(3):  # loop turns: a queued step would run now
        eng.call_in_engine_thread(lambda: None)
    assert eng.stats()["forward_calls"] == before and eng.stats()["pool"]["used"] == 0
    assert not eng.call_in_engine_thread(eng.scheduler.has_work)
