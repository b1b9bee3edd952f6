"""A constrained gen inside ``separate_reasoning`` on the remote backends: constrained after the
reasoning as on the embedded engine wherever the server can do it (``/program``; an llmir server
told per request; an SGLang-protocol server started with the gen's parser; the OpenAI API on a
server that gates), and otherwise a typed error before anything is sent (``Endpoint`` on a server
that would gate otherwise) or, on the OpenAI API, an error that names the cause. Unconstrained
gens are sent as before.

The bundled model answers "I am llmir-tiny, a small language model." to its name; the test format
whose end tag is ``tiny,`` makes "I am llmir-" its reasoning (``test_reasoning_gate_routes.py``)."""

from __future__ import annotations

import json

import httpx
import pytest
from server_harness import TEST_REASONING_FORMAT, CallByCallEndpoint, reasoning_servers

import llmir_lang as llmir
from llmir_lang.dsl.errors import GenerationError
from llmir_lang.dsl.lowering import gen_step
from llmir_lang.executor.remote import Endpoint, OpenAI, ReasoningParserMismatchError
from llmir_lang.models import __path__ as _models_path

MODEL_DIR = f"{_models_path[0]}/llmir-tiny"
FMT = TEST_REASONING_FORMAT


@pytest.fixture(scope="module")
def setup():
    with reasoning_servers() as (split, plain):
        runtime = llmir.Runtime(kv_memory="64MB")
        yield split, plain, runtime
        runtime.shutdown()


@llmir.function
def gated(s):
    s += llmir.user("What is your name?")
    s += llmir.assistant(llmir.separate_reasoning(llmir.gen("a", max_tokens=24, regex="(yes|no)"), FMT))


@llmir.function
def whole(s):
    s += llmir.user("What is your name?")
    s += llmir.assistant(llmir.gen("a", max_tokens=24, regex="(yes|no)"))


@llmir.function
def free(s):
    s += llmir.user("What is your name?")
    s += llmir.assistant(llmir.separate_reasoning(llmir.gen("a", max_tokens=12), FMT))


def _snapshot(program, backend):
    st = program.run(backend=backend)
    names = ["a", "a_reasoning_content"] if program is not whole else ["a"]
    return st.text(), {n: st[n] for n in names}


def _failure(program, backend) -> BaseException:
    with pytest.raises(GenerationError) as info:
        program.run(backend=backend)
    cause = info.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return cause


def test_every_backend_constrains_as_the_embedded_engine_where_the_server_can(setup):
    split, plain, runtime = setup
    want = _snapshot(gated, runtime)
    assert want[1]["a_reasoning_content"] == "I am llmir-" and want[1]["a"] in ("yes", "no")
    want_whole = _snapshot(whole, runtime)
    assert want_whole[1]["a"] in ("yes", "no")
    with (
        Endpoint(split) as program_split,  # /program: the server's parser plays no part
        Endpoint(plain) as program_plain,
        CallByCallEndpoint(split) as calls_split,  # /generate, told per request
        CallByCallEndpoint(plain) as calls_plain,
        Endpoint(split, protocol="sglang", tokenizer=MODEL_DIR) as sglang_split,  # the server gates
        Endpoint(plain, protocol="sglang", tokenizer=MODEL_DIR) as sglang_plain,
        OpenAI(split + "/v1", "llmir-tiny") as openai_split,
        OpenAI(plain + "/v1", "llmir-tiny") as openai_plain,
    ):
        for backend in (program_split, program_plain, calls_split, calls_plain, sglang_split, openai_split):
            assert _snapshot(gated, backend) == want, backend
        for backend in (program_split, program_plain, calls_split, calls_plain, sglang_plain, openai_plain):
            assert _snapshot(whole, backend) == want_whole, backend
        want_free = _snapshot(free, runtime)
        for backend in (calls_split, sglang_split, sglang_plain, openai_split, openai_plain):
            assert _snapshot(free, backend) == want_free, backend  # unconstrained: as before


def test_endpoint_refuses_a_gen_that_an_sglang_server_would_constrain_otherwise(setup):
    split, plain, _ = setup
    with Endpoint(plain, protocol="sglang", tokenizer=MODEL_DIR) as ep:
        error = _failure(gated, ep)
    assert isinstance(error, ReasoningParserMismatchError), error
    assert (error.server_parser, error.wanted) == (None, FMT)
    message = str(error)
    assert "has no --reasoning-parser" in message and f"--reasoning-parser {FMT} " in message
    assert "move the constrained gen out of separate_reasoning" in message
    with Endpoint(split, protocol="sglang", tokenizer=MODEL_DIR) as ep:
        error = _failure(whole, ep)
    assert isinstance(error, ReasoningParserMismatchError), error
    assert (error.server_parser, error.wanted) == (FMT, None)
    assert f"separate_reasoning(..., model_type='{FMT}')" in str(error)
    assert "without --reasoning-parser" in str(error)


def test_the_openai_backend_names_a_server_that_gates_otherwise(setup):
    split, plain, _ = setup

    @llmir.function
    def r1(s):
        s += "Q: What is 12 + 5?\nA: "
        s += llmir.separate_reasoning(llmir.gen("x", max_tokens=12, regex=r"\d+"), model_type="deepseek-r1")

    with OpenAI(plain + "/v1", "llmir-tiny") as oa:
        message = str(_failure(r1, oa))  # forced to answer at once: no reasoning, so no answer
    assert "holds no end tag '</think>'" in message and "--reasoning-parser deepseek-r1" in message
    assert "let through" not in message
    with OpenAI(split + "/v1", "llmir-tiny") as oa:
        message = str(_failure(whole, oa))  # the server gated a gen meant over its whole output
    assert "holds the reasoning end tag 'tiny,'" in message and "let through" not in message


# --- what is sent, on a mock transport -----------------------------------------------------
def _endpoint(routes: dict[tuple[str, str], httpx.Response], seen: list, **options) -> Endpoint:
    ep = Endpoint("http://server:30000", **options)

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, body))
        return routes.get((request.method, request.url.path), httpx.Response(404, text="not found"))

    ep._client = httpx.Client(base_url=ep.base_url, transport=httpx.MockTransport(handler))
    return ep


R1_GATED = gen_step("a", {"regex": r"\d+", "reasoning": "deepseek-r1"})
WHOLE = gen_step("a", {"regex": r"\d+"})
FREE = gen_step("a", {"reasoning": "deepseek-r1"})


def _info(parser):
    answer = {"reasoning_parser": parser, "version": "0.4.10"}
    return {("GET", "/get_server_info"): httpx.Response(200, json=answer)}


def test_sglang_server_info_decides_before_anything_is_sent():
    seen: list = []
    ep = _endpoint(_info("DeepSeek-R1"), seen, protocol="sglang")
    with pytest.raises(ReasoningParserMismatchError, match="after the reasoning's end tag '</think>'"):
        ep._lower(WHOLE)
    assert "reasoning_parser" not in ep._lower(R1_GATED)  # SGLang's /generate has no such field
    assert ep._lower(R1_GATED)["sampling_params"]["regex"] == r"\d+"
    assert set(ep._lower(FREE)) == {"sampling_params"}
    assert seen == [("GET", "/get_server_info", None)]  # asked once

    # the same end tag is enough (SGLang gates at the end tag), another one is not
    assert "sampling_params" in _endpoint(_info("qwen3"), [], protocol="sglang")._lower(R1_GATED)
    with pytest.raises(ReasoningParserMismatchError) as info:
        _endpoint(_info("kimi"), [], protocol="sglang")._lower(R1_GATED)
    assert "runs --reasoning-parser kimi, whose reasoning ends at '\u25c1/think\u25b7'" in str(info.value)
    assert info.value.wanted == "deepseek-r1"

    # a server that does not say gets the constraint as it is: no /get_server_info, a parser
    # unknown here, no reasoning_parser in its answer
    for routes in ({}, _info("gpt-oss"), {("GET", "/get_server_info"): httpx.Response(200, json={})}):
        for step in (R1_GATED, WHOLE):
            assert _endpoint(routes, [], protocol="sglang")._lower(step)["sampling_params"]["regex"] == r"\d+"


def test_an_llmir_server_is_told_where_each_constraint_starts():
    seen: list = []
    health = {("GET", "/health"): httpx.Response(200, json={"server": "llmir"})}
    ep = _endpoint(health, seen)
    assert ep._lower(R1_GATED)["reasoning_parser"] == "deepseek-r1"
    assert ep._lower(WHOLE)["reasoning_parser"] is None  # whatever the server's own parser
    assert "reasoning_parser" not in ep._lower(FREE)  # unconstrained: as before
    qwen3 = gen_step("a", {"choices": ("x", "y"), "reasoning": "qwen3"})
    assert ep._lower(qwen3)["reasoning_parser"] in ("qwen3", "deepseek-v3", "glm45")  # <think>, not forced
    assert [p for _, p, _ in seen] == ["/health"]  # no server info needed
