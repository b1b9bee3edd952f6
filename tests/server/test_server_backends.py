"""``Endpoint`` and ``OpenAI`` backends against a real ``llmir serve``: DSL programs give the same
results as on the embedded engine, streaming included, and whole programs run via ``/program``."""

from __future__ import annotations

import json
import time

import pytest
import torch
from server_harness import free_port

import llmir_lang as llmir
from llmir_lang.errors import LLMIRError, NotYetSupportedError
from llmir_lang.executor.backend import ChainRequest, GenStep
from llmir_lang.executor.remote import Endpoint, OpenAI, RemoteBackendError
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.ir import print_ir
from llmir_lang.models import __path__ as _models_path

MODEL_DIR = f"{_models_path[0]}/llmir-tiny"


@llmir.function
def qa(s, question):
    s += "Q: " + question + "\nA: " + llmir.gen("answer", max_tokens=8, stop="\n")
    s += "\nQ: Is that right?\nA: " + llmir.select("check", choices=["True", "False", "Unknown"])


@llmir.function
def chat(s, question):
    s += llmir.user(question)
    s += llmir.assistant(llmir.gen("answer", max_tokens=8, temperature=0.0))


_N_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
)


@llmir.function
def digits(s, question):
    s += "Q: " + question + "\nA: " + llmir.gen("n", max_tokens=6, regex="[0-9]+")
    s += "\nIn JSON: " + llmir.gen(
        "rec",
        max_tokens=20,
        json_schema=_N_SCHEMA,
    )


@llmir.function
def _json_only(s, prefix):
    s += prefix + llmir.gen("rec", max_tokens=20, json_schema=_N_SCHEMA)


QUESTIONS = ["What is 5 + 7?", "What is 20 + 22?"]


@pytest.fixture(scope="module")
def runtime():
    torch.set_num_threads(1)
    rt = llmir.Runtime(kv_memory="64MB")
    yield rt
    rt.shutdown()


@pytest.fixture(scope="module")
def endpoint(server):
    with Endpoint(server.url) as ep:
        yield ep


def _snapshot(state, names):
    return state.text(), {n: state[n] for n in names}


@pytest.mark.parametrize(
    "program,names", [(qa, ["answer", "check"]), (chat, ["answer"]), (digits, ["n", "rec"])]
)
def test_endpoint_runs_programs_like_the_embedded_engine(runtime, endpoint, program, names):
    assert endpoint.protocol == "llmir"
    for q in QUESTIONS:
        want = _snapshot(program.run(question=q, backend=runtime), names)
        got = _snapshot(program.run(question=q, backend=endpoint), names)
        assert got == want
    rec = digits.run(question=QUESTIONS[0], backend=endpoint)["rec"]
    assert set(json.loads(rec)) == {"n"}


def test_endpoint_sglang_protocol_scores_and_templates_without_llmir_routes(runtime, server):
    with Endpoint(server.url, protocol="sglang", tokenizer=MODEL_DIR) as ep:
        for q in QUESTIONS:
            assert _snapshot(qa.run(question=q, backend=ep), ["answer", "check"]) == _snapshot(
                qa.run(question=q, backend=runtime), ["answer", "check"]
            )
        assert (
            chat.run(question=QUESTIONS[0], backend=ep)["answer"]
            == chat.run(question=QUESTIONS[0], backend=runtime)["answer"]
        )
        scores = ep.score("Q: What is 5 + 7?\nA: ", ["12", "93"])
        exact = runtime.score("Q: What is 5 + 7?\nA: ", ["12", "93"])
        for a, b in zip(scores, exact):
            assert a == pytest.approx(b, abs=1e-3)
        with pytest.raises(NotYetSupportedError, match="not an llmir server"):
            ep.run_program("module {}")
    with (
        Endpoint(server.url, protocol="sglang") as bare,
        pytest.raises(NotYetSupportedError, match="tokenizer="),
    ):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_endpoint_streams_chains(endpoint, runtime):
    steps = [
        GenStep("a", SamplingParams(max_new_tokens=6, stop=["\n"])),
        "\nQ: What is 1 + 1?\nA: ",
        GenStep("b", SamplingParams(max_new_tokens=6, stop=["\n"])),
    ]
    request = ChainRequest("Q: What is 9 + 7?\nA: ", steps)
    chunks: list[tuple[int, str]] = []
    result = endpoint.submit(request, on_chunk=lambda i, t: chunks.append((i, t))).result(timeout=60)
    assert result.error is None
    assert [s.text for s in result.steps] == ["16", "2"]
    assert "".join(t for i, t in chunks if i == 0) == "16" and "".join(t for i, t in chunks if i == 1) == "2"
    assert result.text == "16\nQ: What is 1 + 1?\nA: 2"
    assert result.text == runtime.submit(request).result(timeout=60).text
    state = qa.run(question=QUESTIONS[1], backend=endpoint, stream=True)
    streamed = "".join(state.text_iter("answer"))
    assert state.error() is None and streamed == state["answer"] == "42"


def test_endpoint_run_program_sends_the_whole_program(endpoint, runtime):
    reply = endpoint.run_program(print_ir(qa.trace()), {"question": QUESTIONS[0]})
    ((name, states),) = reply.functions
    want = qa.run(question=QUESTIONS[0], backend=runtime)
    assert name == "qa" and states[0].error is None
    assert states[0].text == want.text()
    assert states[0].vars == {"answer": want["answer"], "check": want["check"]}
    assert reply.stats["requests"] >= 1 and reply.stats["score_calls"] >= 1
    chat_reply = endpoint.run_program(print_ir(chat.trace()), {"question": QUESTIONS[1]})
    assert chat_reply.functions[0][1][0].text == chat.run(question=QUESTIONS[1], backend=runtime).text()


def test_openai_backend_runs_programs_and_streams(server, runtime):
    with OpenAI(server.url + "/v1", "llmir-tiny") as oa:
        for program, names in [(qa, ["answer", "check"]), (chat, ["answer"]), (digits, ["n", "rec"])]:
            want = _snapshot(program.run(question=QUESTIONS[0], backend=runtime), names)
            assert _snapshot(program.run(question=QUESTIONS[0], backend=oa), names) == want
        state = qa.run(question=QUESTIONS[1], backend=oa, stream=True)
        assert "".join(state.text_iter("answer")) == state["answer"] == "42"
    with OpenAI(server.url + "/v1", "llmir-tiny", constraints="response_format") as rf:
        want = digits.run(question=QUESTIONS[0], backend=runtime)
        got = _json_only.run(prefix=want.text()[: want.text().index("{")], backend=rf)
        assert got["rec"] == want["rec"]
        with pytest.raises(Exception, match="regex"):
            digits.run(question=QUESTIONS[0], backend=rf)
    with OpenAI(server.url + "/v1", "llmir-tiny", constraints="none") as none:
        with pytest.raises(NotYetSupportedError, match="constraint"):
            none.submit(ChainRequest("x", [GenStep("g", SamplingParams(), _regex_spec())]))


def test_remote_errors_are_reported_not_raised(server):
    with OpenAI(server.url + "/v1", "no-such-model") as oa:
        result = oa.submit(ChainRequest("hi", [GenStep("g", SamplingParams(max_new_tokens=2))])).result(
            timeout=30
        )
        assert result.error is not None and "404" in result.error and "llmir-tiny" in result.error
    with Endpoint(server.url) as ep:
        with pytest.raises(RemoteBackendError, match="400"):
            ep.run_program("this is not IR")


def _regex_spec():
    from llmir_lang.executor.constraints import spec_from_regex

    return spec_from_regex("[0-9]+")


# --- select scores choices exactly as the engine does (token ids, never the joined text) --------
# "Par" + "ma" tokenizes as "P|arm|a" when joined, "far" + "mer" as one token: the engine scores
# the choice's own tokens after the prompt's, and so must every remote backend
MERGING = [
    ("Ada lives in Par", ["is", "ma", "k"]),
    ("Bob is a far", ["mer", "ther", "m hand"]),
    ("Q: Does Ada live in Paris?\nA:", [" True", " False"]),
]


@llmir.function
def merging_selects(s):
    s += "Ada lives in Par" + llmir.select("a", ["is", "ma", "k"])
    s += ". Bob is a far" + llmir.select("b", ["mer", "ther", "m hand"])
    s += ". Q: Does Ada live in Paris?\nA:" + llmir.select("c", [" True", " False"])


def _assert_scores(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-3)


def test_every_backend_scores_merging_choices_like_the_engine(server, runtime):
    want = [runtime.score(p, cs) for p, cs in MERGING]
    want_state = merging_selects.run(backend=runtime)
    picks = {k: want_state[k] for k in "abc"}
    assert picks["a"] == "k"  # the exact scores pick "k"; the joined text's tokens picked "ma"
    with (
        OpenAI(server.url + "/v1", "llmir-tiny") as oa,
        Endpoint(server.url, protocol="sglang") as sglang,
        Endpoint(server.url) as ep,
        OpenAI(server.url + "/v1", "llmir-tiny", tokenizer=MODEL_DIR) as oa_local,
    ):
        for backend in (oa, sglang, ep, oa_local):
            for (prompt, choices), w in zip(MERGING, want):
                _assert_scores(backend.score(prompt, choices), w)
            state = merging_selects.run(backend=backend)
            assert {k: state[k] for k in "abc"} == picks
            for k in "abc":
                got_lps = state.get_meta_info(k)["normalized_logprobs"]
                assert got_lps == pytest.approx(want_state.get_meta_info(k)["normalized_logprobs"], abs=1e-3)


def test_scoring_without_tokenize_is_exact_or_refuses(server, runtime):
    """A server without /tokenize (and no tokenizer=): a choice that tokenizes apart from the
    prompt is scored exactly; one whose text merges with the prompt's end is refused, with what to
    do, instead of being scored as something else."""
    with (
        OpenAI(server.url + "/v1", "llmir-tiny") as oa,
        Endpoint(server.url, protocol="sglang") as sglang,
    ):
        for backend in (oa, sglang):
            backend._no_tokenize = True  # as if the server answered /tokenize with 404
            prompt, choices = MERGING[2]
            _assert_scores(backend.score(prompt, choices), runtime.score(prompt, choices))
            with pytest.raises(NotYetSupportedError, match="tokenizer="):
                backend.score("Ada lives in Par", ["ma"])


# --- failures are reported as what they are -------------------------------------------------
def test_endpoint_reports_a_server_that_is_down_and_does_not_remember_it(server, runtime):
    want = chat.run(question=QUESTIONS[0], backend=runtime)["answer"]
    with Endpoint(f"http://127.0.0.1:{free_port()}", timeout=10) as ep:
        for _ in range(2):  # asked again each time: nothing is cached from a failure
            with pytest.raises(RemoteBackendError, match="no answer from the server"):
                _ = ep.protocol
        # a program with roles: the cause is the connection, not the chat template
        with pytest.raises(LLMIRError, match="no answer from the server") as e:
            chat.run(question=QUESTIONS[0], backend=ep)
        assert "tokenizer=" not in str(e.value)
        with pytest.raises(RemoteBackendError, match="no answer from the server"):
            ep.run_program(print_ir(qa.trace()), {"question": QUESTIONS[0]})
        # the server is up now (here: the backend is pointed at it): it is an llmir server
        ep.base_url = server.url
        ep._client.base_url = server.url
        assert ep.protocol == "llmir"
        assert chat.run(question=QUESTIONS[0], backend=ep)["answer"] == want
    with Endpoint(server.url + "/v1") as wrong_path:
        with pytest.raises(RemoteBackendError, match="404.*root URL"):
            wrong_path.apply_chat_template([{"role": "user", "content": "hi"}])


def test_openai_backend_reports_failures_not_missing_features(server):
    down = f"http://127.0.0.1:{free_port()}/v1"
    with OpenAI(down, "llmir-tiny", timeout=10) as oa:
        for call in (
            lambda: oa.score("Q: ", ["1"]),
            lambda: oa.apply_chat_template([{"role": "user", "content": "hi"}]),
        ):
            with pytest.raises(RemoteBackendError, match="no answer from the server") as e:
                call()
            assert e.value.status is None
    with OpenAI(server.url + "/v1", "no-such-model") as oa:
        with pytest.raises(RemoteBackendError) as e:
            oa.score("Q: ", ["1"])
        assert e.value.status == 404 and "llmir-tiny" in str(e.value)


@pytest.mark.parametrize("kind", ["endpoint", "openai"])
def test_abort_requests_stops_a_streamed_chain_on_the_server(server, kind):
    """An interrupted program's streamed generation on a remote server stops there (the response
    is closed, the server aborts it) and the chain starts no further generation."""
    from server_harness import wait_idle

    backend = Endpoint(server.url) if kind == "endpoint" else OpenAI(server.url + "/v1", "llmir-tiny")
    with backend:
        before = wait_idle(server.url)
        steps = [GenStep("a", SamplingParams(max_new_tokens=900, ignore_eos=True)), " then", GenStep("b")]
        chunks: list[str] = []
        fut = backend.submit(
            ChainRequest("Q: What is 3 + 4?\nA: ", steps), on_chunk=lambda i, t: chunks.append(t)
        )
        deadline = time.monotonic() + 60
        while len(chunks) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        backend.abort_requests([fut])
        result = fut.result(timeout=30)
        assert result.error is not None and "aborted" in result.error
        assert [s.name for s in result.steps] == []  # "b" never started
        after = wait_idle(server.url, timeout=15.0)
        assert after["server"]["aborted"] == before["server"]["aborted"] + 1
        assert after["tokens_computed"] - before["tokens_computed"] < 600  # stopped early
        # a chain not started yet never runs
        queued = backend.submit(ChainRequest("Q: What is 1 + 1?\nA: ", [GenStep("x")]))
        backend.abort_requests([queued])
        assert queued.cancelled() or "aborted" in (queued.result(timeout=30).error or "")


@llmir.function
def _long(s, question):
    s += "Q: " + question + "\nA: " + llmir.gen("answer", max_tokens=900, ignore_eos=True)


def test_cancelled_program_on_an_llmir_server_is_aborted_there(server, endpoint):
    """A program sent whole (``/program``) stops on the server when its ``arun`` is cancelled,
    instead of running to the end for nobody."""
    import asyncio

    import httpx
    from server_harness import wait_idle

    assert endpoint.protocol == "llmir"
    before = wait_idle(server.url)

    async def cancelled() -> None:
        task = asyncio.ensure_future(_long.arun(question="What is 3 + 4?", backend=endpoint))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = httpx.get(server.url + "/stats", timeout=30).json()
            if stats["tokens_computed"] - before["tokens_computed"] > 30:
                break
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    after = wait_idle(server.url, timeout=15.0)
    assert after["server"]["aborted"] >= before["server"]["aborted"] + 1
    assert after["tokens_computed"] - before["tokens_computed"] < 600  # stopped early
    assert qa.run(question=QUESTIONS[0], backend=endpoint).error() is None


@llmir.function
def with_logprobs(s, question):
    s += "Q: " + question + "\nA:"
    s += llmir.gen("answer", max_tokens=4, top_logprobs_num=3, return_text_in_logprobs=True)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_backend_reports_logprobs_and_top_logprobs(server, runtime, stream):
    """The OpenAI backend reads the server's token logprobs, top alternatives and token texts
    (streamed or not); the ids are not in that API (None)."""
    want = with_logprobs.run(question=QUESTIONS[0], backend=runtime).get_meta_info("answer")
    with OpenAI(server.url + "/v1", "llmir-tiny") as oa:
        state = with_logprobs.run(question=QUESTIONS[0], backend=oa, stream=stream)
        if stream:
            "".join(state.text_iter())
        got = state.get_meta_info("answer")
    assert state["answer"] == with_logprobs.run(question=QUESTIONS[0], backend=runtime)["answer"]
    assert [e[1] for e in got["output_token_logprobs"]] == [None] * len(want["output_token_logprobs"])
    assert [e[2] for e in got["output_token_logprobs"]] == [e[2] for e in want["output_token_logprobs"]]
    assert [e[0] for e in got["output_token_logprobs"]] == pytest.approx(
        [e[0] for e in want["output_token_logprobs"]], abs=1e-3
    )
    assert len(got["output_top_logprobs"]) == len(want["output_top_logprobs"])
    for top, top_want in zip(got["output_top_logprobs"], want["output_top_logprobs"]):
        assert [e[2] for e in top] == [e[2] for e in top_want] and all(e[1] is None for e in top)
        assert [e[0] for e in top] == pytest.approx([e[0] for e in top_want][: len(top)], abs=1e-3)


@llmir.function
def prompt_scored(s, question):
    s += (
        "Q: "
        + question
        + "\nA:"
        + llmir.gen("a", max_tokens=3, logprob_start_len=1, return_text_in_logprobs=True)
    )
    s += "\nQ: again?\nA:" + llmir.gen("b", max_tokens=2, logprob_start_len=0)


def test_prompt_logprobs_over_endpoint_and_a_clear_refusal_over_openai(server, runtime, endpoint):
    want = prompt_scored.run(question=QUESTIONS[0], backend=runtime)
    # the llmir protocol (whole programs on the server) and SGLang's (one /generate per gen)
    with Endpoint(server.url, protocol="sglang") as sglang_protocol:
        for backend in (endpoint, sglang_protocol):
            got = prompt_scored.run(question=QUESTIONS[0], backend=backend)
            assert got.text() == want.text()
            for name in ("a", "b"):
                w = want.get_meta_info(name)["input_token_logprobs"]
                g = got.get_meta_info(name)["input_token_logprobs"]
                assert [tuple(e[1:]) for e in g] == [tuple(e[1:]) for e in w] and g[0][0] is None
                assert [e[0] for e in g[1:]] == pytest.approx([e[0] for e in w[1:]], abs=1e-3)
    with OpenAI(server.url + "/v1", "llmir-tiny") as oa:
        state = prompt_scored.run(question=QUESTIONS[0], backend=oa, stream=True).sync()
        assert isinstance(state.error(), llmir.GenerationNotSupportedError)
        assert "logprob_start_len" in str(state.error()) and "Endpoint" in str(state.error())


@llmir.function
def regex_stopped(s, question):
    s += "Q: " + question + "\nA:" + llmir.gen("a", max_tokens=8, stop_regex=r"\d\n")
    s += "\nQ: and 1 + 1?\nA:" + llmir.gen("b", max_tokens=8, stop_regex=[r"\n"])


def test_stop_regex_over_endpoint_and_a_clear_refusal_over_openai(server, runtime, endpoint):
    want = regex_stopped.run(question=QUESTIONS[0], backend=runtime)
    assert want.get_meta_info("a")["matched_stop"] == r"\d\n"
    with Endpoint(server.url, protocol="sglang") as sglang_protocol:
        for backend in (endpoint, sglang_protocol):
            got = regex_stopped.run(question=QUESTIONS[0], backend=backend)
            assert got.text() == want.text()
            for name, pattern in (("a", r"\d\n"), ("b", r"\n")):
                meta = got.get_meta_info(name)
                assert meta["finish_reason"] == "stop" and meta["matched_stop"] == pattern
    with OpenAI(server.url + "/v1", "llmir-tiny") as oa:
        with pytest.raises(llmir.GenerationNotSupportedError, match=r"stop_regex.*no regex stop.*Endpoint"):
            regex_stopped.run(question=QUESTIONS[0], backend=oa)
