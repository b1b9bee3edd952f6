"""Meta info parity: a program's ``get_meta_info`` on the embedded Runtime and on the same model
behind an llmir server, through ``Endpoint`` (whole programs via ``/program``, and call by call via
``/generate``) and ``OpenAI`` (``/v1/completions``), greedy, streamed and not.

Differences that the APIs make unavoidable are left out of the comparisons and documented in the
server README: engine counters (``jump_forward_tokens``, ``spec_*``, ``retractions``,
``constraint_engine``) come only from the embedded engine and ``/program``; ``cached_tokens``
depends on what the server's cache holds; OpenAI's API gives no token ids."""

from __future__ import annotations

import httpx
import pytest
import torch
from server_harness import CallByCallEndpoint

import llmir_lang as llmir
from llmir_lang.errors import InvalidRequestError
from llmir_lang.executor.remote import Endpoint, OpenAI

KEYS = ("prompt_tokens", "completion_tokens", "finish_reason", "matched_stop", "logprobs")


@pytest.fixture(scope="module")
def served():
    from server_harness import InProcessServer

    from llmir_lang.executor.engine import Engine

    torch.set_num_threads(1)
    server = InProcessServer(Engine(kv_memory="64MB"))
    rt = llmir.Runtime(kv_memory="64MB")
    backends = {
        "program": Endpoint(server.url),
        "calls": CallByCallEndpoint(server.url),
        "openai": OpenAI(server.url + "/v1", "llmir-tiny"),
    }
    yield server, rt, backends
    for b in backends.values():
        b.close()
    rt.shutdown()
    server.close()


@llmir.function
def stops(s):
    s += "Q: What is 5 + 7?\nA: " + llmir.gen("answer", max_tokens=8, stop="\n")
    s += "\nQ: What is 3 + 4?\nA: " + llmir.gen_int("n", 4)  # ends with EOS (matched: its id)
    s += "\nQ: " + llmir.gen("cut", max_tokens=3)


@llmir.function
def logprobs(s):
    s += "Q: What is 5 + 7?\nA: "
    s += llmir.gen("a", max_tokens=3, return_logprob=True, top_logprobs_num=2, return_text_in_logprobs=True)
    s += "\nIs that right? " + llmir.select("ok", ["yes", "no"])


@llmir.function
def next_token(s):
    s += "Q: What is 5 + 7?\nA: 12\nQ" + llmir.gen("z", max_tokens=0, top_logprobs_num=3)


def _run(f, backend, stream=False, **kw):
    state = f.run(backend=backend, stream=stream, **kw)
    if stream:
        chunks = "".join(state.text_iter())
        assert chunks == state.text()
    return state


def _close(a: list, b: list) -> None:
    """(logprob, id, text) triples: ids and texts equal, logprobs within float noise (the
    server's batch differs from the Runtime's)."""
    assert [t[1:] for t in a] == [t[1:] for t in b]
    assert [t[0] for t in a] == pytest.approx([t[0] for t in b], abs=1e-4)


@pytest.mark.parametrize("kind", ["program", "calls", "openai"])
@pytest.mark.parametrize("stream", [False, True])
def test_finish_and_token_counts_equal_the_runtimes(served, kind, stream):
    # the OpenAI backend reported matched_stop None (the server sent no stop_reason)
    _, rt, backends = served
    want = _run(stops, rt)
    got = _run(stops, backends[kind], stream)
    assert got.text() == want.text()
    for name in ("answer", "n", "cut"):
        w, g = want.get_meta_info(name), got.get_meta_info(name)
        assert {k: g[k] for k in KEYS} == {k: w[k] for k in KEYS}, name
    assert got.get_meta_info("answer")["matched_stop"] == "\n"


@pytest.mark.parametrize("stream", [False, True])
def test_program_meta_has_the_engines_triples(served, stream):
    # /program's meta came back as JSON: every (logprob, id, text) triple was a list
    _, rt, backends = served
    want = _run(logprobs, rt)
    got = _run(logprobs, backends["program"], stream)
    w, g = want.get_meta_info("a"), got.get_meta_info("a")
    assert all(type(t) is tuple for t in g["output_token_logprobs"]), g["output_token_logprobs"]
    assert all(type(t) is tuple for top in g["output_top_logprobs"] for t in top)
    _close(g["output_token_logprobs"], w["output_token_logprobs"])
    for gt, wt in zip(g["output_top_logprobs"], w["output_top_logprobs"]):
        _close(gt, wt)
    if stream:
        return  # a streamed program runs call by call: a select's ids need tokenizer= (README)
    sel = got.get_meta_info("ok")["input_token_logprobs"]
    assert all(type(t) is tuple for choice in sel for t in choice), sel
    for gc, wc in zip(sel, want.get_meta_info("ok")["input_token_logprobs"], strict=True):
        _close(gc, wc)


@pytest.mark.parametrize("stream", [False, True])
def test_endpoint_gives_token_texts_in_logprobs(served, stream):
    # call by call, return_text_in_logprobs gave None for every text (Endpoint did not ask the
    # server for them, and has no tokenizer of its own)
    _, rt, backends = served
    want = _run(logprobs, rt).get_meta_info("a")
    got = _run(logprobs, backends["calls"], stream).get_meta_info("a")
    assert [t[2] for t in got["output_token_logprobs"]] == ["1", "2", "\n"]
    _close(got["output_token_logprobs"], want["output_token_logprobs"])
    for gt, wt in zip(got["output_top_logprobs"], want["output_top_logprobs"]):
        _close(gt, wt)


def test_next_token_alternatives_of_a_gen_of_no_tokens(served):
    # /generate with max_new_tokens 0 answered output_top_logprobs [] (the engine's one entry, the
    # next token's alternatives, was dropped), so the gen failed with GenerationNotSupportedError
    server, rt, backends = served
    out = httpx.post(
        server.url + "/generate",
        json={
            "text": "Q: What is 5 + 7?\nA: 12\nQ",
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True,
            "top_logprobs_num": 3,
        },
        timeout=60,
    ).json()
    assert len(out["meta_info"]["output_top_logprobs"]) == 1, out
    assert out["meta_info"]["output_token_logprobs"] == []
    want = _run(next_token, rt).get_meta_info("z")
    for kind in ("program", "calls"):
        got = _run(next_token, backends[kind]).get_meta_info("z")
        assert [t[1] for t in got["output_top_logprobs"][0]] == [t[1] for t in want["output_top_logprobs"][0]]
        assert got["output_token_logprobs"] == []


def test_openai_usage_reports_cached_tokens(served):
    # /v1/completions' usage had no prompt_tokens_details, so the OpenAI backend's cached_tokens
    # was always 0 where /generate said what the radix cache served
    server, _, backends = served
    prompt = "Text: the cached prefix of this request is long enough.\nQ: What is 8 + 7?\nA: "
    body = {"model": "llmir-tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    second = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    native = httpx.post(
        server.url + "/generate",
        json={"text": prompt, "sampling_params": {"max_new_tokens": 2, "temperature": 0}},
        timeout=60,
    ).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == native["meta_info"]["cached_tokens"] > 0
    state = stops.run(backend=backends["openai"])
    state = stops.run(backend=backends["openai"])  # the same prompt again: served from the cache
    assert state.get_meta_info("answer")["cached_tokens"] > 0


def test_a_url_without_its_scheme_is_a_typed_error():
    # it was taken, and every request failed with "no answer from the server (UnsupportedProtocol)"
    with pytest.raises(InvalidRequestError, match="must start with http:// or https://"):
        Endpoint("localhost:30000")
    with pytest.raises(InvalidRequestError, match="must start with http:// or https://"):
        OpenAI("127.0.0.1:8000/v1", "my-model")


def test_openai_base_url_without_v1_says_so(served):
    server, _, _ = served
    with OpenAI(server.url, "llmir-tiny") as oa, pytest.raises(llmir.GenerationError, match="ends in /v1"):
        stops.run(backend=oa)


def test_openai_token_ids_are_unknown_not_empty(served):
    """OpenAI's API gives no token ids: a gen that generated tokens said ``token_ids == []``
    (none generated) where the ids are not known; it is None, and a gen of no tokens keeps []."""
    _, rt, backends = served
    got = _run(stops, backends["openai"]).get_meta_info("answer")
    assert got["completion_tokens"] > 0 and got["token_ids"] is None
    local = _run(stops, rt).get_meta_info("answer")
    assert local["token_ids"] and len(local["token_ids"]) == local["completion_tokens"]

    @llmir.function
    def nothing(s):
        s += "Q: What is 5 + 7?\nA: " + llmir.gen("z", max_tokens=0)

    assert _run(nothing, backends["openai"]).get_meta_info("z")["token_ids"] == []
