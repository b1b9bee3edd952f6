"""The server's routes against a real ``llmir serve`` on loopback (SGLang and OpenAI formats)."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
from server_harness import arithmetic_prompt

from llmir_lang.models.tiny_tasks import SCHEMAS, extraction_prompt, make_extraction_example, render_chat

GREEDY = {"temperature": 0.0, "max_new_tokens": 8, "stop": ["\n"]}


def sse_events(response) -> list:
    """Parse a server-sent-events body; the last item must be the [DONE] marker."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    assert events and events[-1] == "[DONE]"
    return events[:-1]


def test_health_model_info_and_models(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["server"] == "llmir" and "program" in health["features"]
    info = client.get("/get_model_info").json()
    assert info["is_generation"] and info["model_path"].endswith("llmir-tiny")
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["llmir-tiny"]


@pytest.mark.parametrize("i", [5, 21, 48])
def test_generate_answers_arithmetic(client, i):
    out = client.post("/generate", json={"text": arithmetic_prompt(i), "sampling_params": GREEDY}).json()
    assert out["text"] == str(i + 7)
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "stop", "matched": "\n"}
    assert meta["completion_tokens"] == len(out["output_ids"]) >= 1
    assert meta["prompt_tokens"] > 5


def test_generate_and_completions_stop_at_a_regex(client):
    # "12\n": the match "2\n" starts after the first digit, so the text is cut there
    sp = {"temperature": 0.0, "max_new_tokens": 8, "stop_regex": [r"\d\n", "never"]}
    out = client.post("/generate", json={"text": arithmetic_prompt(5), "sampling_params": sp}).json()
    assert out["text"] == "1"
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": r"\d\n"}
    body = {"model": "llmir-tiny", "prompt": arithmetic_prompt(5), "max_tokens": 8, "temperature": 0,
            "stop_regex": r"\d\n"}  # fmt: skip
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == "1" and choice["finish_reason"] == "stop"


def test_generate_batch_and_input_ids_match_single_text(client):
    prompts = [arithmetic_prompt(i) for i in (3, 30, 60)]
    batch = client.post(
        "/generate", json={"text": prompts, "sampling_params": GREEDY, "rid": ["a", "b", "c"]}
    ).json()
    assert [o["text"] for o in batch] == ["10", "37", "67"]
    assert [o["meta_info"]["id"] for o in batch] == ["a", "b", "c"]
    from llmir_lang.executor.tokenizer import Tokenizer
    from llmir_lang.models import __path__ as models_path

    tok = Tokenizer(f"{models_path[0]}/llmir-tiny")
    ids = [tok.encode(p) for p in prompts]
    by_ids = client.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY}).json()
    assert [o["text"] for o in by_ids] == ["10", "37", "67"]
    one = client.post("/generate", json={"input_ids": ids[0], "sampling_params": GREEDY}).json()
    assert one["text"] == "10"


def test_generate_stream_is_cumulative_and_equals_plain(client):
    body = {"text": arithmetic_prompt(40), "sampling_params": {"temperature": 0.0, "max_new_tokens": 12}}
    plain = client.post("/generate", json=body).json()
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    texts = [e["text"] for e in events]
    assert len(texts) >= 3
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # SGLang: the whole text so far
    assert texts[-1] == plain["text"]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == plain["meta_info"]["finish_reason"]["type"]


@pytest.mark.parametrize(
    "sampling",
    [
        {"max_new_tokens": 12, "ignore_eos": True},
        # jump-forward: a chunk of several tokens (the forced ones), re-tokenized with the sampled
        {"max_new_tokens": 30, "json_schema": json.dumps({"type": "object", "properties": {
            "answer": {"type": "integer"}, "ok": {"type": "boolean"}}, "required": ["answer", "ok"]})},
    ],
)  # fmt: skip
def test_generate_stream_counts_the_tokens_generated_so_far(client, sampling):
    """Every event's ``meta_info.completion_tokens`` is the number of tokens generated so far, as
    SGLang sends it (not the number in that event's chunk); the last one is the plain answer's."""
    from llmir_lang.executor.tokenizer import Tokenizer
    from llmir_lang.models import __path__ as models_path

    body = {"text": arithmetic_prompt(18), "sampling_params": {"temperature": 0.0, **sampling}}
    plain = client.post("/generate", json=body).json()
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        events = sse_events(r)
    counts = [e["meta_info"]["completion_tokens"] for e in events]
    assert len(counts) >= 4 and counts[-1] == plain["meta_info"]["completion_tokens"] == len(
        plain["output_ids"]
    )
    assert all(a < b for a, b in zip(counts[:-2], counts[1:-1])), counts  # each event brings tokens
    assert counts[-2] <= counts[-1], counts
    tok = Tokenizer(f"{models_path[0]}/llmir-tiny")
    for e, n in zip(events[:-1], counts):
        # the text so far is the text of the first n tokens (less what a stream holds back)
        assert tok.decode(plain["output_ids"][:n]).startswith(e["text"]), (e, n)


def test_generate_constraints_regex_json_schema_ebnf(client):
    regex = {
        "text": arithmetic_prompt(9),
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 6, "regex": "[0-9]{3}"},
    }
    assert re.fullmatch("[0-9]{3}", client.post("/generate", json=regex).json()["text"])
    text, _ = make_extraction_example(random.Random(3), "person")
    schema = SCHEMAS["person"]
    body = {
        "text": extraction_prompt(text, "person"),
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 120, "json_schema": json.dumps(schema)},
    }
    out = client.post("/generate", json=body).json()
    jsonschema.validate(json.loads(out["text"]), schema)
    gbnf = 'root ::= "yes" | "no"'
    ebnf = {
        "text": "Q: Is 3 > 2?\nA: ",
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 4, "ebnf": gbnf},
    }
    assert client.post("/generate", json=ebnf).json()["text"] in ("yes", "no")
    lark = {**ebnf, "sampling_params": {**ebnf["sampling_params"], "ebnf": 'start: "True" | "False"'}}
    assert client.post("/generate", json=lark).json()["text"] in ("True", "False")


def test_generate_logprobs(client):
    body = {
        "text": arithmetic_prompt(12),
        "sampling_params": GREEDY,
        "return_logprob": True,
        "logprob_start_len": 2,
        "top_logprobs_num": 3,
        "return_text_in_logprobs": True,
    }
    meta = client.post("/generate", json=body).json()["meta_info"]
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]
    assert all(
        e[0] <= 0 and isinstance(e[1], int) and isinstance(e[2], str) for e in meta["output_token_logprobs"]
    )
    assert len(meta["output_top_logprobs"]) == meta["completion_tokens"]
    assert all(len(top) == 3 for top in meta["output_top_logprobs"])
    inputs = meta["input_token_logprobs"]
    assert len(inputs) == meta["prompt_tokens"] - 2
    assert inputs[0][0] is None and all(e[0] <= 0 for e in inputs[1:])


def test_score_prefers_the_right_answer(client):
    out = client.post("/score", json={"prompt": arithmetic_prompt(5), "continuations": ["12", "93"]}).json()
    good, bad = out["logprobs"]
    assert len(good) == len(bad) == 2
    assert sum(good) > sum(bad)


def test_apply_chat_template_is_the_models_own(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    got = client.post(
        "/apply_chat_template", json={"messages": messages, "add_generation_prompt": True}
    ).json()
    assert got["text"] == render_chat(messages, add_generation_prompt=True)


# --- OpenAI ---------------------------------------------------------------------------
def test_completions_match_generate_and_stream(client):
    prompt = arithmetic_prompt(33)
    body = {"model": "llmir-tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "stop": "\n"}
    out = client.post("/v1/completions", json=body).json()
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == "40"
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    many = client.post("/v1/completions", json={**body, "prompt": [arithmetic_prompt(1), prompt]}).json()
    assert [c["text"] for c in many["choices"]] == ["8", "40"] and [c["index"] for c in many["choices"]] == [
        0,
        1,
    ]
    stream_body = {
        **body,
        "stop": None,
        "max_tokens": 10,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/completions", json=stream_body) as r:
        events = sse_events(r)
    text = "".join(c["text"] for e in events for c in e["choices"])
    plain = client.post(
        "/v1/completions", json={**stream_body, "stream": False, "stream_options": None}
    ).json()
    assert text == plain["choices"][0]["text"] and text.startswith("40")
    assert events[-1]["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    assert [c["finish_reason"] for c in events[-2]["choices"]] == [plain["choices"][0]["finish_reason"]]


def test_completions_echo_logprobs_scores_the_prompt(client):
    prompt = arithmetic_prompt(5) + "12"
    body = {"model": "llmir-tiny", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and "".join(lp["tokens"]) == prompt
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(lp["tokens"])
    assert [prompt[o : o + len(t)] for o, t in zip(lp["text_offset"], lp["tokens"])] == lp["tokens"]
    scored = client.post("/score", json={"prompt": arithmetic_prompt(5), "continuations": ["12"]}).json()
    assert lp["token_logprobs"][-2:] == pytest.approx(scored["logprobs"][0], abs=1e-4)


def test_chat_completions_plain_stream_and_response_format(client):
    messages = [{"role": "user", "content": "What is 4 + 5?"}]
    body = {"model": "llmir-tiny", "messages": messages, "max_tokens": 8, "temperature": 0.0}
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    answer = out["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = sse_events(r)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == answer
    assert events[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "sum", "schema": schema}}
    out = client.post("/v1/chat/completions", json={**body, "max_tokens": 30, "response_format": fmt}).json()
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), schema)
    guided = {**body, "guided_choice": ["nine", "ten"]}
    assert client.post("/v1/chat/completions", json=guided).json()["choices"][0]["message"]["content"] in (
        "nine",
        "ten",
    )
    logp = client.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 2}).json()
    content = logp["choices"][0]["logprobs"]["content"]
    assert "".join(c["token"] for c in content).startswith(answer)
    assert all(len(c["top_logprobs"]) == 2 for c in content)


def test_unknown_model_is_404(client):
    r = client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404 and "llmir-tiny" in r.json()["error"]["message"]


def test_stats_after_requests_show_nothing_running(client):
    stats = client.get("/stats").json()
    assert stats["server"]["active_requests"] == 0 and stats["engine_requests"] == 0
    assert stats["cache"]["protected_tokens"] == 0
    assert stats["server"]["finished"] >= 1


def _concat_legacy(chunks: list[dict]) -> dict:
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in chunks:
        for key in out:
            out[key] += lp[key]
    return out


def test_streams_carry_the_same_logprobs_as_plain_answers(client):
    body = {
        "model": "llmir-tiny",
        "prompt": arithmetic_prompt(21),
        "max_tokens": 10,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": 2,
    }
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = sse_events(r)
    per_chunk = [c["logprobs"] for e in events for c in e["choices"] if c["logprobs"] is not None]
    assert len(per_chunk) >= 2  # sent as the tokens come, not only at the end
    streamed = _concat_legacy(per_chunk)
    assert streamed["tokens"] == plain["tokens"] and streamed["text_offset"] == plain["text_offset"]
    assert streamed["token_logprobs"] == pytest.approx(plain["token_logprobs"], abs=1e-4)
    assert [list(t) for t in streamed["top_logprobs"]] == [list(t) for t in plain["top_logprobs"]]

    chat = {
        "model": "llmir-tiny",
        "messages": [{"role": "user", "content": "What is 4 + 5?"}],
        "max_tokens": 8,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 2,
    }
    plain_chat = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
        events = sse_events(r)
    content = [x for e in events for c in e["choices"] if c["logprobs"] for x in c["logprobs"]["content"]]
    assert [x["token"] for x in content] == [x["token"] for x in plain_chat]
    assert [x["logprob"] for x in content] == pytest.approx([x["logprob"] for x in plain_chat], abs=1e-4)
    assert all(len(x["top_logprobs"]) == 2 for x in content)


@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_a_stream_of_no_token_has_the_plain_answers_empty_logprobs(client, route):
    """With logprobs and no token generated (``max_tokens`` 0) the plain answer has empty lists;
    the OpenAI streams reported null logprobs (a client could not tell they were asked for).
    ``/generate``'s ``output_top_logprobs`` has one entry, the next token's alternatives, as the
    engine and SGLang report them (it was ``[]``, and ``Endpoint`` then failed such a gen)."""
    bodies = {
        "/generate": {"text": arithmetic_prompt(7), "sampling_params": {"max_new_tokens": 0},
                      "return_logprob": True, "top_logprobs_num": 2},
        "/v1/completions": {"model": "llmir-tiny", "prompt": arithmetic_prompt(7), "max_tokens": 0,
                            "logprobs": 2},
        "/v1/chat/completions": {"model": "llmir-tiny", "messages": [{"role": "user", "content": "Hi"}],
                                 "max_tokens": 0, "logprobs": True, "top_logprobs": 2},
    }  # fmt: skip
    body = bodies[route]
    plain = client.post(route, json=body).json()
    with client.stream("POST", route, json={**body, "stream": True}) as r:
        events = sse_events(r)
    if route == "/generate":
        meta, want = events[-1]["meta_info"], plain["meta_info"]
        assert meta["output_token_logprobs"] == want["output_token_logprobs"] == []
        (top,), (want_top,) = meta["output_top_logprobs"], want["output_top_logprobs"]
        assert [e[1] for e in top] == [e[1] for e in want_top] and len(top) == 2
        assert [e[0] for e in top] == pytest.approx([e[0] for e in want_top], abs=1e-4)
        return
    want = plain["choices"][0]["logprobs"]
    assert want in (
        {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []},
        {"content": []},
    )
    streamed = [c["logprobs"] for e in events for c in e["choices"] if c["logprobs"] is not None]
    assert streamed == [want], events
    assert events[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"] == "length"


def test_tokenize_and_scoring_token_id_prompts(client):
    from llmir_lang.executor.tokenizer import Tokenizer
    from llmir_lang.models import __path__ as models_path

    tok = Tokenizer(f"{models_path[0]}/llmir-tiny")
    got = client.post("/tokenize", json={"model": "llmir-tiny", "prompt": "Ada lives in Par"}).json()
    assert got["tokens"] == tok.encode("Ada lives in Par") and got["count"] == len(got["tokens"])
    bare = client.post("/tokenize", json={"prompt": "ma", "add_special_tokens": False}).json()["tokens"]
    assert bare == tok.encode("ma", add_special_tokens=False)
    assert client.post("/tokenize", json={"model": "gpt-9", "prompt": "x"}).status_code == 404
    # a batch of token-id prompts, scored with echo: the prompt's tokens, then the choice's own
    prompts = [got["tokens"] + bare, got["tokens"] + tok.encode("is", add_special_tokens=False)]
    body = {"model": "llmir-tiny", "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 0}
    choices = client.post("/v1/completions", json=body).json()["choices"]
    scored = client.post("/score", json={"prompt": "Ada lives in Par", "continuations": ["ma", "is"]}).json()
    for choice, p, want in zip(choices, prompts, scored["logprobs"]):
        lps = choice["logprobs"]["token_logprobs"]
        assert len(lps) == len(p) and lps[-len(want) :] == pytest.approx(want, abs=1e-4)


def test_text_offsets_count_in_the_text_the_answer_gives(client):
    """Special tokens have no text where the text is decoded without them: each sits at the offset
    where the text goes on, so the offsets never go back and index the answer's text."""
    body = {
        "model": "llmir-tiny",
        "prompt": [0, 1, 2, 5, 17, 42],
        "max_tokens": 4,
        "echo": True,
        "logprobs": 0,
    }
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    offsets, tokens, text = choice["logprobs"]["text_offset"], choice["logprobs"]["tokens"], choice["text"]
    assert offsets == sorted(offsets) and offsets[-1] <= len(text)
    ends = [*offsets[1:], len(text)]
    for tok, start, end in zip(tokens, offsets, ends):
        assert text[start:end] in (tok, ""), (tok, text[start:end])
