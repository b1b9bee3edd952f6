"""A fake SGLang / OpenAI-compatible server that misbehaves on purpose, for the remote backends.

It speaks enough of SGLang's ``/generate`` (text, token ids, scoring with ``input_token_logprobs``,
streamed or not), OpenAI's ``/v1/completions`` (streamed or not, ``echo`` scoring) and vLLM's
``/tokenize`` to run DSL programs, and answers llmir's ``/score``, ``/apply_chat_template`` and
``/program`` (an empty reply) so that their failures can be injected too. It has no
``/v1/chat/completions``: the ``OpenAI`` backend never calls it (it renders roles itself).

Its "model" is a pure function of the request: one token per character (id = code point), an
output derived from a hash of the prompt, logprobs from a formula. So a program's result depends
on its requests only, never on their order.

A request whose text carries a program tag (``P<n>:``) may get a fault instead of its answer,
chosen from a hash of ``seed`` and the request (stream flags left out), so the same request gets
the same fault in every run and in any order. Every request is logged (route, tag, fault).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# every fault, by what the server does instead of answering
HTTP_FAULTS = ("429", "429_bare", "500", "503", "503_bare")
BODY_FAULTS = ("reset", "truncated", "bad_json", "bad_shape", "error_200", "not_json")
SLOW_FAULTS = ("slow", "drip")
FAULTS = HTTP_FAULTS + BODY_FAULTS + SLOW_FAULTS
# what /tokenize answers by default: only failures that must reach the program (a 200 the backends
# cannot read makes them score without /tokenize for a while, by design: no failure to see)
TOKENIZE_FAULTS = HTTP_FAULTS + ("reset", "slow")

_TAG = re.compile(r"P(\d+):")
_ALPHABET = "abcdefghij klmnop\nqrstu vwxyz ,.0123456789"
REGEX_DIGITS = "[0-9]{1,3}"
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@dataclass(slots=True)
class Logged:
    route: str
    tag: int | None
    fault: str
    key: str  # the request, stream flags left out (to count repeats)


def _digest(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def token_logprob(token: int, position: int) -> float:
    return -(((token * 31 + position * 7) % 97) + 1) / 10


def _decode(ids: Any) -> str:
    return "".join(chr(i) for i in ids)


def generate(
    prompt: str, max_tokens: int, stop: list[str], constraint: tuple[str, Any] | None
) -> tuple[str, str, str | None]:
    """(text, finish reason, matched stop) of the fake model."""
    h = _digest(prompt)
    if constraint is not None:
        kind, value = constraint
        if kind == "choices":
            return value[h % len(value)], "stop", None
        if kind == "json":
            return json.dumps({"n": h % 100}), "stop", None
        return str(h % 1000), "stop", None  # the digits regex
    text = "".join(_ALPHABET[(h >> (i % 48) ^ i * 5) % len(_ALPHABET)] for i in range(max_tokens))
    cuts = [(text.find(s), s) for s in stop if s and s in text]
    if cuts:
        at, matched = min(cuts)
        return text[:at], "stop", matched
    return text, "length", None


def _regex_constraint(sp: dict[str, Any]) -> tuple[str, Any] | None:
    if "json_schema" in sp:
        return ("json", sp["json_schema"])
    regex = sp.get("regex")
    if regex is None:
        return None
    if regex.startswith("(?:"):  # Endpoint sends choices as an alternation of escaped texts
        return ("choices", [re.sub(r"\\(.)", r"\1", c) for c in regex[3:-1].split("|")])
    return ("regex", regex)


class _Handler(BaseHTTPRequestHandler):
    server: FaultServer  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # --- plumbing ----------------------------------------------------------------------------
    def _send(
        self, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _start_chunked(self, ctype: str = "text/event-stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _reset(self) -> None:
        """Close the connection with a TCP reset (SO_LINGER 0), whatever was sent."""
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; False once the server is closing."""
        return not self.server.closing.wait(seconds)

    # --- routes ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, b"", "text/plain")  # SGLang's: an empty body
        else:
            self._json({"error": {"message": f"no route {self.path}"}}, 404)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.loads(raw)
        route = self.path
        if route not in (
            "/generate",
            "/v1/completions",
            "/tokenize",
            "/score",
            "/apply_chat_template",
            "/program",
        ):
            self._json({"error": {"message": f"no route {route}"}}, 404)
            return
        if route in self.server.absent:  # a server without the route (logged, unlike an unknown one)
            self.server.record(Logged(route, None, "absent", route))
            self._json({"error": {"message": f"no route {route}"}}, 404)
            return
        stream = bool(body.get("stream"))
        fault, tag, key = self.server.plan(route, body)
        self.server.record(Logged(route, tag, fault, key))
        if fault == "ok":
            answer = self._answer(route, body)
            if stream:
                self._stream(route, answer, body)
            else:
                self._json(answer)
            return
        self._fault(fault, route, body, stream, key)

    def _answer(self, route: str, body: dict[str, Any]) -> Any:
        if route == "/score":
            n = len(body["prompt"])
            return {
                "logprobs": [
                    [token_logprob(ord(c), n + i) for i, c in enumerate(t)] for t in body["continuations"]
                ]
            }
        if route == "/apply_chat_template":
            return {"text": "".join(f"<{m['role']}>{m['content']}\n" for m in body["messages"])}
        if route == "/program":
            return {"functions": [], "stats": {}}
        if route == "/tokenize":
            return {"tokens": [ord(c) for c in body["prompt"]], "count": len(body["prompt"])}
        if route == "/generate":
            if "input_ids" in body or body["sampling_params"].get("max_new_tokens") == 0:
                return self._score_generate(body)
            sp = body["sampling_params"]
            text, finish, matched = generate(
                body["text"], sp.get("max_new_tokens", 128), sp.get("stop", []), _regex_constraint(sp)
            )
            reason = {"type": finish, "matched": matched} if matched else {"type": finish}
            meta = {"id": f"r{_digest(body['text']) % 10**6}", "finish_reason": reason,
                    "prompt_tokens": len(body["text"]), "completion_tokens": len(text), "cached_tokens": 0}  # fmt: skip
            return {"text": text, "output_ids": [ord(c) for c in text], "meta_info": meta}
        if body.get("echo"):
            return self._score_completions(body)
        constraint = None
        if "guided_choice" in body:
            constraint = ("choices", body["guided_choice"])
        elif "guided_json" in body:
            constraint = ("json", body["guided_json"])
        elif "guided_regex" in body:
            constraint = ("regex", body["guided_regex"])
        text, finish, _ = generate(body["prompt"], body["max_tokens"], body.get("stop", []), constraint)
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(text)}
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {"id": "cmpl-1", "object": "text_completion", "choices": [choice], "usage": usage}

    def _score_generate(self, body: dict[str, Any]) -> Any:
        inputs = body.get("input_ids") or [[ord(c) for c in t] for t in body["text"]]
        start = body.get("logprob_start_len", 0)
        outs = []
        for ids in inputs:
            entries = [[None if p == 0 else token_logprob(t, p), t, None] for p, t in enumerate(ids)]
            meta = {"input_token_logprobs": entries[start:], "finish_reason": {"type": "length"}}
            outs.append({"text": "", "meta_info": meta})
        return outs

    def _score_completions(self, body: dict[str, Any]) -> Any:
        prompts = (
            body["prompt"]
            if isinstance(body["prompt"][0], list)
            else [[ord(c) for c in p] for p in body["prompt"]]
        )
        choices = []
        for i, ids in enumerate(prompts):
            text = _decode(ids)
            lp = {"tokens": list(text), "text_offset": list(range(len(text))), "top_logprobs": None,
                  "token_logprobs": [None if p == 0 else token_logprob(t, p) for p, t in enumerate(ids)]}  # fmt: skip
            choices.append({"index": i, "text": text, "finish_reason": "length", "logprobs": lp})
        return {"choices": choices, "usage": {}}

    def _events(self, route: str, answer: dict[str, Any], body: dict[str, Any]) -> list[Any]:
        """A good answer as the stream's events (JSON values), without ``[DONE]``."""
        if route == "/generate":
            text, events = answer["text"], []
            for n in range(1, len(text)):
                events.append(
                    {"text": text[:n], "meta_info": {"id": answer["meta_info"]["id"], "finish_reason": None}}
                )
            return events + [answer]
        choice = answer["choices"][0]
        events = [{"choices": [{"index": 0, "text": c, "finish_reason": None}]} for c in choice["text"]]
        events.append({"choices": [{"index": 0, "text": "", "finish_reason": choice["finish_reason"]}]})
        events.append({"choices": [], "usage": answer["usage"]})
        return events

    def _stream(self, route: str, answer: Any, body: dict[str, Any]) -> None:
        self._start_chunked()
        for event in self._events(route, answer, body):
            self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
        self._chunk(b"data: [DONE]\n\n")
        self._end_chunked()

    # --- faults ----------------------------------------------------------------------------
    def _fault(self, fault: str, route: str, body: dict[str, Any], stream: bool, key: str) -> None:
        variant = _digest(key, "variant") % 3
        if fault == "429":
            error = {"error": {"message": "rate limit reached", "type": "rate_limit_error", "code": None}}
            self._json(error, 429, {"Retry-After": "7"})
        elif fault == "429_bare":
            self._send(429, b"Too Many Requests", "text/plain")
        elif fault == "500":
            self._json({"error": {"message": "internal error: worker crashed", "type": "server_error"}}, 500)
        elif fault == "503":
            self._json({"detail": "the server is overloaded"}, 503, {"Retry-After": "3"})
        elif fault == "503_bare":
            self._send(503, b"", "text/plain")
        elif fault == "slow":
            self._wait(self.server.slow_s)
            self._reset()
        elif fault == "drip":
            self._start_chunked("text/event-stream" if stream else "application/json")
            end = time.monotonic() + self.server.slow_s
            while time.monotonic() < end and self._wait(0.1):
                self._chunk(b": keep-alive\n\n" if stream else b" ")
            self._reset()
        elif fault == "error_200":
            error = {"error": {"message": "the model is not loaded", "type": "server_error", "code": None}}
            self._json(error)  # a JSON body, also to a stream request
        elif fault == "not_json":
            self._send(200, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
        elif not stream:
            self._plain_fault(fault, route, body, variant)
        else:
            events = self._events(route, self._answer(route, body), body)
            self._start_chunked()
            for event in events[: max(1, len(events) // 2)][:-1]:
                self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
            if fault == "reset":
                self._reset()
                return
            if fault == "bad_json":
                self._chunk(b'data: {"text": "ab", "meta_info": {\n\n')
            elif fault == "bad_shape":
                self._chunk(b"data: " + json.dumps(_bad_shape(route, variant)).encode() + b"\n\n")
            self._end_chunked()  # "truncated": no last event, no [DONE]

    def _plain_fault(self, fault: str, route: str, body: dict[str, Any], variant: int) -> None:
        good = json.dumps(self._answer(route, body)).encode()
        if fault == "reset":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(good)))
            self.end_headers()
            self.wfile.write(good[: len(good) // 2])
            self._reset()
        elif fault == "truncated":  # the connection closes cleanly before the declared length
            self.send_response(200)
            self.send_header("Content-Length", str(len(good) + 40))
            self.end_headers()
            self.wfile.write(good)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        elif fault == "bad_json":
            self._send(200, good[: len(good) // 2])
        else:  # bad_shape
            self._json(_bad_shape(route, variant, scoring=body.get("echo") or "input_ids" in body))


_BAD_SHAPES: dict[str, list[Any]] = {
    "/tokenize": [{"tokens": "abc"}, {"count": 3}, ["tokens"]],
    "/generate": [
        {"text": 12, "meta_info": []},
        ["not", "a", "dict"],
        {"text": "x", "meta_info": {"prompt_tokens": "many"}},
    ],
    "/generate+score": [
        {"meta_info": {}},
        [{"meta_info": {"input_token_logprobs": [5]}}],
        [{"meta_info": None}],
    ],
    "/v1/completions": [
        {"choices": [{"text": 5, "finish_reason": "stop"}]},
        {"choices": "none"},
        {"choices": [{"text": "x"}], "usage": []},
    ],
    "/v1/completions+score": [
        {"choices": [{"index": 0}]},
        {"choices": [{"logprobs": {"tokens": 1}}]},
        {"choices": None},
    ],
    "/score": [{"logprobs": "x"}, {"scores": []}, {"logprobs": [[-1.0]]}],
    "/apply_chat_template": [{"text": 5}, {"prompt": "x"}, ["text"]],
    "/program": [
        {"functions": [{"name": "f"}]},
        {"functions": "x"},
        {"functions": [{"name": "f", "states": [{"text": "t"}]}]},
    ],
}


def _bad_shape(route: str, variant: int, scoring: bool = False) -> Any:
    """Valid JSON of the wrong shape: fields missing, or of the wrong type."""
    return _BAD_SHAPES[route + ("+score" if scoring and route in ("/generate", "/v1/completions") else "")][
        variant
    ]


class FaultServer(ThreadingHTTPServer):
    """The fake server on a free loopback port (``url``); ``rate`` of the tagged requests fail with a
    fault of ``faults`` (chosen from ``seed`` and the request), ``/tokenize`` only with those also in
    ``tokenize_faults``. ``routes`` (None: all) limits the faults to those routes, ``max_faults``
    (None: no limit) to that many in all, the later requests answered well: a passing fault.
    The routes of ``absent`` answer 404. ``close`` stops it, ending its slow answers."""

    daemon_threads = True
    request_queue_size = 256  # run_batch opens dozens of connections at once

    def __init__(
        self,
        seed: int = 0,
        rate: float = 0.0,
        faults: tuple[str, ...] = FAULTS,
        slow_s: float = 20.0,
        *,
        tokenize_faults: tuple[str, ...] = TOKENIZE_FAULTS,
        routes: tuple[str, ...] | None = None,
        max_faults: int | None = None,
        absent: tuple[str, ...] = (),
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seed, self.rate, self.faults, self.slow_s = seed, rate, faults, slow_s
        self.tokenize_faults, self.routes, self.max_faults = tokenize_faults, routes, max_faults
        self._faulted = 0  # faults planned so far (for max_faults)
        self.absent = absent  # routes answered 404, as by a server that has none
        self.closing = threading.Event()
        self.log: list[Logged] = []
        self._log_lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def plan(self, route: str, body: dict[str, Any]) -> tuple[str, int | None, str]:
        """(fault or "ok", the program's tag, the request's key)."""
        key = route + json.dumps(
            {k: v for k, v in body.items() if k not in ("stream", "stream_options")}, sort_keys=True
        )
        m = _TAG.search(_request_text(body))
        tag = int(m.group(1)) if m else None
        if tag is None or self.rate <= 0 or (self.routes is not None and route not in self.routes):
            return "ok", tag, key
        h = _digest(self.seed, key)
        if (h % 10_000) >= self.rate * 10_000:
            return "ok", tag, key
        faults = (
            self.faults
            if route != "/tokenize"
            else tuple(f for f in self.faults if f in self.tokenize_faults)
        )
        if not faults:
            return "ok", tag, key
        with self._log_lock:
            if self.max_faults is not None and self._faulted >= self.max_faults:
                return "ok", tag, key
            self._faulted += 1
        return faults[(h >> 20) % len(faults)], tag, key

    def record(self, entry: Logged) -> None:
        with self._log_lock:
            self.log.append(entry)

    def faults_of(self, tag: int) -> list[str]:
        return [e.fault for e in self.log if e.tag == tag and e.fault != "ok"]

    def close(self) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()


def _request_text(body: dict[str, Any]) -> str:
    """Every text a request carries (token ids decoded), where a program tag would be."""
    messages = body.get("messages") or []
    parts: list[Any] = [body.get("text"), body.get("prompt"), body.get("input_ids"), body.get("ir")]
    parts += [m.get("content") for m in messages]
    out = []

    def walk(x: Any) -> None:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, list) and x and all(isinstance(i, int) for i in x):
            out.append(_decode(x))
        elif isinstance(x, list):
            for y in x:
                walk(y)

    for p in parts:
        walk(p)
    return "\n".join(out)
