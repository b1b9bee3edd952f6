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
