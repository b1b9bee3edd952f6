"""``llmir serve --reasoning-parser``: ``/generate`` and ``/v1/completions`` constrain what follows
the reasoning, as SGLang's reasoner grammar gates every constrained request under its parser;
llmir's per-request ``reasoning_parser`` chooses another format or none; ``/get_server_info``
says which parser the server runs.

The bundled model writes no ``<think>`` tags; asked its name it answers "I am llmir-tiny, a small
language model.", so a test format whose end tag is ``tiny,`` stands for a reasoning model:
"I am llmir-" is its reasoning, what follows the comma its answer (as in
``test_reasoning_gate_server.py``)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from server_harness import TEST_REASONING_FORMAT, reasoning_servers

from llmir_lang.ir.reasoning import split_reasoning

FMT = TEST_REASONING_FORMAT
PROMPT = "<|im_start|>user\nWhat is your name?<|im_end|>\n<|im_start|>assistant\n"
YES_NO = {"max_new_tokens": 24, "temperature": 0, "regex": "(yes|no)"}


@pytest.fixture(scope="module")
def urls():
    with reasoning_servers(api_key="sekret") as both:
        yield both


AUTH = {"Authorization": "Bearer sekret"}


def _post(url: str, path: str, body: dict[str, Any], status: int = 200) -> Any:
    r = httpx.post(url + path, json=body, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def _generate(url: str, sp: dict[str, Any] = YES_NO, **extra: Any) -> str:
    return _post(url, "/generate", {"text": PROMPT, "sampling_params": sp, **extra})["text"]


def _complete(url: str, **extra: Any) -> str:
    body = {"model": "llmir-tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, **extra}
    return _post(url, "/v1/completions", body)["choices"][0]["text"]


def test_generate_and_completions_constrain_the_answer_under_the_parser(urls):
    split, plain = urls
    out = _generate(split)
    reasoning, answer = split_reasoning(FMT, out)
    assert (reasoning, answer in ("yes", "no")) == ("I am llmir-", True), out
    assert _complete(split, regex="(yes|no)") == out
    assert _complete(split, guided_choice=["yes", "no"]) == out
    assert _generate(plain) in ("yes", "no")  # no parser: the whole output, as before

    body = {"text": PROMPT, "sampling_params": YES_NO, "stream": True}
    with httpx.stream("POST", split + "/generate", json=body, headers=AUTH, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["text"] == out  # a stream is gated alike

    batch = _post(split, "/generate", {"text": [PROMPT, PROMPT], "sampling_params": YES_NO})
    assert [o["text"] for o in batch] == [out, out]

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    sp = {"max_new_tokens": 40, "temperature": 0, "json_schema": json.dumps(schema)}
    reasoning, answer = split_reasoning(FMT, _generate(split, sp))
    assert reasoning == "I am llmir-" and type(json.loads(answer)["ok"]) is bool


def test_a_request_chooses_its_own_reasoning_parser(urls):
    split, plain = urls
    gated = _generate(split)
    # null: the constraint covers the whole output, whatever the server's parser
    assert _generate(split, reasoning_parser=None) in ("yes", "no")
    assert _complete(split, regex="(yes|no)", reasoning_parser=None) in ("yes", "no")
    # a format (any case): gated after its end tag, on a server started without a parser
    assert _generate(plain, reasoning_parser="Test-Tiny") == gated
    assert _complete(plain, regex="(yes|no)", reasoning_parser=FMT) == gated
    # an unconstrained request is not changed by it
    free = {"max_new_tokens": 12, "temperature": 0}
    assert _generate(plain, free, reasoning_parser=FMT) == _generate(plain, free)

    for bad, words in (("nope", "unknown reasoning format 'nope'"), ("gpt-oss", "not supported")):
        for path, body in (
            ("/generate", {"text": PROMPT, "sampling_params": YES_NO}),
            ("/v1/completions", {"model": "llmir-tiny", "prompt": PROMPT, "regex": "(yes|no)"}),
        ):
            error = _post(plain, path, {**body, "reasoning_parser": bad}, 400)["error"]
            assert error["param"] == "reasoning_parser" and words in error["message"], error
            assert "deepseek-r1" in error["message"]  # the formats are listed
    error = _post(plain, "/generate", {"text": PROMPT, "reasoning_parser": 3}, 400)["error"]
    assert error["param"] == "reasoning_parser"


def test_a_constraint_that_spells_the_end_tag_covers_the_whole_output(urls):
    split, _ = urls
    whole = {"max_new_tokens": 24, "temperature": 0, "regex": "I am llmir-tiny, (yes|no)"}
    assert _generate(split, whole) in ("I am llmir-tiny, yes", "I am llmir-tiny, no")


def test_server_info_says_which_parser_the_server_runs(urls):
    from llmir_lang.executor.remote import Endpoint

    split, plain = urls
    info = httpx.get(split + "/get_server_info", headers=AUTH, timeout=30).json()
    assert (info["reasoning_parser"], info["server"]) == (FMT, "llmir")
    assert info["served_model_name"] == "llmir-tiny"
    assert "api_key" not in info and "sekret" not in json.dumps(info)
    assert info["context_length"] > 0 and isinstance(info["internal_states"], list)
    assert httpx.get(split + "/get_server_info", timeout=30).status_code == 401  # behind the key
    assert httpx.get(plain + "/get_server_info", timeout=30).json()["reasoning_parser"] is None
    for protocol in ("llmir", "sglang"):
        with Endpoint(split, "sekret", protocol=protocol) as ep:
            assert ep.get_server_info()["reasoning_parser"] == FMT
