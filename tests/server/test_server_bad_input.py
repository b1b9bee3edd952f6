"""Bad requests get a 4xx with a JSON message that says what is wrong, and the server keeps serving."""

from __future__ import annotations

import json

import pytest
from server_harness import arithmetic_prompt

ROUTES = [
    "/generate",
    "/v1/completions",
    "/v1/chat/completions",
    "/program",
    "/score",
    "/apply_chat_template",
]
GOOD = {
    "text": arithmetic_prompt(5),
    "sampling_params": {"temperature": 0.0, "max_new_tokens": 4, "stop": ["\n"]},
}


def _error(r, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    code = body["error"]["code"]  # OpenAI's: a string or null, not the HTTP status
    assert set(body) == {"error"} and (code is None or isinstance(code, str))
    return body["error"]["message"]


def _still_serving(client) -> None:
    assert client.post("/generate", json=GOOD).json()["text"] == "12"


@pytest.mark.parametrize("route", ROUTES)
def test_malformed_json_is_400(client, route):
    for raw in (b'{"text": "Q",', b"\xff\xfe not json", b""):
        r = client.post(route, content=raw, headers={"content-type": "application/json"})
        assert "JSON" in _error(r, 400) or "missing" in _error(r, 400)
    r = client.post(route, content=b"[1, 2, 3]", headers={"content-type": "application/json"})
    _error(r, 400)


@pytest.mark.parametrize(
    "route,body,needle",
    [
        ("/generate", {**GOOD, "temprature": 0.5}, "unknown field 'temprature'"),
        (
            "/generate",
            {"text": "Q", "sampling_params": {"max_new_tokens": 4, "top_q": 1}},
            "unknown field 'sampling_params.top_q'",
        ),
        (
            "/generate",
            {"text": "Q", "sampling_params": {"temperature": "hot"}},
            "'sampling_params.temperature'",
        ),
        ("/generate", {"text": "Q", "sampling_params": {"max_new_tokens": "8"}}, "valid integer"),
        ("/generate", {"text": 5}, "field 'text'"),
        ("/generate", {"text": "Q", "stream": "yes"}, "field 'stream'"),
        ("/generate", {"text": "Q", "input_ids": [1, 2]}, "exactly one of 'text' and 'input_ids'"),
        ("/generate", {"input_ids": [1, 999999]}, "outside the vocabulary"),
        ("/generate", {"text": ""}, "empty"),
        ("/generate", {"text": "Q", "sampling_params": {"temperature": -1.0}}, "temperature must be"),
        ("/generate", {"text": "Q", "sampling_params": {"regex": "([0-9"}}, "regex"),
        ("/generate", {"text": "Q", "sampling_params": {"json_schema": "{not json"}}, "JSON"),
        (
            "/generate",
            {"text": "Q", "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}},
            "at most one constraint",
        ),
        ("/generate", {"text": "Q", "sampling_params": {"ebnf": "root ::= ("}}, "grammar"),
        ("/generate", {"text": ["a", "b"], "stream": True}, "stream=true takes one prompt"),
        ("/generate", {"text": "Q " * 3000}, "context"),
        ("/generate", {"text": "Q", "sampling_params": {"n": 0}}, "sampling_params.n must be >= 1"),
        ("/generate", {"text": "Q", "sampling_params": {"n": "2"}}, "field 'sampling_params.n'"),
        ("/v1/completions", {"model": "llmir-tiny"}, "missing required field 'prompt'"),
        (
            "/v1/completions",
            {"model": "llmir-tiny", "prompt": "x", "max_tokens": -3},
            "max_tokens must be >= 0",
        ),
        (
            "/v1/completions",
            {"model": "llmir-tiny", "prompt": "x", "temperature": [1]},
            "field 'temperature'",
        ),
        ("/v1/completions", {"model": "llmir-tiny", "prompt": "x", "guided_json": "{]"}, "JSON"),
        ("/v1/chat/completions", {"model": "llmir-tiny", "messages": []}, "field 'messages'"),
        (
            "/v1/chat/completions",
            {"model": "llmir-tiny", "messages": [{"role": "user"}], "function_calls": []},
            "unknown field 'function_calls'",
        ),
        (
            "/v1/chat/completions",
            {
                "model": "llmir-tiny",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema"},
            },
            "json_schema.schema",
        ),
        ("/score", {"prompt": "x", "continuations": []}, "continuations"),
        ("/program", {"ir": "module {\n  func @f( {\n}"}, "line"),
        ("/program", {"ir": 'module {\n  func @f() {\n    %0 = gen %9 "x"\n    return %0\n  }\n}'}, "%9"),
        ("/program", {"ir": "module {\n}"}, "no function"),
        ("/program", {"ir": 42}, "field 'ir'"),
        ("/program", {"ir": "module {\n}", "argz": {}}, "unknown field 'argz'"),
    ],
)
def test_bad_fields_are_400_with_a_clear_message(client, route, body, needle):
    message = _error(client.post(route, json=body), 400)
    assert needle in message, message


def test_logit_bias_is_501(client):
    body = {"model": "llmir-tiny", "prompt": "x", "logit_bias": {"5": 1.0}}
    assert "logit_bias" in _error(client.post("/v1/completions", json=body), 501)


CHAT = {"model": "llmir-tiny", "messages": [{"role": "user", "content": "Hi"}]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    "route,body,feature",
    [
        ("/generate", {**GOOD, "sampling_params": {"n": 3}}, "sampling_params.n=3"),
        ("/generate", {**GOOD, "sampling_params": {"no_stop_trim": True}}, "no_stop_trim"),
        ("/generate", {**GOOD, "image_data": "http://x/cat.png"}, "image_data"),
        ("/v1/completions", {"model": "llmir-tiny", "prompt": "x", "n": 3}, "n=3"),
        ("/v1/completions", {"model": "llmir-tiny", "prompt": "x", "best_of": 3}, "best_of=3"),
        ("/v1/completions", {"model": "llmir-tiny", "prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/chat/completions", {**CHAT, "n": 2}, "n=2"),
        ("/v1/chat/completions", {**CHAT, "tools": [TOOL]}, "tool calling"),
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            },
            "'image_url' content part",
        ),
    ],
)
def test_features_not_implemented_are_501_naming_them(client, route, body, feature):
    r = client.post(route, json=body)
    assert feature in _error(r, 501)
    assert r.json()["error"]["type"] == "not_implemented"


def test_a_json_body_is_read_whatever_its_content_type(client):
    """``curl -d '{...}'`` sends application/x-www-form-urlencoded (the README's example)."""
    for ctype in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"content-type": ctype} if ctype else {}
        r = client.post("/generate", content=json.dumps(GOOD).encode(), headers=headers)
        assert r.status_code == 200 and r.json()["text"] == "12", r.text
    form = {"content-type": "application/x-www-form-urlencoded"}
    message = _error(client.post("/generate", content=b"text=hi", headers=form), 400)
    assert "not valid JSON" in message and "Content-Type: application/json" in message


def test_deeply_nested_json_says_so(client):
    r = client.post("/generate", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert "nested too deeply" in _error(r, 400)
    _still_serving(client)


@pytest.mark.parametrize("stop", ["", [""], ["\n", ""]])
def test_an_empty_stop_string_is_refused_in_every_form(client, stop):
    body = {**GOOD, "sampling_params": {**GOOD["sampling_params"], "stop": stop}}
    assert "stop" in _error(client.post("/generate", json=body), 400)
    oa = {"model": "llmir-tiny", "prompt": "x", "max_tokens": 2, "stop": stop}
    assert "stop" in _error(client.post("/v1/completions", json=oa), 400)


@pytest.mark.parametrize("pattern,why", [("(unclosed", "does not parse"), ("x*", "empty string")])
def test_a_bad_stop_regex_is_refused(client, pattern, why):
    body = {**GOOD, "sampling_params": {**GOOD["sampling_params"], "stop_regex": pattern}}
    assert why in _error(client.post("/generate", json=body), 400)
    oa = {"model": "llmir-tiny", "prompt": "x", "max_tokens": 2, "stop_regex": [pattern]}
    assert why in _error(client.post("/v1/completions", json=oa), 400)
    _still_serving(client)


def test_scoring_a_prompt_of_the_whole_context_says_why_it_is_refused(client):
    ctx = client.get("/get_model_info").json()["context_length"]
    body = {"model": "llmir-tiny", "prompt": [5] * ctx, "max_tokens": 0, "echo": True, "logprobs": 0}
    message = _error(client.post("/v1/completions", json=body), 400)
    assert f"at most {ctx - 1} tokens" in message and "echo with max_tokens 0" in message
    body["prompt"] = [5] * (ctx - 1)  # one less is scored
    lps = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert len(lps) == ctx - 1 and lps[0] is None and all(v <= 0 for v in lps[1:])


def test_huge_bodies_are_413_declared_or_chunked(client):
    big = {"text": "x" * 300_000}
    assert "limit of 262144 bytes" in _error(client.post("/generate", json=big), 413)

    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    _error(r, 413)
    _still_serving(client)


def test_wrong_method_and_unknown_route(client):
    assert client.get("/generate").status_code == 405
    assert client.post("/no/such/route", json={}).status_code == 404


def test_server_keeps_serving_after_bad_requests(client):
    for _ in range(3):
        client.post("/generate", content=b"{", headers={"content-type": "application/json"})
        client.post("/program", json={"ir": "garbage"})
        client.post("/generate", json={"text": "Q", "sampling_params": {"regex": "("}})
    _still_serving(client)
    stats = client.get("/stats").json()
    assert stats["server"]["active_requests"] == 0 and stats["engine_requests"] == 0


def test_a_lone_surrogate_in_a_prompt_is_a_400_and_the_connection_stays_up(client):
    bodies = [
        ("/generate", b'{"text":"\\ud800 hi","sampling_params":{"max_new_tokens":2}}'),
        ("/v1/completions", b'{"model":"llmir-tiny","prompt":"\\udfff x","max_tokens":2}'),
        ("/v1/chat/completions", b'{"model":"llmir-tiny","messages":[{"role":"user","content":"\\ud83d"}],"max_tokens":2}'),
    ]  # fmt: skip
    for route, raw in bodies:
        r = client.post(route, content=raw, headers={"content-type": "application/json"})
        assert "lone surrogate" in _error(r, 400), route
        _still_serving(client)  # the same keep-alive connection


def test_nulls_take_the_defaults_as_openai_does(client):
    body = {
        "model": "llmir-tiny",
        "messages": [{"role": "user", "content": "What is 5 + 7?"}],
        "max_tokens": 4,
    }
    nulls = {
        k: None
        for k in ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "logprobs", "stream")
    }
    r = client.post("/v1/chat/completions", json={**body, **nulls})
    assert r.status_code == 200, r.text
    r = client.post(
        "/v1/completions",
        json={"model": "llmir-tiny", "prompt": "x", "max_tokens": 2, "echo": None, "stream": None},
    )
    assert r.status_code == 200, r.text
    assert "temperature" in _error(
        client.post("/v1/chat/completions", json={**body, "temperature": "hot"}), 400
    )


def test_chat_roles_are_openais(client):
    base = {"model": "llmir-tiny", "max_tokens": 2, "temperature": 0}
    bogus = {**base, "messages": [{"role": "bogus", "content": "hi"}]}
    assert "role" in _error(client.post("/v1/chat/completions", json=bogus), 400)
    tool = {**base, "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]}
    assert "tool calling" in _error(client.post("/v1/chat/completions", json=tool), 501)
    developer = {
        **base,
        "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    }
    system = {
        **base,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    }
    got = client.post("/v1/chat/completions", json=developer).json()
    want = client.post("/v1/chat/completions", json=system).json()
    assert got["choices"][0]["message"] == want["choices"][0]["message"]
    assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
