"""Every 400 names the request field at fault in ``param`` (OpenAI's error shape), as the client
sent it (a nested one as a dotted path: ``sampling_params.temperature``), also for the checks
made by the engine and the constraint compiler, which know nothing of the request; of two
fields that conflict it names the second and the message names both. Errors that are not about
one field keep ``param: null``; ``type`` and ``code`` are unchanged."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import pytest
from server_harness import arithmetic_prompt

from llmir_lang.errors import InvalidRequestError
from llmir_lang.executor.constraints.errors import InvalidRegexError
from llmir_lang.server.convert import EventStream, sampling_params
from llmir_lang.server.errors import blame, with_param

MODEL = "llmir-tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Q", "max_tokens": 2}
GENERATE = {"text": "Q", "sampling_params": {"max_new_tokens": 2}}
OPENAI = [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]


def _error(r, param: str | None, *needles: str) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == "invalid_request_error", err
    assert err["param"] == param, err
    for needle in needles:
        assert needle in err["message"], err
    assert r.headers["x-should-retry"] == "false"
    return err


def _generate(**sampling) -> dict:
    return {**GENERATE, "sampling_params": {**GENERATE["sampling_params"], **sampling}}


# --- the reported cases -----------------------------------------------------------------
def test_generate_temperature_below_zero_names_it(client):
    err = _error(client.post("/generate", json=_generate(temperature=-1)), "sampling_params.temperature")
    assert "temperature must be a number >= 0" in err["message"] and "-1" in err["message"], err
    # a batch with one sampling_params per prompt: its position, as the validation errors give it
    body = {"text": ["Q", "R"], "sampling_params": [{"max_new_tokens": 2}, {"temperature": -1.0}]}
    _error(client.post("/generate", json=body), "sampling_params.1.temperature", "temperature must be")


@pytest.mark.parametrize("stop", ["", [""], ["\n", ""]])
@pytest.mark.parametrize("route,base", OPENAI)
def test_an_empty_stop_string_names_stop(client, route, base, stop):
    _error(client.post(route, json={**base, "stop": stop}), "stop", "stop must be a non-empty string")


def test_an_empty_stop_string_on_generate_names_its_path(client):
    r = client.post("/generate", json=_generate(stop=""))
    _error(r, "sampling_params.stop", "stop must be a non-empty string")


@pytest.mark.parametrize(
    "route,body,param,named",
    [
        ("/generate", _generate(regex="[0-9]+", json_schema='{"type": "integer"}'), "sampling_params.json_schema",
         ["sampling_params.regex", "sampling_params.json_schema", "at most one constraint"]),
        ("/generate", _generate(regex="a", ebnf='root ::= "a"'), "sampling_params.ebnf",
         ["sampling_params.regex", "sampling_params.ebnf"]),
        ("/v1/completions", {**COMPLETION, "regex": "[0-9]+", "json_schema": {"type": "integer"}}, "json_schema",
         ["regex", "json_schema", "at most one constraint"]),
        ("/v1/completions", {**COMPLETION, "guided_regex": "a", "guided_json": {"type": "integer"}}, "guided_json",
         ["guided_regex", "guided_json"]),
        ("/v1/chat/completions", {**CHAT, "guided_regex": "a", "regex": "b"}, "regex",
         ["guided_regex", "regex", "same constraint"]),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}, "regex": "[0-9]+"},
         "response_format", ["regex", "response_format"]),
        ("/v1/completions", {**COMPLETION, "response_format": {"type": "json_object"}, "guided_choice": ["a"]},
         "response_format", ["guided_choice", "response_format"]),
    ],
)  # fmt: skip
def test_two_constraints_name_the_second_and_the_message_both(client, route, body, param, named):
    _error(client.post(route, json=body), param, *named)


def test_a_response_format_of_type_text_is_no_constraint(client):
    body = {**CHAT, "response_format": {"type": "text"}, "regex": "[0-9]"}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("pattern", ["x*", "(a|)", ""])
def test_a_stop_regex_that_matches_the_empty_string_names_stop_regex(client, pattern):
    why = "non-empty regex" if pattern == "" else "matches the empty string"
    for route, base in OPENAI:
        _error(client.post(route, json={**base, "stop_regex": pattern}), "stop_regex", why)
        _error(client.post(route, json={**base, "stop_regex": ["\n", pattern]}), "stop_regex", why)
    _error(client.post("/generate", json=_generate(stop_regex=pattern)), "sampling_params.stop_regex", why)


# --- values that were taken, or silently ignored ----------------------------------------------
def _vocab_size(client) -> int:
    config = Path(client.get("/get_model_info").json()["model_path"], "config.json")
    return json.loads(config.read_text())["vocab_size"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_token_ids_outside_the_vocabulary_name_the_id_and_its_size(client, stream):
    """An id the model has no token for never stops anything: ids >= the vocabulary size were
    taken silently (a typo that did nothing), and a negative one was refused without the size."""
    vocab = _vocab_size(client)
    batch = {"text": ["Q", "R"], "sampling_params": [{"max_new_tokens": 2}, {"stop_token_ids": [vocab]}]}
    cases = [
        ("/generate", _generate(stop_token_ids=[5, vocab]), "sampling_params.stop_token_ids", vocab),
        ("/generate", _generate(stop_token_ids=[5, -1]), "sampling_params.stop_token_ids", -1),
        ("/v1/completions", {**COMPLETION, "stop_token_ids": [5, 10**9]}, "stop_token_ids", 10**9),
        ("/v1/chat/completions", {**CHAT, "stop_token_ids": [5, vocab + 1]}, "stop_token_ids", vocab + 1),
        ("/v1/chat/completions", {**CHAT, "stop_token_ids": [5, -3]}, "stop_token_ids", -3),
    ]
    for route, body, param, bad in cases:
        r = client.post(route, json={**body, "stream": stream})
        _error(r, param, f"stop_token_ids[1] is {bad}", f"vocabulary has {vocab} tokens")
    if not stream:  # a batch cannot stream
        r = client.post("/generate", json=batch)
        _error(r, "sampling_params.1.stop_token_ids", f"[0] is {vocab}", f"{vocab} tokens")
    # the first and the last id of the vocabulary are taken
    ok = [("/generate", _generate(stop_token_ids=[0, vocab - 1]))]
    ok += [(route, {**base, "stop_token_ids": [0, vocab - 1]}) for route, base in OPENAI]
    for route, body in ok:
        r = client.post(route, json={**body, "stream": stream})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "fields,param,needle",
    [
        ({"max_tokens": -5, "max_completion_tokens": 3}, "max_tokens", "max_tokens must be >= 0, got -5"),
        ({"max_tokens": 5000, "max_completion_tokens": 3}, "max_tokens", "max_tokens 5000 is above"),
        ({"max_tokens": 3, "max_completion_tokens": -1}, "max_completion_tokens", "must be >= 0, got -1"),
        ({"max_tokens": None, "max_completion_tokens": 5000}, "max_completion_tokens", "limit of 960"),
    ],
)
def test_chat_checks_max_tokens_also_next_to_max_completion_tokens(client, stream, fields, param, needle):
    """max_completion_tokens wins when both are given, and a bad max_tokens next to it was ignored."""
    _error(client.post("/v1/chat/completions", json={**CHAT, **fields, "stream": stream}), param, needle)


def test_max_completion_tokens_wins_over_max_tokens(client):
    """OpenAI's current name wins over its deprecated one (as on vLLM and SGLang); completions
    know only max_tokens, as OpenAI's legacy completions do."""
    body = {**CHAT, "temperature": 0.0, "ignore_eos": True}
    for max_tokens, max_completion_tokens in [(2, 5), (5, 2), (0, 3)]:
        fields = {"max_tokens": max_tokens, "max_completion_tokens": max_completion_tokens}
        usage = client.post("/v1/chat/completions", json={**body, **fields}).json()["usage"]
        assert usage["completion_tokens"] == max_completion_tokens, (fields, usage)
    r = client.post("/v1/completions", json={**COMPLETION, "max_completion_tokens": 3})
    _error(r, "max_completion_tokens", "unknown field 'max_completion_tokens'")


@pytest.mark.parametrize(
    "body,param,needle",
    [
        ({"text": []}, "text", "text is an empty list"),
        ({"text": [], "stream": True}, "text", "text is an empty list"),
        ({"text": [], "sampling_params": [], "rid": []}, "text", "text is an empty list"),
        ({"input_ids": []}, "input_ids", "input_ids is an empty list"),
        ({"input_ids": [], "stream": True}, "input_ids", "input_ids is an empty list"),
        ({"input_ids": [[]]}, "input_ids.0", "empty"),
        ({"input_ids": [[5, 6], []]}, "input_ids.1", "empty"),
        ({"text": ["Q", ""], "sampling_params": {"max_new_tokens": 2}}, "text.1", "empty"),
    ],
)
def test_an_empty_batch_or_prompt_on_generate_is_a_400(client, body, param, needle):
    """``"text": []`` (a batch of no prompt) was answered with ``[]``."""
    _error(client.post("/generate", json=body), param, needle)


# --- the streaming path: the same 400, before the stream starts ----------------------------
def test_streamed_requests_get_the_same_param(client):
    stream = {"stream": True}
    r = client.post("/generate", json={**_generate(temperature=-1), **stream})
    _error(r, "sampling_params.temperature", "temperature must be")
    _error(client.post("/v1/chat/completions", json={**CHAT, **stream, "stop": ""}), "stop", "stop must be")
    r = client.post("/v1/completions", json={**COMPLETION, **stream, "stop_regex": "x*"})
    _error(r, "stop_regex", "empty string")
    r = client.post("/v1/chat/completions", json={**CHAT, **stream, "guided_regex": "(unclosed"})
    _error(r, "guided_regex", "regex")


def test_an_error_event_mid_stream_names_its_param():
    """After the status line only an event can carry an error: it has the same shape."""

    async def events():
        yield {"text": "a"}
        raise with_param(InvalidRequestError("bad value"), "stop")

    async def frames() -> list[str]:
        return [f async for f in EventStream(events())._frames()]

    out = asyncio.run(frames())
    assert out[-1] == "data: [DONE]\n\n"
    err = json.loads(out[-2][len("data: ") :])["error"]
    assert err == {"message": "bad value", "type": "invalid_request_error", "param": "stop", "code": None}


# --- every other 400 ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "route,body,param,needle",
    [
        # the sampling values the engine checks, under the route's own field names
        ("/generate", _generate(top_p=0), "sampling_params.top_p", "top_p must be"),
        ("/generate", _generate(min_p=2.0), "sampling_params.min_p", "min_p must be"),
        ("/generate", _generate(repetition_penalty=0), "sampling_params.repetition_penalty", "repetition_penalty"),
        ("/generate", _generate(presence_penalty=5), "sampling_params.presence_penalty", "presence_penalty"),
        ("/generate", _generate(stop_token_ids=[-1]), "sampling_params.stop_token_ids", "stop_token_ids"),
        ("/generate", _generate(sampling_seed=2**70), "sampling_params.sampling_seed", "seed must be"),
        ("/generate", _generate(max_new_tokens=4, min_new_tokens=8), "sampling_params.min_new_tokens",
         "min_new_tokens (8) is larger than max_new_tokens (4)"),
        ("/generate", _generate(max_new_tokens=5000), "sampling_params.max_new_tokens", "limit of 960"),
        ("/generate", _generate(max_new_tokens=-1), "sampling_params.max_new_tokens", "must be >= 0"),
        ("/generate", {**GENERATE, "return_logprob": True, "top_logprobs_num": -1}, "top_logprobs_num",
         "top_logprobs_num"),
        ("/v1/completions", {**COMPLETION, "top_p": 1.5}, "top_p", "top_p must be"),
        ("/v1/completions", {**COMPLETION, "frequency_penalty": -3}, "frequency_penalty", "frequency_penalty"),
        ("/v1/completions", {**COMPLETION, "min_tokens": -1}, "min_tokens", "min_new_tokens"),
        ("/v1/completions", {**COMPLETION, "logprobs": -2}, "logprobs", "logprobs must be an integer in [0, 20]"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 5000}, "max_tokens", "limit of 960"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -1}, "max_completion_tokens", "must be >= 0"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": -1}, "top_logprobs", "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", "logprobs=true"),
        # constraints: a bad one names its field
        ("/generate", _generate(regex="([0-9"), "sampling_params.regex", "regex"),
        ("/generate", _generate(json_schema="{not json"), "sampling_params.json_schema", "JSON"),
        ("/generate", _generate(ebnf="root ::= ("), "sampling_params.ebnf", "grammar"),
        ("/v1/completions", {**COMPLETION, "guided_json": "{]"}, "guided_json", "JSON"),
        ("/v1/completions", {**COMPLETION, "guided_choice": []}, "guided_choice", "choices"),
        ("/v1/chat/completions", {**CHAT, "ebnf": "root ::= ("}, "ebnf", "grammar"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}},
         "response_format.json_schema", "json_schema.schema"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema.schema", "json_schema.schema"),
        ("/v1/chat/completions",
         {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
         "response_format", "nope"),
        # the prompt
        ("/generate", {"text": ""}, "text", "empty"),
        ("/generate", {"text": "Q " * 3000}, "text", "context"),
        ("/generate", {"input_ids": [1, 999999]}, "input_ids", "outside the vocabulary"),
        ("/generate", {"text": ["Q", ""]}, "text.1", "empty"),
        ("/generate", {"text": "Q", "input_ids": [1, 2]}, "input_ids", "exactly one of 'text' and 'input_ids'"),
        ("/generate", {"sampling_params": {"max_new_tokens": 2}}, "text", "exactly one of 'text' and 'input_ids'"),
        ("/generate", {"text": "Q", "return_logprob": True, "logprob_start_len": 50}, "logprob_start_len",
         "logprob_start_len 50"),
        ("/v1/completions", {**COMPLETION, "prompt": "Q " * 3000}, "prompt", "context"),
        ("/v1/completions", {**COMPLETION, "prompt": [[5, 6], []]}, "prompt.1", "empty"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "Q " * 3000}]}, "messages",
         "context"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages.0.content.0.text", "'text' string"),
        # the shape of the request
        ("/generate", {"text": ["a", "b"], "stream": True}, "stream", "stream=true takes one prompt"),
        ("/generate", {"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params", "1 sampling_params for 2"),
        ("/generate", {"text": ["a", "b"], "rid": ["x"]}, "rid", "1 rids for 2 prompts"),
        ("/generate", {"text": "Q", "sampling_params": {"n": 0}}, "sampling_params.n", "sampling_params.n must be"),
        ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"], "stream": True}, "stream", "one prompt"),
        ("/v1/completions", {**COMPLETION, "echo": True, "stream": True}, "stream", "echo"),
        ("/v1/completions", {**COMPLETION, "temperature": 3}, "temperature", "[0, 2]"),
        ("/v1/completions", {**COMPLETION, "n": 0}, "n", "n must be >= 1"),
        ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature", "field 'temperature'"),
        # llmir's own routes
        ("/score", {"prompt": "", "continuations": ["a"]}, "prompt", "non-empty prompt"),
        ("/score", {"prompt": "x", "continuations": ["a", ""]}, "continuations.1", "at least one token"),
        ("/score", {"prompt": "x " * 3000, "continuations": ["a"]}, "prompt", "context"),
        ("/program", {"ir": "module {\n  func @f( {\n}"}, "ir", "line"),
        ("/program", {"ir": 'module {\n  func @f() {\n    %0 = gen %9 "x"\n    return %0\n  }\n}'}, "ir", "%9"),
        ("/program", {"ir": "module {\n}"}, "ir", "no function"),
    ],
)  # fmt: skip
def test_each_400_names_its_field(client, route, body, param, needle):
    _error(client.post(route, json=body), param, needle)


def test_a_long_continuation_names_itself(client):
    ctx = client.get("/get_model_info").json()["context_length"]
    r = client.post("/score", json={"prompt": "x", "continuations": ["a", "a " * ctx]})
    _error(r, "continuations.1", "context")


def test_scoring_a_whole_context_names_the_prompt(client):
    ctx = client.get("/get_model_info").json()["context_length"]
    body = {**COMPLETION, "prompt": [5] * ctx, "max_tokens": 0, "echo": True, "logprobs": 0}
    _error(client.post("/v1/completions", json=body), "prompt", "echo with max_tokens 0")


def test_program_args_and_passes_are_named(client):
    ir = "module {\n  func @f(%q: text) {\n    %0 = start\n    return %0\n  }\n}"
    _error(client.post("/program", json={"ir": ir, "args": {}}), "args", "missing ['q']")
    _error(client.post("/program", json={"ir": ir, "args": [{"q": "a"}, {"q": "b"}]}), "args", "2 entries")
    body = {"ir": ir, "args": {"q": "a"}, "passes": "no-such-pass"}
    _error(client.post("/program", json=body), "passes", "no-such-pass")


def test_lone_surrogates_are_a_400_naming_the_field(client):
    """A lone surrogate in a /score continuation or a /tokenize prompt was a 500 (the tokenizer
    refuses it with a bare TypeError)."""
    for route, raw, param in [
        ("/score", b'{"prompt":"x","continuations":["a","\\ud800"]}', "continuations.1"),
        ("/tokenize", b'{"prompt":"\\udfff"}', "prompt"),
        ("/generate", b'{"text":"\\ud800 hi","sampling_params":{"max_new_tokens":2}}', "text"),
        ("/v1/chat/completions", b'{"model":"llmir-tiny","messages":[{"role":"user","content":"\\ud83d"}]}', "messages"),
    ]:  # fmt: skip
        r = client.post(route, content=raw, headers={"content-type": "application/json"})
        _error(r, param, "lone surrogate")


# --- errors about no one field keep param null ------------------------------------------------
def test_errors_about_no_one_field_keep_param_null(client):
    for raw in (b'{"text": "Q",', b"[1, 2]", b"", b'{"text": "Q", "x": }'):
        r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] is None, r.text
    assert client.post("/generate", json={**GENERATE, "text": arithmetic_prompt(5)}).status_code == 200
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["param"] is None


# --- the helpers, without a server ------------------------------------------------------------
def test_sampling_params_names_the_field_whose_value_is_refused():
    fields = [
        ("max_new_tokens", 4, "max_tokens"),
        ("temperature", 0.5, "temperature"),
        ("stop", [""], "stop"),
    ]
    with pytest.raises(InvalidRequestError, match="stop must be") as info:
        sampling_params(fields)
    assert info.value.param == "stop"  # type: ignore[attr-defined]
    # of two fields that conflict, the later one
    with pytest.raises(InvalidRequestError, match="larger than max_new_tokens") as info:
        sampling_params([("max_new_tokens", 4, "a"), ("min_new_tokens", 8, "b")])
    assert info.value.param == "b"  # type: ignore[attr-defined]
    assert sampling_params(fields[:2]).temperature == 0.5


def test_with_param_leaves_a_shared_error_alone():
    """The constraint compiler raises its cached error instance again: naming a field on a copy
    keeps one request's field off another's error."""
    cached = InvalidRegexError("regex '(' does not parse")
    named = with_param(cached, "regex")
    assert named is not cached and named.param == "regex" and not hasattr(cached, "param")  # type: ignore[attr-defined]
    assert type(named) is InvalidRegexError and str(named) == str(cached)
    assert with_param(named, "other") is named  # the field named first stays
    with pytest.raises(InvalidRegexError) as info:
        with blame("sampling_params.regex"):
            raise copy.copy(cached)
    assert info.value.param == "sampling_params.regex"  # type: ignore[attr-defined]
    with pytest.raises(ValueError) as info:
        with blame("x"):
            raise ValueError("not a library error")
    assert not hasattr(info.value, "param")
