"""Engine API behaviour: stops, streaming, threads, scoring, logprobs, bad input."""

from __future__ import annotations

import json
import random
import threading
import weakref

import pytest
import torch
from hf_fixtures import hf_greedy

from llmir_lang import errors
from llmir_lang.executor.engine import Engine, parse_memory
from llmir_lang.executor.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def setup(checkpoints):
    folder, hf = checkpoints("llama")
    eng = Engine(str(folder), device="cpu", kv_memory="8MB")
    yield eng, hf, folder
    eng.shutdown()


IDS = [5, 17, 42, 99, 3, 7, 250, 11]


def test_stop_token_and_min_new_tokens(setup):
    eng, hf, _ = setup
    ref = hf_greedy(hf, IDS, 12)[0]
    stop_tok = ref[3]
    first = ref.index(stop_tok)
    r = eng.generate(IDS, {"max_new_tokens": 12, "stop_token_ids": [stop_tok]})
    assert r.finish_reason == "stop" and r.matched_stop == stop_tok
    assert r.token_ids == ref[: first + 1]
    # min_new_tokens bans the stop token until enough tokens exist
    r2 = eng.generate(IDS, {"max_new_tokens": 12, "stop_token_ids": [stop_tok], "min_new_tokens": 12})
    assert len(r2.token_ids) == 12 and stop_tok not in r2.token_ids


def test_stop_string_straddling_tokens(setup):
    eng, _, _ = setup
    full = eng.generate(IDS, {"max_new_tokens": 24, "ignore_eos": True})
    text = full.text
    assert len(text) >= 6
    # a stop string that starts inside one token's text and ends inside a later one
    toks = [eng.tokenizer.decode([t]) for t in full.token_ids]
    lens = [len(t) for t in toks]
    i = next(k for k in range(len(toks) - 1) if lens[k] >= 2 and lens[k + 1] >= 1)
    start = sum(lens[:i]) + lens[i] - 1
    stop = text[start : start + 2]
    r = eng.generate(IDS, {"max_new_tokens": 24, "ignore_eos": True, "stop": [stop]})
    assert r.finish_reason == "stop" and r.matched_stop == stop
    assert r.text == text[: text.find(stop)]


def test_streaming_iterator_and_callback(setup):
    eng, _, _ = setup
    full = eng.generate(IDS, {"max_new_tokens": 16, "ignore_eos": True})
    chunks = list(eng.generate(IDS, {"max_new_tokens": 16, "ignore_eos": True}, stream=True))
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    assert "".join(c.text for c in chunks) == full.text
    assert sum((c.token_ids for c in chunks), []) == full.token_ids
    seen: list[str] = []
    lock = threading.Lock()

    def cb(chunk):
        with lock:
            seen.append(chunk.text)

    eng.generate([IDS, IDS[:4]], {"max_new_tokens": 8, "ignore_eos": True}, callback=cb)
    assert len(seen) >= 2


def test_streamed_text_never_shows_a_stop_string(setup):
    eng, _, _ = setup
    full = eng.generate(IDS, {"max_new_tokens": 24, "ignore_eos": True}).text
    stop = full[5:8]
    chunks = list(eng.generate(IDS, {"max_new_tokens": 24, "ignore_eos": True, "stop": [stop]}, stream=True))
    streamed = "".join(c.text for c in chunks)
    assert streamed == full[: full.find(stop)]


def test_stop_regex_cuts_at_the_earliest_match_and_the_stream_never_shows_it(setup):
    import re

    eng, _, _ = setup
    full = eng.generate(IDS, {"max_new_tokens": 24, "ignore_eos": True})
    text = full.text
    # a pattern that matches a piece of the output spanning several tokens, and one that never does
    pat = re.escape(text[6]) + "." + re.escape(text[8:10])
    want = text[: re.search(pat, text).start()]
    params = {"max_new_tokens": 24, "ignore_eos": True, "stop_regex": ["\\A(?!)", pat]}
    r = eng.generate(IDS, params)
    assert r.finish_reason == "stop" and r.matched_stop == pat
    assert r.text == want
    # it ended at the first token whose text completes the match, not later
    # (the text so far: a prefix's decoded text less an incomplete character at its end)
    ends = [len(eng.tokenizer.decode(full.token_ids[: k + 1]).rstrip("\ufffd")) for k in range(len(full.token_ids))]
    assert len(r.token_ids) == next(k + 1 for k, e in enumerate(ends) if re.search(pat, text[:e]))
    assert r.token_ids == full.token_ids[: len(r.token_ids)]
    chunks = list(eng.generate(IDS, params, stream=True))
    assert "".join(c.text for c in chunks) == want and chunks[-1].finish_reason == "stop"
    # with a stop string that starts later, the regex's earlier match wins (and the other way)
    late = text[12:14]
    r2 = eng.generate(IDS, {**params, "stop": [late]})
    assert r2.text == want and r2.matched_stop == pat
    early = text[1:3]
    r3 = eng.generate(IDS, {**params, "stop": [early]})
    assert r3.text == text[: text.find(early)] and r3.matched_stop == early


def test_stop_regex_with_min_new_tokens_skips_matches_in_the_held_text(setup):
    import re

    eng, _, _ = setup
    full = eng.generate(IDS, {"max_new_tokens": 24, "ignore_eos": True})
    text = full.text
    ch = text[2]
    pat = re.escape(ch)
    later = [i for i in range(3, len(text)) if text[i] == ch]
    r = eng.generate(IDS, {"max_new_tokens": 24, "ignore_eos": True, "stop_regex": pat, "min_new_tokens": 20})
    held = len(eng.tokenizer.decode(full.token_ids[:19]))  # the text before the 20th token
    firsts = [i for i in later if i >= held] if later else []
    if firsts:  # the first match that ends in the 20th token's text or after
        assert r.finish_reason == "stop" and r.text == text[: firsts[0]]
    else:
        assert r.finish_reason == "length" and r.text == text
    assert len(r.token_ids) >= 20


def test_stop_regex_bad_patterns_are_refused_at_submission(setup):
    eng, _, _ = setup
    cases = (
        ("(unclosed", "does not parse"), ("x*", "empty string"), ("", "non-empty"), (3, "non-empty"),
        (r"\p{Lu}", "does not parse"),  # the regex module's, not Python's re (nor SGLang's)
        ("[[:digit:]]", "reads differently"),
    )  # fmt: skip
    for bad, why in cases:
        with pytest.raises(errors.InvalidRequestError, match=why):
            eng.generate(IDS, {"max_new_tokens": 4, "stop_regex": bad})
    assert SamplingParams(stop_regex="a+b").stop_regex == ["a+b"]


def test_many_threads_submit_concurrently(setup):
    eng, hf, _ = setup
    rng = random.Random(7)
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randrange(2, 30))] for _ in range(12)]
    out: dict[int, list[int]] = {}

    def work(i):
        out[i] = eng.generate(prompts[i], {"max_new_tokens": 8, "ignore_eos": True}).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, p in enumerate(prompts):
        assert out[i] == hf_greedy(hf, p, 8)[0]


def test_score_shares_prompt_kv(setup):
    eng, hf, _ = setup
    prompt = [rng for rng in range(10, 50)]
    conts = [[7, 8, 9], [7, 8, 100], [200]]
    before = eng.stats()["tokens_computed"]
    scores = eng.score(prompt, conts)
    computed = eng.stats()["tokens_computed"] - before
    # the prompt once (40; its last position scores every first token), then only the tokens of
    # each continuation longer than one token, over the cached prompt; [200] costs nothing more
    assert computed == 40 + sum(len(c) for c in conts if len(c) > 1)
    with torch.no_grad():
        for c, s in zip(conts, scores):
            logits = hf(torch.tensor([prompt + c])).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            ref = [lp[len(prompt) - 1 + j, c[j]].item() for j in range(len(c))]
            assert len(s) == len(c)
            assert max(abs(a - b) for a, b in zip(s, ref)) <= 1e-4


def test_score_async_equals_score_and_waits_on_no_thread(setup):
    eng, _, _ = setup
    prompt = list(range(60, 90))
    conts = [[7, 8, 9], [7, 8, 100], [200], [5, 6]]
    ref = eng.score(prompt, conts)
    eng.flush_cache()
    threads = threading.active_count()
    futs = [eng.score_async(prompt, conts) for _ in range(3)]  # submitted together, none waits
    assert threading.active_count() == threads
    for f in futs:  # the same numbers, up to the float noise of another batch shape
        got = f.result(timeout=60)
        assert [len(x) for x in got] == [len(x) for x in ref]
        assert max(abs(a - b) for x, y in zip(got, ref) for a, b in zip(x, y)) <= 1e-4
    assert eng.score_async(prompt, []).result(timeout=5) == []


def test_score_async_bad_input_raises_at_the_call_and_cancel_aborts(setup):
    eng, _, _ = setup
    with pytest.raises(errors.InvalidRequestError, match="at least one token"):
        eng.score_async([5, 6, 7], [[1], []])
    with pytest.raises(errors.EmptyPromptError):
        eng.score_async([], [[1]])
    # cancelled while the engine thread is busy: its requests are aborted before they run
    gate = threading.Event()
    busy = threading.Thread(target=eng.call_in_engine_thread, args=(lambda: gate.wait(30),))
    busy.start()
    try:
        before = eng.runner.num_forward_calls
        fut = eng.score_async(list(range(100, 160)), [[1, 2, 3], [4, 5]])
        assert fut.cancel() and fut.cancelled()
    finally:
        gate.set()
        busy.join()
    assert eng.score([5, 6, 7], [[1]])[0]  # the engine goes on
    assert eng.runner.num_forward_calls == before + 1  # the cancelled requests never ran
    eng.flush_cache()
    assert eng.stats()["pool"]["used"] == 0


def test_prompt_logprobs_and_top_logprobs(setup):
    eng, hf, _ = setup
    r = eng.generate(
        IDS,
        {"max_new_tokens": 4, "return_prompt_logprob": True, "return_logprob": True, "top_logprobs_num": 3},
    )
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([IDS])).logits[0].float(), -1)
    ref = [(IDS[i + 1], lp[i, IDS[i + 1]].item()) for i in range(len(IDS) - 1)]
    assert [t for t, _ in r.prompt_logprobs] == [t for t, _ in ref]
    assert max(abs(a[1] - b[1]) for a, b in zip(r.prompt_logprobs, ref)) <= 1e-4
    assert len(r.top_logprobs) == 4 and all(len(t) == 3 for t in r.top_logprobs)
    assert r.top_logprobs[0][0][0] == r.token_ids[0]  # greedy token is the best one


def test_zero_new_tokens_report_the_next_tokens_top_logprobs(setup):
    eng, hf, _ = setup
    r = eng.generate(IDS, {"max_new_tokens": 0, "return_logprob": True, "top_logprobs_num": 3})
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([IDS])).logits[0, -1].float(), -1)
    vals, ids = torch.topk(lp, 3)
    assert r.token_ids == [] and r.logprobs == [] and len(r.top_logprobs) == 1
    assert [t for t, _ in r.top_logprobs[0]] == ids.tolist()
    assert max(abs(a - b) for (_, a), b in zip(r.top_logprobs[0], vals.tolist())) <= 1e-4
    # without top_logprobs_num: nothing, as for any generation
    assert eng.generate(IDS, {"max_new_tokens": 0, "return_logprob": True}).top_logprobs is None


def test_seeded_sampling_is_reproducible(setup):
    eng, _, _ = setup
    p = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 123, "ignore_eos": True}
    a = eng.generate(IDS, p).token_ids
    b = eng.generate([IDS, IDS[:3], IDS], [p, {**p, "seed": 5}, p])
    assert b[0].token_ids == a and b[2].token_ids == a


def test_text_prompt_and_chat_template(setup):
    eng, _, _ = setup
    r = eng.generate("the quick brown fox", {"max_new_tokens": 4})
    assert r.prompt_tokens == len(eng.tokenizer.encode("the quick brown fox"))
    text = eng.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "params, exc",
    [
        ({"max_new_tokens": -1}, errors.InvalidRequestError),
        ({"temperature": -0.5}, errors.InvalidRequestError),
        ({"top_p": 0.0}, errors.InvalidRequestError),
        ({"top_p": 1.5}, errors.InvalidRequestError),
        ({"bogus": 1}, errors.InvalidRequestError),
    ],
)
def test_bad_sampling_params(setup, params, exc):
    eng, _, _ = setup
    with pytest.raises(exc) as e:
        eng.generate(IDS, params)
    assert str(e.value)


def test_bad_prompts_and_engine_keeps_serving(setup):
    eng, hf, _ = setup
    with pytest.raises(errors.EmptyPromptError):
        eng.generate([], {"max_new_tokens": 2})
    with pytest.raises(errors.EmptyPromptError):
        eng.generate("", {"max_new_tokens": 2})
    with pytest.raises(errors.PromptTooLongError):
        eng.generate([1] * 600, {"max_new_tokens": 2})
    with pytest.raises(errors.InvalidRequestError):
        eng.generate([1, 2, 10_000], {"max_new_tokens": 2})
    assert eng.generate(IDS, {"max_new_tokens": 5, "ignore_eos": True}).token_ids == hf_greedy(hf, IDS, 5)[0]


def test_request_too_big_for_pool(checkpoints):
    folder, _ = checkpoints("llama")
    with Engine(str(folder), device="cpu", kv_memory=64 * 512) as eng:
        with pytest.raises(errors.OutOfKVMemoryError, match="kv_memory"):
            eng.generate([1] * 40, {"max_new_tokens": 40})


def test_checkpoint_errors(tmp_path, checkpoints):
    with pytest.raises(errors.CheckpointError):
        Engine(str(tmp_path / "missing"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.CheckpointError, match="config.json"):
        Engine(str(tmp_path / "empty"), device="cpu")
    bad = tmp_path / "arch"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(errors.UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        Engine(str(bad), device="cpu")
    folder, _ = checkpoints("llama")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in folder.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    st = corrupt / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(errors.CheckpointError, match="corrupt"):
        Engine(str(corrupt), device="cpu")


def test_parse_memory():
    cpu = torch.device("cpu")
    assert parse_memory("512MB", cpu) == 512_000_000
    assert parse_memory("2GiB", cpu) == 2 * 2**30
    assert parse_memory(1000, cpu) == 1000
    with pytest.raises(errors.InvalidRequestError):
        parse_memory("lots", cpu)


def test_sampling_params_object_and_shutdown(checkpoints):
    folder, _ = checkpoints("llama")
    eng = Engine(str(folder), device="cpu", kv_memory="4MB")
    r = eng.generate(IDS, SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert r.completion_tokens == 3
    eng.shutdown()
    with pytest.raises(errors.EngineClosedError):
        eng.generate(IDS, {"max_new_tokens": 2})


def test_engines_left_running_are_stopped_at_interpreter_exit(checkpoints, monkeypatch):
    """The atexit hook stops engines nobody shut down: their daemon thread must not be inside
    native code while the process tears down (it aborted with exit code 134 in about one script
    of five)."""
    from llmir_lang.executor import engine as engine_module

    folder, _ = checkpoints("llama")
    eng = Engine(str(folder), device="cpu", kv_memory="4MB")
    assert eng in engine_module._LIVE and eng._thread.is_alive()
    only = weakref.WeakSet([eng])  # the hook stops every live engine: not the module's others
    monkeypatch.setattr(engine_module, "_LIVE", only)
    engine_module._shutdown_live_engines()
    assert not eng._thread.is_alive()
    with pytest.raises(errors.EngineClosedError):
        eng.generate(IDS, {"max_new_tokens": 2})


def test_abort_frees_the_request(setup):
    eng, _, _ = setup
    seen = []
    fut = eng.submit(IDS, {"max_new_tokens": 400, "ignore_eos": True}, stream=seen.append)
    import time

    deadline = time.time() + 30
    while not seen and time.time() < deadline:
        time.sleep(0.01)
    assert eng.abort(fut.rid)
    res = fut.result(timeout=30)
    assert res.finish_reason == "abort" and res.completion_tokens < 400
    assert not eng.abort(fut.rid)
    stats = eng.stats()
    assert stats["cache"]["protected_tokens"] == 0
    assert stats["pool"]["used"] == stats["cache"]["cached_tokens"]


def test_internal_error_fails_requests_and_engine_recovers(checkpoints, monkeypatch):
    folder, hf = checkpoints("llama")
    with Engine(str(folder), device="cpu", kv_memory="4MB") as eng:
        calls = {"n": 0}
        orig = eng.scheduler.schedule

        def broken():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected scheduler bug")
            return orig()

        monkeypatch.setattr(eng.scheduler, "schedule", broken)
        with pytest.raises(errors.EngineError, match="injected scheduler bug"):
            eng.generate(IDS, {"max_new_tokens": 8, "ignore_eos": True})
        r = eng.generate(IDS, {"max_new_tokens": 5, "ignore_eos": True})
        assert r.token_ids == hf_greedy(hf, IDS, 5)[0]


def test_sharded_checkpoint_and_half_precision(tmp_path, checkpoints):
    """A checkpoint split over several safetensors files with an index loads; bf16/fp16 run."""
    folder, hf = checkpoints("qwen2")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(str(sharded), safe_serialization=True, max_shard_size="40KB")
    for f in folder.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (sharded / f.name).write_bytes(f.read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    with Engine(str(sharded), device="cpu", kv_memory="4MB") as eng:
        assert eng.generate(IDS, {"max_new_tokens": 6, "ignore_eos": True}).token_ids == hf_greedy(hf, IDS, 6)[0]
    for dtype in ("bf16", "fp16"):
        with Engine(str(folder), device="cpu", dtype=dtype, kv_memory="4MB") as eng:
            assert eng.pool.k_buffers[0].dtype == (torch.bfloat16 if dtype == "bf16" else torch.float16)
            r = eng.generate(IDS, {"max_new_tokens": 4, "ignore_eos": True, "return_logprob": True})
            assert r.completion_tokens == 4
            # the first greedy token agrees with fp32 transformers on these weights
            assert r.token_ids[0] == hf_greedy(hf, IDS, 1)[0][0]


def test_an_aborted_scoring_request_raises_instead_of_returning_partial_scores(setup):
    from concurrent.futures import Future

    from llmir_lang.errors import EngineError
    from llmir_lang.executor.request import GenerateResult

    eng, _, _ = setup
    fut: Future = Future()
    fut.set_result(GenerateResult(rid=0, text="", token_ids=[], finish_reason="abort", prompt_tokens=3,
                                  completion_tokens=0, cached_tokens=0))  # fmt: skip
    with pytest.raises(EngineError, match="abort"):
        eng._scored(fut)


# ---- audit fixes: typed input errors, waits on the engine thread, streams, dropped engines ------
@pytest.mark.parametrize(
    "params",
    [
        {"top_k": True, "temperature": 1.0},  # crashed the step (topk(True)) and its batch mates
        {"top_logprobs_num": 2.5, "return_logprob": True},  # the same, in torch.topk
        {"top_logprobs_num": "2"},
        {"max_new_tokens": True},  # ran as 1 token
        {"min_new_tokens": False},
        {"seed": True},
        {"seed": 2**70},
        {"seed": 1.5},
        {"stop": 5},
        {"stop": ["ok", 3]},
        {"stop_token_ids": [True]},
        {"stop_token_ids": 7},
        {"ignore_eos": "no"},
        {"return_logprob": 1},
        {"temperature": "0.5"},
    ],
)
def test_params_of_a_wrong_type_are_refused_at_submit(setup, params):
    eng, _, _ = setup
    with pytest.raises(errors.InvalidRequestError, match=next(iter(params))):
        eng.submit(IDS, params)
    sp = SamplingParams(max_new_tokens=2)
    for name, value in params.items():  # set after construction: submit validates again
        setattr(sp, name, value)
    with pytest.raises(errors.InvalidRequestError):
        eng.submit(IDS, sp)


def test_params_that_are_not_a_dict_and_prompts_that_are_not_ids_are_typed_errors(setup):
    eng, _, _ = setup
    with pytest.raises(errors.InvalidRequestError, match="dict"):
        eng.generate(IDS, 5)
    with pytest.raises(errors.InvalidRequestError, match="float"):
        eng.generate([1.0, 2.0], {"max_new_tokens": 2})
    with pytest.raises(errors.InvalidRequestError):
        eng.generate(5, {"max_new_tokens": 2})
    with pytest.raises(errors.InvalidRequestError, match="1-D"):
        eng.generate(torch.tensor([IDS]), {"max_new_tokens": 2})
    with pytest.raises(errors.InvalidRequestError, match="integers"):
        eng.generate(torch.tensor([1.0, 2.0]), {"max_new_tokens": 2})
    # a batch with one bad prompt queues none of them
    before = eng.stats()["tokens_computed"]
    with pytest.raises(errors.InvalidRequestError):
        eng.generate([IDS, [1, "x"]], {"max_new_tokens": 2})
    assert eng.stats()["tokens_computed"] == before


def test_tensor_and_numpy_prompts_are_one_prompt(setup):
    import numpy as np

    eng, _, _ = setup
    p = {"max_new_tokens": 4, "ignore_eos": True}
    ref = eng.generate(IDS, p).token_ids
    assert eng.generate(torch.tensor(IDS), p).token_ids == ref
    assert eng.generate(np.array(IDS), p).token_ids == ref
    assert eng.generate(np.array(IDS, dtype=np.uint16), p).token_ids == ref
    assert eng.submit(torch.tensor(IDS), p).result(timeout=60).token_ids == ref
    batch = eng.generate([torch.tensor(IDS), np.array(IDS[:4])], p)
    assert batch[0].token_ids == ref and len(batch) == 2


def test_top_logprobs_num_implies_return_logprob(setup):
    eng, _, _ = setup
    r = eng.generate(IDS, {"max_new_tokens": 3, "top_logprobs_num": 2})
    assert r.logprobs is not None and len(r.logprobs) == 3
    assert r.top_logprobs is not None and all(len(t) == 2 for t in r.top_logprobs)
    assert SamplingParams(top_logprobs_num=1).return_logprob


def test_a_tiny_temperature_is_greedy(setup):
    eng, hf, _ = setup
    ref = hf_greedy(hf, IDS, 6)[0]
    for temp in (1e-45, 1e-40, 1e-9):
        r = eng.generate(IDS, {"max_new_tokens": 6, "ignore_eos": True, "temperature": temp, "seed": 3})
        assert r.token_ids == ref  # 1e-45 overflowed to inf, the softmax to NaN, the token to 0


def test_waiting_in_a_stream_callback_raises_instead_of_deadlocking(checkpoints):
    folder, hf = checkpoints("llama")
    with Engine(str(folder), device="cpu", kv_memory="4MB") as eng:
        caught: dict[str, BaseException] = {}
        nested: list = []

        def cb(chunk):
            if caught:
                return
            calls = {
                "generate": lambda: eng.generate(IDS, {"max_new_tokens": 2}),
                "result": lambda: eng.submit(IDS, {"max_new_tokens": 2}).result(),
                "exception": lambda: eng.submit(IDS, {"max_new_tokens": 2}).exception(timeout=5),
                "score": lambda: eng.score(IDS, [[5]]),
                "stream": lambda: next(eng.generate(IDS, {"max_new_tokens": 2}, stream=True)),
            }
            for name, call in calls.items():
                try:
                    call()
                except BaseException as e:  # noqa: BLE001 - recorded for the assertions below
                    caught[name] = e
            nested.append(eng.submit(IDS, {"max_new_tokens": 3, "ignore_eos": True}))  # no wait: fine
            nested.append(eng.stats())  # runs in place

        r = eng.submit(IDS, {"max_new_tokens": 4, "ignore_eos": True}, stream=cb).result(timeout=60)
        assert r.completion_tokens == 4
        assert set(caught) == {"generate", "result", "exception", "score", "stream"}
        for e in caught.values():
            assert isinstance(e, errors.EngineError) and "engine's own thread" in str(e)
        assert nested[0].result(timeout=60).token_ids == hf_greedy(hf, IDS, 3)[0]
        assert eng.generate(IDS, {"max_new_tokens": 2}).completion_tokens == 2  # still serving


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_running_requests": 0}, "max_running_requests"),  # every request waited forever
        ({"max_running_requests": -1}, "max_running_requests"),
        ({"max_prefill_tokens": -1}, "max_prefill_tokens"),  # also forever
        ({"max_prefill_tokens": 0}, "max_prefill_tokens"),
        ({"chunked_prefill_size": -5}, "chunked_prefill_size"),  # failed every request
        ({"page_size": 0}, "page_size"),  # ZeroDivisionError
        ({"page_size": 3.5}, "page_size"),  # TypeError
        ({"page_size": True}, "page_size"),
        ({"max_mixed_extend": 1.0}, "max_mixed_extend"),
        ({"speculative_draft_tokens": -1}, "speculative_draft_tokens"),
        ({"seed": "x"}, "seed"),
        ({"jump_forward": "no"}, "jump_forward"),
        ({"run_ahead": 1}, "run_ahead"),
        ({"attention_backend": "flash"}, "attention_backend"),
        ({"dtype": "int8"}, "dtype"),  # a plain ValueError
        ({"device": "tpu"}, "device"),  # RuntimeError from torch
        ({"device": 5}, "device"),
        ({"kv_memory": "5ib"}, "kv_memory"),  # ValueError: substring not found
        ({"kv_memory": float("nan")}, "kv_memory"),
    ],
)
def test_bad_engine_arguments_are_refused(checkpoints, kwargs, name):
    folder, _ = checkpoints("llama")
    with pytest.raises(errors.InvalidRequestError, match=name):
        Engine(str(folder), **{"device": "cpu", **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_a_typed_error(checkpoints):
    folder, _ = checkpoints("llama")
    with pytest.raises(errors.InvalidRequestError, match="CUDA is not available"):
        Engine(str(folder), device="cuda")  # an AssertionError deep in torch


def test_an_engine_dropped_without_shutdown_is_freed(checkpoints):
    """The engine thread held the engine (its target was the bound loop), so an engine nobody shut
    down kept its thread, model and KV pool for the life of the process."""
    import gc
    import time

    from llmir_lang.executor import engine as engine_module

    folder, _ = checkpoints("llama")
    eng = Engine(str(folder), device="cpu", kv_memory="4MB")
    eng.generate(IDS, {"max_new_tokens": 2})
    running = eng.submit(IDS, {"max_new_tokens": 400, "ignore_eos": True})
    ref, thread = weakref.ref(eng), eng._thread
    del eng
    deadline = time.time() + 30
    while (ref() is not None or thread.is_alive()) and time.time() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert ref() is None and not thread.is_alive()
    assert all(e is not None for e in engine_module._LIVE)  # the dropped one left the registry
    with pytest.raises(errors.EngineClosedError):
        running.result(timeout=30)


def test_closing_or_dropping_a_stream_aborts_its_request(setup):
    import gc
    import time

    eng, _, _ = setup

    def live() -> list[int]:
        return eng.call_in_engine_thread(lambda: [r.rid for r in eng.scheduler.all_requests()])

    def gone(rid: int) -> bool:
        deadline = time.time() + 30
        while rid in live() and time.time() < deadline:
            time.sleep(0.01)
        return rid not in live()

    params = {"max_new_tokens": 400, "ignore_eos": True}
    it = eng.generate(IDS, params, stream=True)
    next(it)
    it.close()
    assert gone(it.rid)
    with pytest.raises(StopIteration):
        next(it)
    it = eng.generate(IDS, params, stream=True)
    next(it)
    rid = it.rid
    del it
    gc.collect()
    assert gone(rid)
    for chunk in eng.generate(IDS, params, stream=True):  # leaving a for loop early
        rid = chunk.rid
        break
    gc.collect()
    assert gone(rid)


def test_a_stream_raises_what_generate_raises(checkpoints, monkeypatch):
    import threading as th

    folder, _ = checkpoints("llama")
    with Engine(str(folder), device="cpu", kv_memory="4MB") as eng:
        orig = eng.runner.run
        calls = {"n": 0}

        def broken(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected step failure")
            return orig(*a, **kw)

        monkeypatch.setattr(eng.runner, "run", broken)
        chunks = []
        with pytest.raises(errors.EngineError, match="injected step failure"):
            for c in eng.generate(IDS, {"max_new_tokens": 8, "ignore_eos": True}, stream=True):
                chunks.append(c)  # it ended quietly with finish_reason "error" before
        assert chunks and not chunks[-1].finished
        monkeypatch.undo()
        it = eng.generate(IDS, {"max_new_tokens": 400, "ignore_eos": True}, stream=True)
        next(it)
        th.Thread(target=eng.shutdown).start()
        with pytest.raises(errors.EngineClosedError):  # as generate() raises; it ended with "abort"
            for _ in it:
                pass


def test_kv_memory_forms(checkpoints):
    cpu = torch.device("cpu")
    import psutil

    avail = psutil.virtual_memory().available
    # a fraction is a fraction whether it is a float or a string; 1 is all of it, not one byte
    for half in (0.5, "0.5", " .5 "):
        assert parse_memory(half, cpu) == pytest.approx(avail / 2, rel=0.1)
    for whole in (1, 1.0, "1", "1.0"):
        assert parse_memory(whole, cpu) == pytest.approx(avail, rel=0.1)
    assert parse_memory(1.5, cpu) == 1 and parse_memory("100", cpu) == 100
    assert parse_memory("1e6", cpu) == 1_000_000 and parse_memory("64 KiB", cpu) == 65536
    assert parse_memory("1b", cpu) == 1
    for bad in ("0", 0, -5, "-1", "5ib", "1..5GB", ".", float("nan"), float("inf"), "inf", True, "0.5b", [1]):
        with pytest.raises(errors.InvalidRequestError, match="kv_memory"):
            parse_memory(bad, cpu)


def test_malformed_config_json_is_a_checkpoint_error(tmp_path, checkpoints):
    folder, _ = checkpoints("llama")
    good = json.loads((folder / "config.json").read_text())
    for name, text in (
        ("list", "[1, 2]"),  # AttributeError: 'list' object has no attribute 'get'
        ("field", json.dumps({**good, "hidden_size": "sixty-four"})),  # ValueError from int()
        ("zero", json.dumps({**good, "num_attention_heads": 0})),
    ):
        bad = tmp_path / name
        bad.mkdir()
        for f in folder.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        (bad / "config.json").write_text(text)
        with pytest.raises(errors.CheckpointError, match="config.json") as e:
            Engine(str(bad), device="cpu", kv_memory="4MB")
        if name != "list":
            assert "hidden_size" in str(e.value) or "num_attention_heads" in str(e.value)


def test_a_prompt_that_is_not_valid_unicode_is_refused(setup):
    eng, _, _ = setup
    with pytest.raises(errors.InvalidRequestError, match=r"lone surrogate \(U\+D800\) at position 3"):
        eng.generate("abc\ud800", {"max_new_tokens": 2})
    assert eng.generate("abc", {"max_new_tokens": 2}).finish_reason in ("length", "stop")
