"""``llmir serve --reasoning-parser``: a chat request's constraint (``response_format``, vLLM's
``guided_*``, SGLang's ``regex``) covers the answer only, the reasoning running free up to its end
tag, as SGLang's reasoner grammar does; ``separate_reasoning: false`` keeps the constraint over
the whole output, while completions gate it as SGLang does (``test_reasoning_gate_routes.py``).
SGLang's ``POST /separate_reasoning`` route.

The bundled model writes no ``<think>`` tags; asked its name it answers "I am llmir-tiny, a small
language model.", so a test format whose end tag is ``tiny,`` stands for a reasoning model here:
"I am llmir-" is its reasoning, what follows the comma its answer."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from server_harness import TEST_REASONING_FORMAT, reasoning_servers

from llmir_lang.ir.reasoning import split_reasoning

FMT = TEST_REASONING_FORMAT


@pytest.fixture(scope="module")
def urls():
    with reasoning_servers() as both:
        yield both


def _chat(url: str, **extra: Any) -> dict[str, Any]:
    body = {
        "model": "llmir-tiny",
        "messages": [{"role": "user", "content": "What is your name?"}],
        "temperature": 0,
        "max_tokens": 48,
        **extra,
    }
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.parametrize(
    ("field", "check"),
    [
        ({"regex": "(yes|no)"}, lambda a: a in ("yes", "no")),
        ({"guided_choice": ["small", "large"]}, lambda a: a in ("small", "large")),
        ({"response_format": {"type": "json_object"}}, lambda a: isinstance(json.loads(a), dict)),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "ok",
                        "schema": {
                            "type": "object",
                            "properties": {"ok": {"type": "boolean"}},
                            "required": ["ok"],
                            "additionalProperties": False,
                        },
                    },
                }
            },
            lambda a: type(json.loads(a)["ok"]) is bool,
        ),
    ],
)
def test_the_constraint_covers_the_answer_after_the_reasoning(urls, field, check):
    url = urls[0]
    choice = _chat(url, **field)
    message = choice["message"]
    assert choice["finish_reason"] == "stop"
    assert message["reasoning_content"] == "I am llmir-" and check(message["content"])
    raw = _chat(url, separate_reasoning=False, **field)["message"]["content"]  # not split, not gated
    assert check(raw) and not raw.startswith("I am")
    events = []
    body = {"model": "llmir-tiny", "messages": [{"role": "user", "content": "What is your name?"}]}
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        json={**body, "temperature": 0, "max_tokens": 48, "stream": True, **field},
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    streamed = {k: "".join(d.get(k) or "" for d in deltas) for k in ("reasoning_content", "content")}
    assert streamed == {"reasoning_content": message["reasoning_content"], "content": message["content"]}


def test_completions_constrain_the_answer_as_sglang_does(urls):
    prompt = "<|im_start|>user\nWhat is your name?<|im_end|>\n<|im_start|>assistant\n"
    out = httpx.post(
        urls[0] + "/v1/completions",
        json={
            "model": "llmir-tiny",
            "prompt": prompt,
            "max_tokens": 16,
            "temperature": 0,
            "regex": "(yes|no)",
        },
        timeout=60,
    ).json()
    reasoning, answer = split_reasoning(FMT, out["choices"][0]["text"])  # never split, gated all the same
    assert reasoning == "I am llmir-" and answer in ("yes", "no")


def test_separate_reasoning_route(urls):
    split, plain = urls
    text = "<think>\n2 + 2 is 4\n</think>\n\nThe answer is 4. "
    for url, parser in ((plain, "deepseek-r1"), (plain, "DeepSeek-R1"), (split, None), (split, "qwen3")):
        body = {"text": text} if parser is None else {"text": text, "reasoning_parser": parser}
        r = httpx.post(url + "/separate_reasoning", json=body, timeout=30)
        assert r.status_code == 200, r.text
        want = split_reasoning((parser or FMT).lower(), text)
        assert r.json() == {"text": want[1], "reasoning_text": want[0]}
    assert httpx.post(split + "/separate_reasoning", json={"text": "hm tiny, ok"}).json() == {
        "text": "ok",
        "reasoning_text": "hm ",
    }  # the server's own parser (the reasoning keeps its trailing space, as the split does)
    bad = httpx.post(plain + "/separate_reasoning", json={"text": text, "reasoning_parser": "nope"})
    error = bad.json()["error"]
    assert bad.status_code == 400 and error["param"] == "reasoning_parser"
    assert "unknown reasoning format 'nope'" in error["message"] and "deepseek-r1, " in error["message"]
    missing = httpx.post(plain + "/separate_reasoning", json={"text": text})
    assert missing.status_code == 400 and "qwen3" in missing.json()["error"]["message"]
    unsupported = httpx.post(
        plain + "/separate_reasoning", json={"text": text, "reasoning_parser": "gpt-oss"}
    )
    assert unsupported.status_code == 400 and "not supported" in unsupported.json()["error"]["message"]
    assert (
        httpx.post(plain + "/separate_reasoning", json={"text": 3, "reasoning_parser": "qwen3"}).status_code
        == 400
    )
