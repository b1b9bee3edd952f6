"""What the official OpenAI clients (``openai`` 3.x, langchain-openai on top of it) read and do,
checked with httpx against the JSON shapes and headers they rely on (the tests do not import
``openai``):

- ``client.models.retrieve(name)`` is ``GET /v1/models/{name}``;
- errors carry ``param``, and ``x-should-retry: false`` where a retry cannot help (the clients
  retry every 5xx, a 501 included, twice by default);
- ``logprobs.content[i].bytes`` are the token's own bytes (joined, they give the text back), and
  every generated token has its entry and its own ``top_logprobs``, also the tokens a
  constraint's jump-forward forced;
- SGLang's constraint fields (``regex``, ``ebnf``, ``json_schema``) go through ``extra_body``;
- tool / function calling and audio in any of their request forms are a 501 naming them;
- a chat template that refuses the messages is a 400 with its message, not a 500.
"""

from __future__ import annotations

import json

import httpx
import pytest

MODEL = "llmir-tiny"
USER = [{"role": "user", "content": "Hi"}]


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    # OpenAI's ``code`` is a string ("model_not_found", ...) or null, never the HTTP status
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] is None or isinstance(err["code"], str), err
    return err


# --- models -------------------------------------------------------------------------------
def test_models_retrieve(client):
    listed = client.get("/v1/models").json()["data"][0]
    r = client.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200 and r.json() == listed
    err = _error(client.get("/v1/models/gpt-4o"), 404)
    assert err["type"] == "model_not_found" and err["param"] == "model" and "llmir-tiny" in err["message"]


# --- errors: shape and retry header --------------------------------------------------------
def test_errors_name_the_param_and_say_not_to_retry(client):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": "8"})
    assert _error(r, 400)["param"] == "max_tokens"
    assert r.headers["x-should-retry"] == "false"
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "n": 2})
    err = _error(r, 501)
    assert err["type"] == "not_implemented" and err["param"] == "n"
    assert r.headers["x-should-retry"] == "false"  # else the client sends it three times
    r = client.post("/v1/chat/completions", json={"model": "nope", "messages": USER})
    assert _error(r, 404)["param"] == "model" and r.headers["x-should-retry"] == "false"
    r = client.get("/v1/nope")
    assert _error(r, 404)["param"] is None and r.headers["x-should-retry"] == "false"


def test_error_codes_are_strings_or_null_as_openais(client):
    r = client.post("/v1/chat/completions", json={"model": "nope", "messages": USER})
    err = _error(r, 404)
    assert err["code"] == "model_not_found" and err["type"] == "model_not_found"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Q " * 3000, "max_tokens": 2})
    err = _error(r, 400)
    assert err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error"
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": "8"})
    assert _error(r, 400)["code"] is None
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "n": 2})
    assert _error(r, 501)["code"] is None
    assert _error(client.get("/v1/nope"), 404)["code"] is None


# --- OpenAI's value rules: stream_options needs stream; temperature, top_p, top_logprobs ranges ---
OPENAI_ROUTES = [("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "Q"})]


@pytest.mark.parametrize("route,body", OPENAI_ROUTES)
def test_stream_options_without_stream_is_a_400(client, route, body):
    base = {"model": MODEL, "max_tokens": 2, "temperature": 0, **body}
    for stream in ({}, {"stream": False}, {"stream": None}):
        r = client.post(route, json={**base, **stream, "stream_options": {"include_usage": True}})
        err = _error(r, 400)
        assert err["type"] == "invalid_request_error" and err["param"] == "stream_options"
        assert "only allowed when stream is true" in err["message"], err
        assert r.headers["x-should-retry"] == "false"
    assert client.post(route, json={**base, "stream_options": None}).status_code == 200
    streamed = {**base, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", route, json=streamed) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "usage" in json.loads(events[-2])


@pytest.mark.parametrize("route,body", OPENAI_ROUTES)
def test_temperature_outside_openais_range_is_a_400(client, route, body):
    base = {"model": MODEL, "max_tokens": 2, **body}
    for t in (2.5, 100.0, -0.5):
        err = _error(client.post(route, json={**base, "temperature": t}), 400)
        assert err["param"] == "temperature" and "[0, 2]" in err["message"] and repr(t) in err["message"], err
    for t in (0, 2.0):
        assert client.post(route, json={**base, "temperature": t}).status_code == 200
    # SGLang's /generate keeps the engine's rule (any temperature >= 0)
    sglang = {"text": "Q", "sampling_params": {"temperature": 2.5, "max_new_tokens": 2}}
    r = client.post("/generate", json=sglang)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route,body", OPENAI_ROUTES)
def test_top_p_takes_openais_range_and_0_keeps_the_most_likely_token(client, route, body):
    base = {"model": MODEL, "max_tokens": 8, "ignore_eos": True, **body}
    # OpenAI takes top_p 0 (the engine's top_p must be > 0): only the most likely token is drawn,
    # so a sample at temperature 2 is the greedy answer, whatever top_k says
    greedy = client.post(route, json={**base, "temperature": 0})
    assert greedy.status_code == 200, greedy.text
    hot = {**base, "temperature": 2.0}
    sampled = [client.post(route, json={**hot, "seed": s}).json()["choices"] for s in range(4)]
    assert any(c != greedy.json()["choices"] for c in sampled)  # else the check below shows nothing
    for extra in ({"seed": 0}, {"seed": 1, "top_k": 50}, {"seed": 2}, {"seed": 3}):
        r = client.post(route, json={**hot, "top_p": 0, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["choices"] == greedy.json()["choices"], (extra, r.json(), greedy.json())
    for p in (1.5, -0.1):
        err = _error(client.post(route, json={**base, "top_p": p}), 400)
        assert err["param"] == "top_p" and "[0, 1]" in err["message"] and repr(p) in err["message"], err
    # SGLang's /generate keeps the engine's rule: top_p in (0, 1]
    sglang = {"text": "Q", "sampling_params": {"top_p": 0, "max_new_tokens": 2}}
    assert _error(client.post("/generate", json=sglang), 400)["param"] == "sampling_params.top_p"


@pytest.mark.parametrize(
    "route,body,field",
    [
        ("/v1/chat/completions", {"messages": USER, "logprobs": True}, "top_logprobs"),
        ("/v1/completions", {"prompt": "Q"}, "logprobs"),
    ],
)
def test_top_logprobs_take_openais_range(client, route, body, field):
    base = {"model": MODEL, "max_tokens": 2, "temperature": 0, **body}
    for n in (21, 1000, -1):
        err = _error(client.post(route, json={**base, field: n}), 400)
        assert err["param"] == field and "[0, 20]" in err["message"] and repr(n) in err["message"], err
    r = client.post(route, json={**base, field: 20})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    tops = [e["top_logprobs"] for e in lp["content"]] if field == "top_logprobs" else lp["top_logprobs"]
    assert tops and all(len(top) == 20 for top in tops), tops
    # SGLang's /generate keeps the engine's rule (any number >= 0)
    sglang = {
        "text": "Q",
        "return_logprob": True,
        "top_logprobs_num": 21,
        "sampling_params": {"max_new_tokens": 2},
    }
    assert client.post("/generate", json=sglang).status_code == 200


@pytest.mark.parametrize("route,body", OPENAI_ROUTES)
def test_penalties_and_n_take_openais_ranges(client, route, body):
    """Already OpenAI's before the top_p / top_logprobs fix (the engine's own rules); kept here so
    that the /v1 routes stay in step with OpenAI's API."""
    base = {"model": MODEL, "max_tokens": 2, "temperature": 0, **body}
    for field in ("presence_penalty", "frequency_penalty"):
        for v in (2.5, -2.01):
            err = _error(client.post(route, json={**base, field: v}), 400)
            assert err["param"] == field and "[-2, 2]" in err["message"], err
        for v in (-2, 2):
            assert client.post(route, json={**base, field: v}).status_code == 200
    for n in (0, -1):
        assert _error(client.post(route, json={**base, "n": n}), 400)["param"] == "n"
    assert _error(client.post(route, json={**base, "n": 2}), 501)["param"] == "n"


# --- SGLang's constraint fields (extra_body) -------------------------------------------------
def test_sglang_constraint_fields(client):
    base = {"model": MODEL, "temperature": 0, "max_tokens": 6}
    r = client.post("/v1/chat/completions", json={**base, "messages": USER, "regex": "[0-9]+", "top_k": 5})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].isdigit()
    r = client.post("/v1/completions", json={**base, "prompt": "Q", "ebnf": 'root ::= "yes" | "no"'})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("yes", "no")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = {**base, "prompt": "JSON:", "max_tokens": 12, "json_schema": json.dumps(schema)}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith('{"a')
    both = {**base, "messages": USER, "regex": "[0-9]+", "guided_regex": "[a-z]+"}
    assert "not both" in _error(client.post("/v1/chat/completions", json=both), 400)["message"]
    both = {**base, "messages": USER, "regex": "[0-9]+", "response_format": {"type": "json_object"}}
    assert "not both" in _error(client.post("/v1/chat/completions", json=both), 400)["message"]


# --- logprobs: bytes, one entry per token, forced tokens ----------------------------------------
FORCED = {"guided_regex": "é😀x"}  # every token forced by jump-forward, one split character


def _chat_logprobs_stream(client, body: dict) -> tuple[str, list[dict]]:
    text, entries = "", []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                text += choice["delta"].get("content") or ""
                entries += (choice.get("logprobs") or {}).get("content") or []
    return text, entries


def _tokens(entries: list[dict]) -> list:
    """Each entry's token and its alternatives' tokens (logprobs vary in the last digits between
    a cached and an uncached prefill)."""
    return [(e["token"], e["bytes"], [t["token"] for t in e["top_logprobs"]]) for e in entries]


def test_chat_logprobs_bytes_and_forced_tokens(client):
    body = {"model": MODEL, "messages": USER, "max_tokens": 10, "logprobs": True, "top_logprobs": 2, **FORCED}
    r = client.post("/v1/chat/completions", json=body).json()
    text = r["choices"][0]["message"]["content"]
    entries = r["choices"][0]["logprobs"]["content"]
    assert text == "é😀x"
    # one entry per generated token (none lost to a shorter top_logprobs list)
    assert len(entries) == r["usage"]["completion_tokens"]
    # the raw bytes of each token, so a character split over tokens is whole again
    assert bytes(b for e in entries for b in e["bytes"]).decode() == text
    for e in entries:
        assert e["top_logprobs"] and e["top_logprobs"][0]["bytes"] == e["bytes"]
        assert e["logprob"] == 0.0 and e["top_logprobs"][0]["logprob"] == 0.0
    streamed_text, streamed = _chat_logprobs_stream(client, body)
    assert streamed_text == text and _tokens(streamed) == _tokens(entries)


def test_json_schema_top_logprobs_stay_with_their_tokens(client):
    """JSON keys are forced (logprob 0.0, no recorded alternatives); the sampled tokens after
    them keep their own alternatives, in the plain answer and in the stream."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Give a person"}],
        "max_tokens": 40,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    }
    r = client.post("/v1/chat/completions", json=body).json()
    entries = r["choices"][0]["logprobs"]["content"]
    assert len(entries) == r["usage"]["completion_tokens"]
    for e in entries:  # greedy: each token is its own best alternative
        assert e["top_logprobs"][0]["token"] == e["token"], entries
        assert abs(e["top_logprobs"][0]["logprob"] - e["logprob"]) < 1e-6
    assert _tokens(_chat_logprobs_stream(client, body)[1]) == _tokens(entries)
    comp = client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "Person JSON: ",
            "max_tokens": 30,
            "temperature": 0,
            "logprobs": 2,
            "guided_json": schema,
        },
    ).json()["choices"][0]["logprobs"]
    assert len(comp["top_logprobs"]) == len(comp["tokens"]) == len(comp["token_logprobs"])
    for token, top in zip(comp["tokens"], comp["top_logprobs"]):
        assert max(top, key=top.get) == token


def test_top_aligner_fills_forced_tokens():
    from llmir_lang.server.convert import TopAligner, align_top_logprobs

    # tokens 1..5; 2 and 4 were forced (logprob 0.0, nothing recorded)
    ids, lps = [1, 2, 3, 4, 5], [-0.5, 0.0, -1.0, 0.0, 0.0]
    recorded = [[(1, -0.5), (9, -1.2)], [(3, -0.2), (7, -1.0)], [(5, 0.0)]]
    want = [recorded[0], [(2, 0.0)], recorded[1], [(4, 0.0)], recorded[2]]
    assert align_top_logprobs(ids, lps, recorded) == want
    aligner = TopAligner()  # a stream: the same lists, chunk by chunk
    got = aligner.take(ids[:2], lps[:2], recorded[:1], total=2)
    got += aligner.take(ids[2:4], lps[2:4], recorded[:2], total=4)
    got += aligner.take(ids[4:], lps[4:], recorded, total=5)
    assert got == want
    whole = [[(1, -0.5)], [(2, 0.0)]]  # one list per token: taken as is
    assert align_top_logprobs([1, 2], [-0.5, 0.0], whole) == whole
    assert align_top_logprobs([1], [-0.5], None) is None


# --- tools, functions, audio: 501 in every form ------------------------------------------------
@pytest.mark.parametrize(
    "extra,feature,param",
    [
        ({"functions": [{"name": "f", "parameters": {}}]}, "function calling", "functions"),
        ({"function_call": {"name": "f"}}, "function calling", "functions"),
        (
            {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
            "audio",
            "modalities",
        ),
        (
            {
                "messages": USER
                + [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                        ],
                    },
                    {"role": "tool", "content": "42", "tool_call_id": "1"},
                ]
            },
            "tool calling",
            None,
        ),
    ],
)
def test_tool_and_audio_forms_are_501(client, extra, feature, param):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 2, **extra})
    err = _error(r, 501)
    assert feature in err["message"] and err["type"] == "not_implemented" and err["param"] == param


def test_text_modality_and_no_tools_are_served(client):
    body = {
        "model": MODEL,
        "messages": USER,
        "max_tokens": 2,
        "modalities": ["text"],
        "function_call": "none",
    }
    assert client.post("/v1/chat/completions", json=body).status_code == 200


# --- a chat template that refuses the conversation: 400 ----------------------------------------
REFUSING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture()
def refusing_server(tmp_path_factory):
    from server_harness import InProcessServer

    from llmir_lang.dsl.testing import random_checkpoint
    from llmir_lang.executor.engine import Engine

    folder = random_checkpoint(tmp_path_factory.mktemp("refusing_template"))
    engine = Engine(str(folder), device="cpu", kv_memory="16MB")
    engine.tokenizer.hf.chat_template = REFUSING_TEMPLATE
    server = InProcessServer(engine)
    url = server.url
    yield url, folder.name
    server.close()


def test_a_chat_template_that_refuses_the_messages_is_a_400(refusing_server):
    url, model = refusing_server
    messages = [{"role": "system", "content": "Be brief."}, *USER]
    r = httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 2})
    err = _error(r, 400)
    assert "System role not supported" in err["message"] and r.headers["x-should-retry"] == "false"
    assert err["param"] == "messages"
    r = httpx.post(url + "/apply_chat_template", json={"messages": messages})
    err = _error(r, 400)
    assert "System role not supported" in err["message"] and err["param"] == "messages"
    r = httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": USER, "max_tokens": 2})
    assert r.status_code == 200, r.text
