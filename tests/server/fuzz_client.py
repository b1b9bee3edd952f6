"""How the server fuzz (``test_fuzz_server.py``) sends one request of its mix, leaves, and reads
the answer: the answer's canonical form (what must equal the same request alone), the checks of a
stream's shape and of an error's (OpenAI's JSON, ``x-should-retry``)."""

from __future__ import annotations

import json
import math
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from fuzz_mix import DROP_TOKENS, Case

REQUEST_TIMEOUT_S = 60.0
LP_TOL = 2e-3  # logprobs of a batched run vs the same request alone


@dataclass
class Outcome:
    case: Case
    status: int | None = None
    result: Any = None  # the canonical answer (``canonical``), for ok cases
    error: dict[str, Any] | None = None
    usage: tuple[int, int] = (0, 0)  # prompt and completion tokens the answer reports
    problems: list[str] = field(default_factory=list)


# --- canonical answers -----------------------------------------------------------------------
def sse(response: httpx.Response) -> list[Any]:
    events: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def canonical(case: Case, payload: Any, problems: list[str]) -> Any:
    """What the answer says, without what differs between runs (ids, times, cached tokens)."""
    route, body = case.route, case.body
    if route == "/generate":
        if case.stream:
            texts = [e["text"] for e in payload]
            if any(not b.startswith(a) for a, b in zip(texts, texts[1:])):
                problems.append(f"a /generate stream's text is not cumulative: {texts}")
            counts = [e["meta_info"]["completion_tokens"] for e in payload]
            if counts != sorted(counts):
                problems.append(f"a /generate stream's completion_tokens are not the tokens so far: {counts}")
            final = payload[-1]
            if final["meta_info"]["finish_reason"] is None:
                problems.append("a /generate stream ended without a finish_reason")
            return _generate_out(final)
        outs = payload if isinstance(payload, list) else [payload]
        if isinstance(body.get("rid"), list):
            got = [o["meta_info"]["id"] for o in outs]
            if got != body["rid"]:
                problems.append(f"rids {got} != {body['rid']}")
        elif body.get("rid") is not None and outs[0]["meta_info"]["id"] != body["rid"]:
            problems.append(f"rid {outs[0]['meta_info']['id']} != {body['rid']}")
        return [_generate_out(o) for o in outs]
    chat = route == "/v1/chat/completions"
    if not case.stream:
        out = {"usage": _usage_out(payload["usage"]), "choices": []}
        for c in payload["choices"]:
            text = c["message"]["content"] if chat else c["text"]
            # as sent: a stream of no token ends with the same empty logprobs
            out["choices"].append(
                {"text": text, "finish_reason": c["finish_reason"], "logprobs": c["logprobs"]}
            )
        return out
    chunks = [e for e in payload]
    ids = {e.get("id") for e in chunks}
    if len(ids) != 1:
        problems.append(f"a stream's chunks have several ids: {ids}")
    text, finish, usage = "", [], None
    lps: Any = None
    for e in chunks:
        if "error" in e:
            problems.append(f"an error event in a stream: {e}")
            continue
        if e.get("usage") is not None:
            usage = e["usage"]
        for c in e["choices"]:
            text += c["delta"].get("content", "") if chat else c["text"]
            if c["finish_reason"] is not None:
                finish.append(c["finish_reason"])
            if c.get("logprobs"):
                lps = merge_logprobs(lps, c["logprobs"], chat)
    if len(finish) != 1:
        problems.append(f"a stream has {len(finish)} finish reasons: {finish}")
    want_usage = bool(body.get("stream_options", {}) and body["stream_options"].get("include_usage"))
    if (usage is not None) != want_usage:
        problems.append(f"usage chunk {usage} but include_usage={want_usage}")
    if (
        chat
        and chunks
        and chunks[0]["choices"]
        and chunks[0]["choices"][0]["delta"].get("role") != "assistant"
    ):
        problems.append(f"the first chat chunk has no role: {chunks[0]}")
    return {"usage": _usage_out(usage), "choices": [{"text": text, "finish_reason": finish[-1] if finish else None,
                                         "logprobs": lps}]}  # fmt: skip


def _usage_out(usage: Any) -> Any:
    """OpenAI's usage without its cached tokens (``prompt_tokens_details``: what the cache held)."""
    return {k: v for k, v in usage.items() if k != "prompt_tokens_details"} if isinstance(usage, dict) else usage


def _generate_out(o: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in o["meta_info"].items() if k not in ("id", "cached_tokens")}
    return {"text": o["text"], "output_ids": o.get("output_ids"), "meta_info": meta}


def merge_logprobs(acc: Any, lp: dict[str, Any], chat: bool) -> Any:
    if chat:
        return {"content": (acc or {"content": []})["content"] + lp["content"]}
    acc = acc or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    return {k: acc[k] + lp[k] for k in acc}


def same(a: Any, b: Any, path: str = "") -> str | None:
    """Where ``a`` and ``b`` differ (floats within ``LP_TOL``; a dict of top logprobs keyed by token
    text compared by value where keys agree), or None."""
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, abs_tol=LP_TOL):
            return None
        return f"{path}: {a!r} != {b!r}"
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            if (d := same(a[k], b[k], f"{path}.{k}")) is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items != {len(b)}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            if (d := same(x, y, f"{path}.{i}")) is not None:
                return d
        return None
    return None if a == b else f"{path}: {a!r} != {b!r}"


def _usage(case: Case, payload: Any) -> tuple[int, int]:
    """(prompt, completion) tokens the answer reports; (0, 0) where it reports none (an OpenAI
    stream without ``include_usage``)."""
    if case.route == "/generate":
        outs = payload if isinstance(payload, list) else [payload]
        metas = [o["meta_info"] for o in outs]
        return sum(m["prompt_tokens"] for m in metas), sum(m["completion_tokens"] for m in metas)
    usage = payload.get("usage") if isinstance(payload, dict) else None
    return (usage["prompt_tokens"], usage["completion_tokens"]) if usage else (0, 0)


# --- sending ---------------------------------------------------------------------------------
def check_error(r: httpx.Response, problems: list[str]) -> dict[str, Any] | None:
    """The error object of a non-2xx answer, checked for OpenAI's shape and the retry header."""
    try:
        err = r.json()["error"]
    except Exception:
        problems.append(f"a {r.status_code} whose body is not an OpenAI error: {r.text[:300]!r}")
        return None
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        problems.append(f"a {r.status_code} error not in OpenAI's shape: {err!r}")
        return None
    if not isinstance(err["message"], str) or not err["message"] or not isinstance(err["type"], str):
        problems.append(f"a {r.status_code} error without a message or type: {err!r}")
    if err["code"] is not None and not isinstance(err["code"], str):
        problems.append(f"a {r.status_code} error's code is not a string: {err!r}")
    if 400 <= r.status_code < 500 and r.status_code not in (408, 409, 429):
        if r.headers.get("x-should-retry") != "false":
            problems.append(f"a {r.status_code} without x-should-retry: false")
    return err


def send(client: httpx.Client, case: Case) -> Outcome:
    """Send ``case`` as its client would (leaving, for drops); never raises for the server's faults."""
    out = Outcome(case)
    try:
        if case.kind in ("drop", "leave"):
            _send_drop(client, case, out)
        elif case.stream:
            with client.stream("POST", case.route, json=case.body) as r:
                out.status = r.status_code
                if r.status_code != 200:
                    r.read()
                    out.error = check_error(r, out.problems)
                    return out
                events = sse(r)
            if not events or events[-1] != "[DONE]":
                out.problems.append(f"a stream did not end with [DONE]: {events[-3:]}")
                return out
            errors = [e for e in events[:-1] if "error" in e]
            if errors:
                out.problems.append(f"a 200 stream carried errors: {errors}")
                return out
            out.result = canonical(case, events[:-1], out.problems)
            out.usage = _usage(case, events[-2] if case.route == "/generate" else events[-2])
        else:
            r = client.post(case.route, json=case.body)
            out.status = r.status_code
            if r.status_code != 200:
                out.error = check_error(r, out.problems)
                return out
            payload = r.json()
            out.result = canonical(case, payload, out.problems)
            out.usage = _usage(case, payload)
    except httpx.TimeoutException as e:
        out.problems.append(f"timed out after {REQUEST_TIMEOUT_S}s (a hang?): {e!r}")
    except httpx.HTTPError as e:
        out.problems.append(f"transport error: {e!r}")
    return out


def _send_drop(client: httpx.Client, case: Case, out: Outcome) -> None:
    assert case.how is not None
    how, arg = case.how
    if how == "events":
        with client.stream("POST", case.route, json=case.body) as r:
            out.status = r.status_code
            seen = 0
            for line in r.iter_lines():
                if seen >= arg:
                    break
                if line.startswith("data: "):
                    seen += 1
        return  # leaving the block closes the connection
    if how == "timeout":
        try:
            if case.stream:  # gone after ``arg`` seconds, whatever came by then
                deadline = time.monotonic() + arg
                with client.stream("POST", case.route, json=case.body, timeout=arg) as r:
                    for _ in r.iter_lines():
                        if time.monotonic() > deadline:
                            return
            else:
                client.post(case.route, json=case.body, timeout=arg)
        except httpx.TimeoutException:
            return
        if case.kind == "drop":
            out.problems.append(f"a {DROP_TOKENS}-token request finished within {arg:.2f}s")
        return
    url = httpx.URL(str(client.base_url))
    data = json.dumps(case.body).encode()
    head = (
        f"POST {case.route} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.host, url.port), timeout=10) as s:
        if how == "close":  # the whole request, then gone without reading a byte
            s.sendall(head + data)
            time.sleep(0.2 if case.kind == "drop" else arg)
        else:  # half_body: the headers and half the body, then gone
            s.sendall(head + data[: len(data) // 2])
            time.sleep(0.05)
