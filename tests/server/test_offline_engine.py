"""SGLang's offline APIs: ``Engine`` (``llmir_lang.server.offline_engine``) and ``Runtime.generate`` /
``async_generate`` / ``encode``, on the bundled model. Their answers are the server's ``/generate``
answers for the same request (checked against an in-process server)."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import llmir_lang as llmir
from llmir_lang.dsl.errors import FeatureNotSupportedError
from llmir_lang.errors import (
    ConstraintError,
    EngineClosedError,
    InvalidRequestError,
    NotYetSupportedError,
    PromptTooLongError,
)
from llmir_lang.server.offline_engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from server_harness import InProcessServer, arithmetic_prompt  # noqa: E402

GREEDY = {"temperature": 0, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def llm():
    torch.set_num_threads(1)
    with Engine(kv_memory="64MB", device="cpu") as engine:
        yield engine


@pytest.fixture(scope="module")
def server():
    from llmir_lang.executor.engine import Engine as ExecutorEngine

    srv = InProcessServer(ExecutorEngine(kv_memory="64MB", device="cpu"))
    yield srv
    srv.close()


def _no_ids(answer):
    """An answer without what differs between two engines: the request id and the prompt tokens
    found in the cache."""
    if isinstance(answer, list):
        return [_no_ids(a) for a in answer]
    meta = {k: v for k, v in answer["meta_info"].items() if k not in ("id", "cached_tokens")}
    return {**answer, "meta_info": meta}


# --- generate ------------------------------------------------------------------------------
def test_batch_equals_one_by_one_and_runs_batched(llm):
    prompts = [arithmetic_prompt(i) for i in range(4)]
    before = llm.engine.stats()["steps"]
    batch = llm.generate(prompts, GREEDY)
    steps = llm.engine.stats()["steps"] - before
    assert isinstance(batch, list) and len(batch) == 4
    # one request after the other would take at least 4 x 8 decode steps
    assert steps <= GREEDY["max_new_tokens"] + 3, steps
    singles = [llm.generate(p, GREEDY) for p in prompts]
    assert _no_ids(batch) == _no_ids(singles)
    # token ids as the prompt, one list or a batch of them, answer the same
    ids = [llm.engine.encode(p) for p in prompts]
    assert _no_ids(llm.generate(input_ids=ids, sampling_params=GREEDY)) == _no_ids(batch)
    assert _no_ids(llm.generate(input_ids=ids[1], sampling_params=GREEDY)) == _no_ids(batch[1])
    # one sampling_params per prompt
    per_prompt = llm.generate(prompts[:2], [GREEDY, {**GREEDY, "max_new_tokens": 2}])
    assert [a["meta_info"]["completion_tokens"] for a in per_prompt] == [8, 2]


def test_meta_info_fields(llm):
    out = llm.generate(arithmetic_prompt(3), {**GREEDY, "stop": ["\n"]})
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert set(meta) == {"id", "prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason"}
    assert meta["finish_reason"] == {"type": "stop", "matched": "\n"}
    assert meta["prompt_tokens"] == len(llm.engine.encode(arithmetic_prompt(3)))
    assert meta["completion_tokens"] == len(out["output_ids"])
    assert out["text"] == llm.engine.tokenizer.decode(out["output_ids"]).removesuffix("\n")
    long = llm.generate(arithmetic_prompt(3), {**GREEDY, "max_new_tokens": 3})
    assert long["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    assert llm.generate(arithmetic_prompt(3), GREEDY, rid="mine")["meta_info"]["id"] == "mine"


def test_logprobs_shapes(llm):
    prompt = arithmetic_prompt(4)
    n_prompt = len(llm.engine.encode(prompt))
    out = llm.generate(prompt, GREEDY, return_logprob=True, top_logprobs_num=3, logprob_start_len=2)
    meta = out["meta_info"]
    n = meta["completion_tokens"]
    assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(e[0] <= 0 and e[2] is None for e in meta["output_token_logprobs"])
    assert len(meta["output_top_logprobs"]) == n and all(len(top) == 3 for top in meta["output_top_logprobs"])
    # greedy: the chosen token is the most likely one
    assert [top[0][1] for top in meta["output_top_logprobs"]] == out["output_ids"]
    inputs = meta["input_token_logprobs"]
    assert len(inputs) == n_prompt - 2 and inputs[0][0] is None and all(e[0] <= 0 for e in inputs[1:])
    with_text = llm.generate(prompt, GREEDY, return_logprob=True, return_text_in_logprobs=True)
    texts = [e[2] for e in with_text["meta_info"]["output_token_logprobs"]]
    assert "".join(texts).startswith(with_text["text"][:1]) and all(isinstance(t, str) for t in texts)
    assert "input_token_logprobs" not in with_text["meta_info"]  # logprob_start_len: -1 by default
    plain = llm.generate(prompt, GREEDY)
    assert "output_token_logprobs" not in plain["meta_info"]


def test_constraints_in_sampling_params(llm):
    out = llm.generate(arithmetic_prompt(5), {**GREEDY, "regex": "[0-9]{3}"})
    assert len(out["text"]) == 3 and out["text"].isdigit()
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    sp = {"temperature": 0, "max_new_tokens": 32, "json_schema": json.dumps(schema)}
    out = llm.generate("JSON: ", sp)
    assert out["meta_info"]["finish_reason"]["type"] == "stop", out
    assert isinstance(json.loads(out["text"])["a"], int)
    out = llm.generate("Answer: ", {"temperature": 0, "max_new_tokens": 4, "ebnf": 'root ::= "yes" | "no"'})
    assert out["text"] in ("yes", "no")


# --- streaming ------------------------------------------------------------------------------
def test_stream_chunks_hold_the_text_so_far_and_end_with_the_answer(llm):
    plain = llm.generate(arithmetic_prompt(6), GREEDY)
    chunks = list(llm.generate(arithmetic_prompt(6), GREEDY, stream=True))
    assert len(chunks) >= 3
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative, as SGLang's
    assert _no_ids(chunks[-1]) == _no_ids(plain)
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    # the SGLang way to print a stream: the text past what was printed
    printed, offset = "", 0
    for c in chunks:
        printed += c["text"][offset:]
        offset = len(c["text"])
    assert printed == plain["text"]


def test_stream_output_gives_disjoint_pieces(llm):
    plain = llm.generate(arithmetic_prompt(6), GREEDY)
    pieces = Engine.over(llm.engine, stream_output=True)
    try:
        chunks = list(pieces.generate(arithmetic_prompt(6), GREEDY, stream=True))
    finally:
        pieces.shutdown()
    assert "".join(c["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["output_ids"] == plain["output_ids"]


LONG = {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True}


def _wait_for_aborts(llm, before: int, n: int) -> None:
    deadline = time.monotonic() + 10
    while llm.engine.stats()["requests"]["finished"].get("abort", 0) < before + n:
        assert time.monotonic() < deadline, "a request left early was not aborted"
        time.sleep(0.05)


def test_leaving_a_stream_early_aborts_its_request(llm):
    before = llm.engine.stats()["requests"]["finished"].get("abort", 0)
    stream = llm.generate(arithmetic_prompt(1), LONG, stream=True)
    next(stream)
    stream.close()
    with llm.generate(arithmetic_prompt(2), LONG, stream=True) as stream:
        next(stream)
    llm.generate(arithmetic_prompt(3), LONG, stream=True)  # dropped before reading a chunk

    async def main():
        stream = await llm.async_generate(arithmetic_prompt(4), LONG, stream=True)
        await stream.__anext__()
        await stream.aclose()

    asyncio.run(main())
    _wait_for_aborts(llm, before, 4)


def test_an_interrupt_or_cancel_landing_after_a_chunk_came_aborts_the_stream(llm, monkeypatch):
    # the read's task had finished when it landed (Ctrl-C, a task cancelled between two chunks:
    # 9 cancels in 40 did), so cancelling it stopped nothing; the stream object is still held
    before = llm.engine.stats()["requests"]["finished"].get("abort", 0)
    runner = llm._runner
    real_call, real_acall = runner.call, runner.acall

    def interrupted(coro):
        real_call(coro)
        raise KeyboardInterrupt

    async def cancelled(coro):
        await real_acall(coro)
        raise asyncio.CancelledError

    stream = llm.generate(arithmetic_prompt(1), LONG, stream=True)
    next(stream)
    monkeypatch.setattr(runner, "call", interrupted)
    with pytest.raises(KeyboardInterrupt):
        next(stream)
    monkeypatch.undo()

    async def main():
        astream = await llm.async_generate(arithmetic_prompt(2), LONG, stream=True)
        await astream.__anext__()
        monkeypatch.setattr(runner, "acall", cancelled)
        with pytest.raises(asyncio.CancelledError):
            await astream.__anext__()
        monkeypatch.undo()
        return astream

    astream = asyncio.run(main())
    _wait_for_aborts(llm, before, 2)
    assert next(stream, None) is None and astream._done  # (both still held, and ended)


def test_a_stream_refuses_bad_input_at_the_call(llm):
    with pytest.raises(PromptTooLongError) as e:
        llm.generate("x " * 5000, GREEDY, stream=True)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([arithmetic_prompt(1), arithmetic_prompt(2)], GREEDY, stream=True)
    assert e.value.param == "stream"


# --- async ----------------------------------------------------------------------------------
def test_async_generate_equals_generate(llm):
    prompts = [arithmetic_prompt(i) for i in range(3)]

    async def main():
        one = await llm.async_generate(prompts[0], GREEDY)
        batch = await llm.async_generate(prompts, GREEDY)
        stream = await llm.async_generate(prompts[1], GREEDY, stream=True)
        chunks = [c async for c in stream]
        return one, batch, chunks

    one, batch, chunks = asyncio.run(main())
    assert _no_ids(one) == _no_ids(llm.generate(prompts[0], GREEDY))
    assert _no_ids(batch) == _no_ids(llm.generate(prompts, GREEDY))
    assert _no_ids(chunks[-1]) == _no_ids(batch[1])
    assert all(b["text"].startswith(a["text"]) for a, b in zip(chunks, chunks[1:]))


def test_async_errors_and_cancel(llm):
    async def bad():
        await llm.async_generate(arithmetic_prompt(1), {"max_new_tokens": -1})

    with pytest.raises(InvalidRequestError) as e:
        asyncio.run(bad())
    assert e.value.param == "sampling_params.max_new_tokens"

    before = llm.engine.stats()["requests"]["finished"].get("abort", 0)

    async def cancelled():
        sp = {"temperature": 0, "max_new_tokens": 900, "ignore_eos": True}
        task = asyncio.ensure_future(llm.async_generate(arithmetic_prompt(2), sp))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    _wait_for_aborts(llm, before, 1)


# --- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, param",
    [
        ({"prompt": "x", "input_ids": [1, 2]}, InvalidRequestError, "input_ids"),
        ({}, InvalidRequestError, "prompt"),
        ({"prompt": []}, InvalidRequestError, "prompt"),
        ({"prompt": 5}, InvalidRequestError, "prompt"),
        (
            {"prompt": "x", "sampling_params": {"max_tokens": 3}},
            InvalidRequestError,
            "sampling_params.max_tokens",
        ),
        (
            {"prompt": "x", "sampling_params": {"temperature": "hot"}},
            InvalidRequestError,
            "sampling_params.temperature",
        ),
        ({"prompt": "x", "sampling_params": {"top_p": 0}}, InvalidRequestError, "sampling_params.top_p"),
        ({"prompt": ["a", "b"], "sampling_params": [{}]}, InvalidRequestError, "sampling_params"),
        (
            {"prompt": ["a", "b"], "sampling_params": [{}, {"top_k": "x"}]},
            InvalidRequestError,
            "sampling_params.1.top_k",
        ),
        ({"prompt": ["a", "b"], "rid": ["r"]}, InvalidRequestError, "rid"),
        (
            {"prompt": "x", "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}},
            InvalidRequestError,
            "sampling_params.ebnf",
        ),
        ({"prompt": "x", "sampling_params": {"regex": "("}}, ConstraintError, "sampling_params.regex"),
        (
            {"prompt": "x", "sampling_params": {"stop_token_ids": [10**9]}},
            InvalidRequestError,
            "sampling_params.stop_token_ids",
        ),
        (
            {"prompt": "x", "return_logprob": True, "logprob_start_len": 50},
            InvalidRequestError,
            "logprob_start_len",
        ),
        ({"prompt": ["ok", ""]}, InvalidRequestError, "prompt.1"),
        ({"prompt": "x", "sampling_params": {"n": 2}}, FeatureNotSupportedError, "sampling_params.n"),
        ({"prompt": "x", "image_data": "img.png"}, FeatureNotSupportedError, "image_data"),
        ({"prompt": "x", "lora_path": "adapter"}, FeatureNotSupportedError, "lora_path"),
        ({"prompt": "x", "return_hidden_states": True}, FeatureNotSupportedError, "return_hidden_states"),
    ],
)
def test_bad_input_raises_typed_errors_naming_the_field(llm, kwargs, error, param):
    with pytest.raises(error) as e:
        llm.generate(**kwargs)
    assert e.value.param == param
    assert "this server" not in str(e.value)


def test_engine_takes_sglang_server_args():
    with pytest.raises(NotYetSupportedError, match=r"Engine\(tp_size=2\)"):
        Engine(tp_size=2)
    with pytest.raises(InvalidRequestError, match=r"Engine\(\) got an unknown option 'no_such_arg'"):
        Engine(no_such_arg=1)
    with pytest.raises(InvalidRequestError, match="stream_output"):
        Engine(stream_output="yes")
    with Engine(
        random_seed=3, log_level="error", mem_fraction_static=0.5, kv_memory="32MB", device="cpu"
    ) as eng:
        assert eng.get_server_info()["random_seed"] == 3
        assert eng.get_tokenizer() is eng.engine.tokenizer.hf
        eng.flush_cache()
        assert eng.generate(arithmetic_prompt(2), GREEDY)["meta_info"]["completion_tokens"] == 8
    with pytest.raises(EngineClosedError):
        eng.generate(arithmetic_prompt(2), GREEDY)
    with pytest.raises(FeatureNotSupportedError, match="embeddings"):
        eng.encode("text")


def test_shutdown_ends_a_call_in_flight_with_engine_closed_error():
    eng = Engine(kv_memory="32MB", device="cpu")
    caught: list[BaseException] = []

    def run() -> None:
        try:
            eng.generate(arithmetic_prompt(1), {"temperature": 0, "max_new_tokens": 900, "ignore_eos": True})
        except BaseException as e:
            caught.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.5)
    eng.shutdown()
    t.join(30)
    assert not t.is_alive() and len(caught) == 1 and isinstance(caught[0], EngineClosedError), caught


def test_an_engine_collected_on_its_own_loop_thread_shuts_down():
    # an Engine in a reference cycle (an exception's traceback makes one) is freed by whichever
    # thread collects: on its loop thread, its finalizer waited for that loop, forever
    eng = Engine(kv_memory="32MB", device="cpu")
    eng.cycle = eng
    runner = eng._runner
    del eng

    async def collect() -> None:
        gc.collect()

    gc.disable()  # (no collection elsewhere first)
    try:
        runner.submit(collect()).result(timeout=10)
    finally:
        gc.enable()
    runner.thread.join(30)
    assert runner.closed and not runner.thread.is_alive()


# --- the same answers as the server's /generate -------------------------------------------
REQUESTS = [
    {"text": arithmetic_prompt(2), "sampling_params": GREEDY},
    {"text": [arithmetic_prompt(i) for i in range(3)], "sampling_params": {**GREEDY, "stop": "\n"}},
    {"input_ids": [5, 6, 7, 8], "sampling_params": {**GREEDY, "max_new_tokens": 5}},
    {
        "text": arithmetic_prompt(9),
        "sampling_params": GREEDY,
        "return_logprob": True,
        "top_logprobs_num": 2,
        "logprob_start_len": 1,
        "return_text_in_logprobs": True,
    },
    {"text": arithmetic_prompt(4), "sampling_params": {**GREEDY, "regex": "[0-9]+"}},
    {
        "text": arithmetic_prompt(4),
        "sampling_params": {"max_new_tokens": 6, "temperature": 0.7, "sampling_seed": 11},
    },
    {
        "text": arithmetic_prompt(5),
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "top_logprobs_num": 3,
    },
]


@pytest.mark.parametrize("body", REQUESTS, ids=range(len(REQUESTS)))
def test_answers_equal_the_servers(llm, server, body):
    # from an empty cache on both sides: logprobs over a cached prefix may differ in the last bits
    httpx.post(server.url + "/flush_cache", timeout=60)
    llm.flush_cache()
    served = httpx.post(server.url + "/generate", json=body, timeout=120).json()
    kwargs = {("prompt" if k == "text" else k): v for k, v in body.items()}
    assert _no_ids(llm.generate(**kwargs)) == _no_ids(served)


def test_stream_equals_the_servers_events(llm, server):
    body = {"text": arithmetic_prompt(8), "sampling_params": GREEDY, "stream": True}
    events = []
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: ") :]))
    chunks = list(llm.generate(arithmetic_prompt(8), GREEDY, stream=True))
    assert [_no_ids(c) for c in chunks] == [_no_ids(e) for e in events]


@pytest.mark.parametrize(
    "body",
    [
        {"text": "x", "sampling_params": {"max_tokens": 3}},
        {"text": "x", "sampling_params": {"temperature": -1}},
        {"text": ["a", "b"], "sampling_params": [{}]},
        {"text": "x", "sampling_params": {"json_schema": "{not json"}},
    ],
)
def test_errors_name_the_field_the_server_names(llm, server, body):
    served = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert served.status_code == 400
    kwargs = {("prompt" if k == "text" else k): v for k, v in body.items()}
    with pytest.raises(Exception) as e:
        llm.generate(**kwargs)
    assert e.value.param == served.json()["error"]["param"]
    assert str(e.value) == served.json()["error"]["message"]


# --- Runtime's generate / async_generate / encode ---------------------------------------------
@pytest.fixture(scope="module")
def rt():
    runtime = llmir.Runtime(kv_memory="64MB", device="cpu")
    yield runtime
    runtime.shutdown()


def test_runtime_generate_is_the_json_of_the_generate_answer(rt, llm):
    rt.flush_cache()  # (logprobs over a cached prefix may differ in the last bits)
    llm.flush_cache()
    out = rt.generate(arithmetic_prompt(3), GREEDY, return_logprob=True, top_logprobs_num=2)
    assert isinstance(out, str)
    assert _no_ids(json.loads(out)) == _no_ids(
        llm.generate(arithmetic_prompt(3), GREEDY, return_logprob=True, top_logprobs_num=2)
    )
    batch = json.loads(rt.generate([arithmetic_prompt(1), arithmetic_prompt(2)], GREEDY))
    assert [a["text"] for a in batch] == [
        a["text"] for a in llm.generate([arithmetic_prompt(1), arithmetic_prompt(2)], GREEDY)
    ]
    with pytest.raises(FeatureNotSupportedError):
        rt.generate("x", GREEDY, lora_path="adapter")


def test_runtime_async_generate_yields_the_text_piece_by_piece(rt):
    async def main():
        return [piece async for piece in rt.async_generate(arithmetic_prompt(3), GREEDY)]

    pieces = asyncio.run(main())
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == json.loads(rt.generate(arithmetic_prompt(3), GREEDY))["text"]
    assert rt.add_request == rt.async_generate


def test_runtime_encode_refuses_embeddings(rt):
    with pytest.raises(FeatureNotSupportedError, match="embeddings"):
        rt.encode("some text")


def test_runtime_generate_after_shutdown_starts_no_loop_thread():
    rt = llmir.Runtime()
    rt.shutdown()
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(EngineClosedError):
        rt.generate("Q: 1 + 1?\nA: ", {"max_new_tokens": 2})
    assert {t.ident for t in threading.enumerate()} <= before
