"""``Endpoint`` and ``OpenAI`` backends against a real ``llmir serve``: DSL programs give the same
results as on the embedded engine, streaming included, and whole programs run via ``/program``."""

from __future__ import annotations

import json

import pytest
import torch

import llmir_lang as llmir
from llmir_lang.errors import NotYetSupportedError
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
