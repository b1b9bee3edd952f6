"""``llmir serve --reasoning-parser NAME``: chat completions carry the reasoning apart
(``message.reasoning_content`` / ``delta.reasoning_content``), split as ``split_reasoning`` splits
the whole output, streamed or not; ``separate_reasoning``, ``stream_reasoning`` and
``chat_template_kwargs``' thinking flags per request; completions and ``/generate`` untouched; the
incremental splitter against ``split_reasoning`` over random chunkings; the OpenAI backend on a
server that splits its completions."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from server_harness import InProcessServer

import llmir_lang as llmir
from llmir_lang.executor.remote import OpenAI
from llmir_lang.ir.reasoning import FORMATS, split_reasoning
from llmir_lang.server.cli import serve_main
from llmir_lang.server.config import ServerConfig
from llmir_lang.server.reasoning_stream import ChatDeltas, ChatReasoning, ReasoningSplitter

THINK = "<think>[a-z ]{1,10}</think>[a-z ]{1,5}"


# --- the incremental splitter -----------------------------------------------------------------
# pieces of tags of every format (<think>, ◁think▷), whitespace and letters: random texts then hold
# whole, cut, repeated and nested tags
ATOMS = ["<think>", "</think>", "<", "</", "<th", "ink>", "think", ">", "/", " ", "\n", "\t", "a", "b c"]
ATOMS += ["\u25c1think\u25b7", "\u25c1/think\u25b7", "\u25c1", "\u25c1/", "\u25b7"]
TEXTS = st.one_of(st.lists(st.sampled_from(ATOMS), max_size=16).map("".join), st.text(max_size=40))


def _chunks(text: str, cuts: list[int]) -> list[str]:
    at = sorted({c for c in cuts if c <= len(text)})
    return [text[a:b] for a, b in zip([0, *at], [*at, len(text)])]


def _streamed(model_type: str, chunks: list[str], forced: bool = False) -> tuple[str, str]:
    """The splitter's pieces joined; checks that no reasoning comes after the answer began."""
    splitter = ReasoningSplitter(model_type, forced=forced)
    reasoning, answer = "", ""
    for r, a in [*map(splitter.feed, chunks), splitter.finish()]:
        assert not (r and answer), f"reasoning {r!r} after the answer began ({answer!r})"
        reasoning, answer = reasoning + r, answer + a
    return reasoning, answer


@settings(max_examples=1500, deadline=None)
@given(TEXTS, st.lists(st.integers(0, 48), max_size=10), st.sampled_from(sorted(FORMATS)))
def test_streamed_split_equals_the_whole_split_for_any_chunking(text, cuts, model_type):
    assert _streamed(model_type, _chunks(text, cuts)) == split_reasoning(model_type, text)


@settings(max_examples=500, deadline=None)
@given(TEXTS, st.lists(st.integers(0, 48), max_size=10), st.sampled_from(sorted(FORMATS)))
def test_forced_split_streams_like_the_whole_forced_split(text, cuts, model_type):
    """``forced`` (a thinking template opened the reasoning in the prompt): the text after a start
    tag, streamed or whole; for qwen3 that is qwen3-thinking's split."""
    want = ChatReasoning(model_type, forced=True).split(text)
    assert _streamed(model_type, _chunks(text, cuts), forced=True) == want
    if model_type == "qwen3":
        assert want == split_reasoning("qwen3-thinking", text)


def test_splitter_holds_back_only_what_may_change():
    s = ReasoningSplitter("deepseek-r1")
    assert s.feed("\n  let me") == ("let me", "")  # forced: reasoning at once, leading space dropped
    assert s.feed(" think </th") == (" think", "")  # its trailing space and a partial tag held
    assert s.feed("ink>\n\nThe") == (" ", "The")  # the end tag: reasoning keeps its last space
    assert s.reasoning_done
    assert s.feed(" answer <think>is\n") == ("", " answer is")  # start tags go everywhere
    assert s.finish() == ("", "")  # the answer's trailing whitespace is stripped
    s = ReasoningSplitter("qwen3")  # writes its own start tag: nothing is known before it
    assert s.feed("pre ") == ("", "")
    assert s.feed("<thi") == ("", "")
    assert s.feed("nk>x</think>y") == ("pre x", "y")  # text before a late start tag is reasoning
    s = ReasoningSplitter("qwen3")
    assert [s.feed("no tags "), s.finish()] == [("", ""), ("", "no tags ")]  # untouched
    s = ReasoningSplitter("minimax-append-think")
    assert [s.feed("a</think>b"), s.finish()] == [("", "<think>a</think>b"), ("", "")]
    s = ReasoningSplitter("deepseek-r1")
    assert [s.feed("cut short  "), s.finish()] == [("cut short", ""), ("", "")]


def test_stream_reasoning_false_sends_the_reasoning_in_one_delta():
    deltas = ChatDeltas(ChatReasoning("deepseek-r1", stream_reasoning=False))
    got = [deltas.feed(t) for t in ["<think>a", " b", "</think>", "c", " d"]] + [deltas.finish()]
    assert got == [
        [{"role": "assistant", "content": ""}],
        [],
        [{"reasoning_content": "a b"}],
        [{"content": "c"}],
        [{"content": " d"}],
        [],
    ]
    deltas = ChatDeltas(ChatReasoning("deepseek-r1", stream_reasoning=False))
    assert deltas.feed("no end") == [{"role": "assistant", "content": ""}]
    assert deltas.finish() == [{"reasoning_content": "no end"}]  # sent at the end, not lost
    plain = ChatDeltas(None)
    assert [plain.feed("x"), plain.feed(""), plain.feed("", keep=True)] == [
        [{"role": "assistant", "content": "x"}],
        [],
        [{"content": ""}],
    ]


# --- the server -----------------------------------------------------------------------------
def _serve(parser: str | None):
    import torch

    from llmir_lang.executor.engine import Engine

    torch.set_num_threads(1)
    server = InProcessServer(Engine(kv_memory="64MB"), config=ServerConfig(reasoning_parser=parser))
    yield server.url
    server.close()


@pytest.fixture(scope="module")
def r1():
    yield from _serve("deepseek-r1")


@pytest.fixture(scope="module")
def qwen3():
    yield from _serve("qwen3")


def _body(regex: str = THINK, question: str = "Think first.", **extra: Any) -> dict[str, Any]:
    return {
        "model": "llmir-tiny",
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 48,
        "regex": regex,
        **extra,
    }


def _chat(url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _counts(answer: dict[str, Any]) -> tuple[int, int, int]:
    """Token counts of an answer's usage (the cached tokens depend on what ran before)."""
    u = answer["usage"]
    return u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]


def _joined(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The stream's deltas, and each field's text joined."""
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    joined: dict[str, str] = {}
    for d in deltas:
        for key in ("reasoning_content", "content"):
            if d.get(key) is not None:
                joined[key] = joined.get(key, "") + d[key]
    return deltas, joined


@pytest.mark.parametrize("parser", ["deepseek-r1", "qwen3"])
def test_chat_answer_carries_the_reasoning_apart(parser, r1, qwen3):
    url = {"deepseek-r1": r1, "qwen3": qwen3}[parser]
    split = _chat(url, _body())
    raw = _chat(url, _body(separate_reasoning=False))
    text = raw["choices"][0]["message"]["content"]
    assert text.startswith("<think>") and "</think>" in text
    reasoning, answer = split_reasoning(parser, text)
    assert reasoning and answer
    message = split["choices"][0]["message"]
    assert message == {"role": "assistant", "content": answer, "reasoning_content": reasoning}
    assert "reasoning_content" not in raw["choices"][0]["message"]  # separate_reasoning false: as is
    assert _counts(split) == _counts(raw)  # token counts do not change
    assert split["choices"][0]["finish_reason"] == raw["choices"][0]["finish_reason"]


@pytest.mark.parametrize("parser", ["deepseek-r1", "qwen3"])
def test_chat_stream_carries_the_reasoning_apart(parser, r1, qwen3):
    url = {"deepseek-r1": r1, "qwen3": qwen3}[parser]
    whole = _chat(url, _body())
    events = _stream(url, _body())
    deltas, joined = _joined(events)
    message = whole["choices"][0]["message"]
    assert joined == {"reasoning_content": message["reasoning_content"], "content": message["content"]}
    assert deltas[0]["role"] == "assistant"
    kinds = [k for d in deltas for k in ("reasoning_content", "content") if d.get(k)]
    assert kinds == sorted(kinds, key=lambda k: k == "content")  # all reasoning, then the answer
    if parser == "deepseek-r1":  # streamed as it comes: more than one reasoning delta
        assert kinds.count("reasoning_content") > 1
    assert _counts(events[-1]) == _counts(whole)
    last = [e for e in events if e["choices"]][-1]["choices"][0]
    assert last["finish_reason"] == whole["choices"][0]["finish_reason"] and last["delta"] == {}
    raw = _joined(_stream(url, _body(separate_reasoning=False)))[1]
    assert raw == {"content": _chat(url, _body(separate_reasoning=False))["choices"][0]["message"]["content"]}


def test_stream_reasoning_false_sends_the_reasoning_once_it_ends(r1):
    message = _chat(r1, _body())["choices"][0]["message"]
    deltas, joined = _joined(_stream(r1, _body(stream_reasoning=False)))
    reasoning = [d["reasoning_content"] for d in deltas if d.get("reasoning_content")]
    assert reasoning == [message["reasoning_content"]]
    assert joined["content"] == message["content"]


def test_reasoning_cut_short_has_no_answer(r1):
    """``max_tokens`` ends the output inside the reasoning: all of it is reasoning, the answer
    null (as on SGLang and vLLM), and a stream sends no content."""
    body = _body(regex="<think>[a-z ]{40,60}</think>x", max_tokens=16)
    out = _chat(r1, body)
    message = out["choices"][0]["message"]
    assert out["choices"][0]["finish_reason"] == "length"
    assert message["content"] is None and message["reasoning_content"]
    deltas, joined = _joined(_stream(r1, body))
    assert joined == {"reasoning_content": message["reasoning_content"], "content": ""}  # the role's ""
    assert not any(d.get("content") for d in deltas)


def test_thinking_flags_of_the_chat_template(r1, qwen3):
    """``enable_thinking: true`` (or ``thinking``): the output begins inside the reasoning, so
    qwen3 splits one without a start tag; false: qwen3 does not split (the template closed the
    reasoning); deepseek-r1 always begins inside it."""
    no_start = "[a-z ]{1,10}</think>[a-z ]{1,5}"
    kwargs = {"chat_template_kwargs": {"enable_thinking": True}}
    text = _chat(qwen3, _body(no_start, separate_reasoning=False))["choices"][0]["message"]["content"]
    want = split_reasoning("qwen3-thinking", text)
    assert want[0] and _chat(qwen3, _body(no_start))["choices"][0]["message"] == {
        "role": "assistant",
        "content": text,
        "reasoning_content": None,
    }  # no start tag, no flag: the answer, untouched
    got = _chat(qwen3, _body(no_start, **kwargs))["choices"][0]["message"]
    assert (got["reasoning_content"], got["content"]) == want
    assert _joined(_stream(qwen3, _body(no_start, **kwargs)))[1] == {
        "reasoning_content": want[0],
        "content": want[1],
    }
    thinking = {"chat_template_kwargs": {"thinking": True}}  # DeepSeek V3.1's name
    assert _chat(qwen3, _body(no_start, **thinking))["choices"][0]["message"] == got
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    raw = _chat(qwen3, _body(separate_reasoning=False))["choices"][0]["message"]
    assert _chat(qwen3, _body(**off))["choices"][0]["message"] == raw
    assert _joined(_stream(qwen3, _body(**off)))[1] == {"content": raw["content"]}
    r1_split = _chat(r1, _body())["choices"][0]["message"]
    assert _chat(r1, _body(**off))["choices"][0]["message"] == r1_split
    bad = httpx.post(
        qwen3 + "/v1/chat/completions",
        json=_body(chat_template_kwargs={"enable_thinking": "yes"}),
        timeout=60,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs.enable_thinking"
    renderer = httpx.post(
        qwen3 + "/v1/chat/completions", json=_body(chat_template_kwargs={"tokenize": True}), timeout=60
    )
    assert renderer.status_code == 400 and "renderer" in renderer.json()["error"]["message"]


def test_an_earlier_answers_reasoning_may_come_back(r1):
    """A client that sends the assistant message back, ``reasoning_content`` and all."""
    message = _chat(r1, _body())["choices"][0]["message"]
    messages = [{"role": "user", "content": "Think first."}, message, {"role": "user", "content": "Again."}]
    out = _chat(r1, {**_body(), "messages": messages})
    assert out["choices"][0]["message"]["reasoning_content"]


def test_completions_and_generate_do_not_split(r1):
    """As on SGLang: its completions and ``/generate`` return the text as generated."""
    prompt = "Q: Think first.\nA: "
    out = httpx.post(
        r1 + "/v1/completions",
        json={"model": "llmir-tiny", "prompt": prompt, "max_tokens": 48, "temperature": 0, "regex": THINK},
        timeout=60,
    ).json()
    assert out["choices"][0]["text"].startswith("<think>") and "reasoning_content" not in out["choices"][0]
    sp = {"max_new_tokens": 48, "temperature": 0, "regex": THINK}
    gen = httpx.post(r1 + "/generate", json={"text": prompt, "sampling_params": sp}, timeout=60).json()
    assert gen["text"] == out["choices"][0]["text"]


def test_unknown_parser_is_a_cli_error(capsys):
    assert serve_main(["--reasoning-parser", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown reasoning format 'nope'" in err and "deepseek-r1" in err and "qwen3" in err
    assert serve_main(["--reasoning-parser", "gpt-oss"]) == 2
    assert "not supported" in capsys.readouterr().err
    assert ServerConfig(reasoning_parser="DeepSeek-R1").reasoning_parser == "deepseek-r1"


# --- the OpenAI backend on a server that splits its completions --------------------------------
class _SplittingServer(ThreadingHTTPServer):
    """``/v1/completions`` answering "42" with the reasoning "six times seven" apart, as a
    server whose completions split reasoning would (llmir's and SGLang's do not)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SplittingHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()


class _SplittingHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        usage = {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}
        head = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m"}
        cut = body["prompt"].endswith("cut:")  # no answer: text null, as some servers send it
        if not body.get("stream"):
            text, reasoning = (None, "six times") if cut else ("42", "six times seven")
            choice = {"index": 0, "text": text, "reasoning_content": reasoning, "finish_reason": "stop"}
            payload = json.dumps({**head, "choices": [choice], "usage": usage}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        pieces = [("six ", None), ("times ", None), ("seven", None), (None, "4"), (None, "2")]
        events = [{"index": 0, "text": t, "reasoning_content": r, "finish_reason": None} for r, t in pieces]
        events.append({"index": 0, "text": "", "finish_reason": "stop"})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for choice in events:
            self.wfile.write(f"data: {json.dumps({**head, 'choices': [choice]})}\n\n".encode())
        self.wfile.write(f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@llmir.function
def _asked(s, tag):
    s += "Q: what is six times seven? " + tag + llmir.gen("a", max_tokens=16)


def test_openai_backend_takes_the_answer_and_keeps_the_reasoning_in_meta():
    fake = _SplittingServer()
    try:
        with OpenAI(fake.url + "/v1", "m") as oa:
            state = _asked.run(tag="A:", backend=oa)
            assert state["a"] == "42"
            assert state.get_meta_info("a")["reasoning_content"] == "six times seven"
            streamed = _asked.run(tag="A:", backend=oa, stream=True)
            assert "".join(streamed.text_iter("a")) == "42"
            assert streamed.get_meta_info("a")["reasoning_content"] == "six times seven"
            cut = _asked.run(tag="cut:", backend=oa)
            assert cut["a"] == "" and cut.get_meta_info("a")["reasoning_content"] == "six times"
    finally:
        fake.shutdown()
        fake.server_close()
