"""SGLang's remote-backend names and calling forms: ``RuntimeEndpoint(base_url, api_key, verify)``,
``OpenAI("model-name", base_url=..., api_key=...)``, ``flush_cache`` / ``get_server_info`` on an
endpoint. The HTTP side is a mock transport (no server): these test what is sent where."""

from __future__ import annotations

import json

import httpx
import pytest

import llmir_lang as llmir
from llmir_lang.errors import InvalidRequestError, NotYetSupportedError
from llmir_lang.executor.remote import RemoteBackendError


def _mock(backend, routes: dict[tuple[str, str], httpx.Response], seen: list) -> None:
    """Answer ``backend``'s requests from ``routes`` ((method, path) -> response), recording them."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.headers.get("authorization")))
        return routes.get((request.method, request.url.path), httpx.Response(404, text="not found"))

    backend._client = httpx.Client(
        base_url=backend.base_url, headers=backend._client.headers, transport=httpx.MockTransport(handler)
    )


def test_runtime_endpoint_is_endpoint_with_sglangs_constructor():
    ep = llmir.RuntimeEndpoint("http://127.0.0.1:9/", "KEY", False)  # base_url, api_key, verify
    assert isinstance(ep, llmir.Endpoint) and ep.base_url == "http://127.0.0.1:9"
    assert ep._client.headers["authorization"] == "Bearer KEY"
    ep.close()
    with pytest.raises(NotYetSupportedError, match="tokenizer="):
        llmir.RuntimeEndpoint("http://127.0.0.1:9", chat_template_name="llama-3")


def test_endpoint_flush_cache_and_server_info_on_an_sglang_server():
    seen: list = []
    ep = llmir.RuntimeEndpoint("http://sglang:30000", protocol="sglang")
    info = {"version": "0.4", "model_path": "m"}
    _mock(
        ep,
        {
            ("POST", "/flush_cache"): httpx.Response(200, text="Cache flushed."),
            ("GET", "/get_server_info"): httpx.Response(200, json=info),
        },
        seen,
    )
    llmir.set_default_backend(ep)
    try:
        llmir.flush_cache()
        assert llmir.get_server_info() == info
    finally:
        llmir.set_default_backend(None)
    assert [(m, p) for m, p, _ in seen] == [("POST", "/flush_cache"), ("GET", "/get_server_info")]

    newer: list = []  # a newer SGLang serves /server_info only
    _mock(ep, {("GET", "/server_info"): httpx.Response(200, json=info)}, newer)
    assert ep.get_server_info() == info


def test_endpoint_server_info_on_an_llmir_server_and_errors():
    seen: list = []
    ep = llmir.Endpoint("http://llmir:30000", protocol="llmir")
    _mock(
        ep,
        {
            ("GET", "/health"): httpx.Response(200, json={"server": "llmir", "version": "0.1.0"}),
            ("GET", "/get_model_info"): httpx.Response(200, json={"model_path": "/m"}),
            ("POST", "/flush_cache"): httpx.Response(500, json={"detail": "boom"}),
        },
        seen,
    )
    assert ep.get_server_info() == {"server": "llmir", "version": "0.1.0", "model_path": "/m"}
    with pytest.raises(RemoteBackendError, match="flush_cache: HTTP 500: boom"):
        ep.flush_cache()


def test_openai_takes_sglangs_model_first_form(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    oa = llmir.OpenAI("gpt-3.5-turbo-instruct")
    assert (oa.model, oa.model_name, oa.base_url) == (
        "gpt-3.5-turbo-instruct",
        "gpt-3.5-turbo-instruct",
        "https://api.openai.com/v1",
    )
    assert "authorization" not in oa._client.headers and oa.is_chat_model is False

    monkeypatch.setenv("OPENAI_BASE_URL", "http://vllm:8000/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "ENVKEY")
    oa = llmir.OpenAI("tiny", False)  # SGLang's second positional: is_chat_model
    assert oa.base_url == "http://vllm:8000/v1" and oa._client.headers["authorization"] == "Bearer ENVKEY"
    oa = llmir.OpenAI("tiny", base_url="http://other/v1", api_key="K", timeout=5)
    assert oa.base_url == "http://other/v1" and oa._client.headers["authorization"] == "Bearer K"

    # llmir's own form is unchanged, keywords included, and reads no environment
    oa = llmir.OpenAI("http://llmir:30000/v1", "llmir-tiny")
    assert (oa.base_url, oa.model) == ("http://llmir:30000/v1", "llmir-tiny")
    assert "authorization" not in oa._client.headers
    oa = llmir.OpenAI(base_url="http://llmir:30000/v1", model="llmir-tiny", api_key="X")
    assert oa._client.headers["authorization"] == "Bearer X"


def test_openai_sends_the_model_named_first():
    seen: list = []
    oa = llmir.OpenAI("tiny", base_url="http://vllm/v1")
    body = {"choices": [{"text": " 4", "finish_reason": "stop"}], "usage": {}}
    sent: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        seen.append(request.url.path)
        return httpx.Response(200, json=body)

    oa._client = httpx.Client(base_url=oa.base_url, transport=httpx.MockTransport(handler))

    @llmir.function
    def prog(s):
        s += "2 + 2 =" + llmir.gen("a", max_tokens=2)

    assert prog.run(backend=oa)["a"] == " 4"
    assert seen == ["/v1/completions"] and sent[0]["model"] == "tiny" and sent[0]["prompt"] == "2 + 2 ="


def test_openai_refuses_what_it_cannot_honour():
    with pytest.raises(NotYetSupportedError, match="/v1/completions only"):
        llmir.OpenAI("gpt-4o-mini", is_chat_model=True)
    with pytest.raises(NotYetSupportedError, match="tokenizer="):
        llmir.OpenAI("gpt-4o-mini", chat_template=object())
    with pytest.raises(NotYetSupportedError, match="Azure"):
        llmir.OpenAI("gpt-4o-mini", is_azure=True)
    with pytest.raises(InvalidRequestError, match=r"unknown option\(s\) \['organization'\]"):
        llmir.OpenAI("gpt-4o-mini", organization="org")
    with pytest.raises(InvalidRequestError, match="needs the model too"):
        llmir.OpenAI("http://vllm/v1")
    with pytest.raises(InvalidRequestError, match="two base URLs"):
        llmir.OpenAI("http://a/v1", "m", base_url="http://b/v1")


def test_an_error_event_in_a_stream_keeps_its_status():
    """An ``{"error": ...}`` event inside a stream (status 200) becomes a ``RemoteBackendError``
    whose ``status`` is the one the server gives that error outside a stream: SGLang and vLLM send
    it as ``code``; llmir and OpenAI send ``code`` as a string or null, and the ``type`` says it
    (callers such as ``llmir extract`` tell a bad request from a failing server by the status)."""
    events = {
        "llmir-400": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None},
        "llmir-503": {"message": "stopping", "type": "server_shutting_down", "param": None, "code": None},
        "llmir-code": {"message": "long", "type": "invalid_request_error", "param": None,
                       "code": "context_length_exceeded"},
        "vllm-400": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400},
        "bare": {"message": "boom"},
    }  # fmt: skip
    expected = {"llmir-400": 400, "llmir-503": 503, "llmir-code": 400, "vllm-400": 400, "bare": None}
    for backend in (llmir.OpenAI("tiny", base_url="http://llmir/v1"), llmir.Endpoint("http://llmir")):
        for name, error in events.items():
            chunk = {"choices": [{"index": 0, "text": "a", "finish_reason": None}]}
            sse = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n"
            answer = httpx.MockTransport(lambda _, sse=sse: httpx.Response(200, text=sse))
            backend._client = httpx.Client(base_url=backend.base_url, transport=answer)
            got = []
            with pytest.raises(RemoteBackendError) as e:
                got.extend(backend._events("/completions", {"stream": True}))
            assert got == [chunk] and e.value.status == expected[name], (name, e.value.status)
            assert error["message"] in str(e.value) and e.value.detail == error["message"]
        backend.close()
