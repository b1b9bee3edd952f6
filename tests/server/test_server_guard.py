"""API key, max_tokens limit and body-size limit of ``llmir serve``, set on the command line."""

from __future__ import annotations

import httpx
import pytest
from server_harness import arithmetic_prompt, served

import llmir_lang as llmir
from llmir_lang.executor.backend import ChainRequest, GenStep
from llmir_lang.executor.remote import Endpoint, OpenAI, RemoteBackendError
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.ir import print_ir

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def guarded():
    options = ["--api-key", KEY, "--max-tokens-limit", "16", "--max-request-bytes", "4096"]
    with served(*options, "--served-model-name", "tiny") as proc:
        yield proc


def _gen(url: str, headers: dict[str, str] | None = None, **sampling) -> httpx.Response:
    body = {"text": arithmetic_prompt(5), "sampling_params": {"temperature": 0.0, **sampling}}
    return httpx.post(url + "/generate", json=body, headers=headers or {}, timeout=30)


def test_api_key_is_required_except_on_health(guarded):
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"X-API-Key": "nope"}):
        r = _gen(guarded.url, headers, max_new_tokens=2)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(guarded.url + "/v1/models", timeout=10).status_code == 401
    ok = {"Authorization": f"Bearer {KEY}"}
    for headers in (ok, {"X-API-Key": KEY}):
        r = _gen(guarded.url, headers, max_new_tokens=4, stop=["\n"])
        assert r.status_code == 200, r.text
        assert r.json()["text"] == "12"


def test_max_tokens_limit(guarded):
    ok = {"Authorization": f"Bearer {KEY}"}
    r = _gen(guarded.url, ok, max_new_tokens=17)
    assert r.status_code == 400 and "limit of 16" in r.json()["error"]["message"]
    capped = _gen(guarded.url, ok, ignore_eos=True).json()  # no max_new_tokens: the default, capped
    assert capped["meta_info"]["completion_tokens"] == 16
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
    out = httpx.post(guarded.url + "/v1/chat/completions", json=chat, headers=ok, timeout=30).json()
    assert out["usage"]["completion_tokens"] == 16
    r = httpx.post(
        guarded.url + "/v1/chat/completions", json={**chat, "max_tokens": 99}, headers=ok, timeout=30
    )
    assert r.status_code == 400


def test_body_size_limit_before_and_after_auth(guarded):
    ok = {"Authorization": f"Bearer {KEY}"}
    big = {"text": "x" * 5000}
    r = httpx.post(guarded.url + "/generate", json=big, headers=ok, timeout=30)
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    r = httpx.post(guarded.url + "/generate", json=big, timeout=30)
    assert r.status_code == 401  # no key: refused before the body is read
    assert _gen(guarded.url, ok, max_new_tokens=4, stop=["\n"]).json()["text"] == "12"


def test_backends_send_the_api_key(guarded):
    request = ChainRequest(
        arithmetic_prompt(5), [GenStep("a", SamplingParams(max_new_tokens=4, stop=["\n"]))]
    )
    with Endpoint(guarded.url, api_key=KEY) as ep:
        assert ep.protocol == "llmir"
        assert ep.submit(request).result(timeout=30).steps[0].text == "12"
    with OpenAI(guarded.url + "/v1", "tiny", api_key=KEY) as oa:
        assert oa.submit(request).result(timeout=30).steps[0].text == "12"
    with Endpoint(guarded.url, api_key="wrong", protocol="llmir") as bad:
        result = bad.submit(request).result(timeout=30)
        assert result.error is not None and "401" in result.error


def test_openai_backend_wrong_key_is_an_auth_error_not_a_missing_feature(guarded):
    with OpenAI(guarded.url + "/v1", "tiny", api_key="wrong") as oa:
        for call in (
            lambda: oa.score(arithmetic_prompt(5), ["12"]),
            lambda: oa.apply_chat_template([{"role": "user", "content": "hi"}]),
        ):
            with pytest.raises(RemoteBackendError) as e:
                call()
            assert e.value.status == 401 and "API key" in str(e.value)
    with OpenAI(guarded.url + "/v1", "tiny", api_key=KEY) as oa:  # and with the key, it works
        assert oa.score(arithmetic_prompt(5), ["12"])[0][0] < 0


@llmir.function
def _default_tokens(s):
    s += arithmetic_prompt(5) + llmir.gen("a", ignore_eos=True)


@llmir.function
def _explicit_tokens(s):
    s += arithmetic_prompt(5) + llmir.gen("a", max_tokens=17, ignore_eos=True)


def test_gens_without_max_tokens_get_the_limit_and_explicit_ones_above_it_are_refused(guarded):
    ok = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(
        guarded.url + "/program", json={"ir": print_ir(_default_tokens.trace())}, headers=ok, timeout=60
    )
    assert r.status_code == 200, r.text
    (state,) = r.json()["functions"][0]["states"]
    assert state["error"] is None and state["meta"]["a"]["completion_tokens"] == 16
    r = httpx.post(
        guarded.url + "/program", json={"ir": print_ir(_explicit_tokens.trace())}, headers=ok, timeout=60
    )
    assert r.status_code == 400 and "limit of 16" in r.json()["error"]["message"]
    for backend in (Endpoint(guarded.url, api_key=KEY), OpenAI(guarded.url + "/v1", "tiny", api_key=KEY)):
        with backend:
            for _ in range(2):  # the OpenAI backend learns the limit on the first refusal
                state = _default_tokens.run(backend=backend)
                assert state.error() is None, state.error()
                assert state.get_meta_info("a")["completion_tokens"] == 16
            with pytest.raises(Exception, match="limit of 16"):
                _explicit_tokens.run(backend=backend)


def test_an_unexpected_error_is_a_500_answered_without_raising():
    """Starlette's handler for Exception answers and re-raises, and uvicorn then drops the client's
    keep-alive connection; the guard answers a bug's 500 itself and returns normally."""
    import asyncio
    import json as _json

    from llmir_lang.server.app import GuardMiddleware

    async def broken(scope, receive, send):
        raise TypeError("a bug")

    sent: list[dict] = []

    async def run() -> None:
        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": "/generate", "headers": [(b"content-type", b"application/json")]}
        await GuardMiddleware(broken, api_key=None, max_bytes=1000)(scope, receive, send)

    asyncio.run(run())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500
    body = _json.loads(sent[1]["body"])
    assert body["error"]["type"] == "internal_error" and "TypeError: a bug" in body["error"]["message"]
