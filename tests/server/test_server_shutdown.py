"""Shutdown past ``--shutdown-timeout``: requests still running are aborted and answered as such
(503 ``server_shutting_down``, or a last stream event with finish_reason ``abort``), the server
exits with 0, and its log has no traceback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import httpx
from server_harness import ServerProcess, arithmetic_prompt

LONG = {"temperature": 0.0, "max_new_tokens": 900, "ignore_eos": True}
LONG_IR = """module {
  func @f() {
    %0 = start
    %1 = text %0 "Once upon a time"
    %2 = gen %1 "a" {max_tokens = 900, ignore_eos = true}
    return %2
  }
}
"""


def _stop_while_running(
    srv: ServerProcess, threads: list[threading.Thread], running: Callable[[], str | None]
) -> int:
    """Start the client ``threads``, wait (30 s at most) until ``running()`` says they all run
    (None) instead of what is missing, then stop the server past its shutdown timeout and join the
    clients; the server is killed whatever happens. Returns the server's exit code."""
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while (missing := running()) is not None:
            if time.monotonic() > deadline:
                raise AssertionError(f"the requests did not all start: {missing}")
            time.sleep(0.05)
        code = srv.stop(timeout=60)
        for t in threads:
            t.join(timeout=30)
    finally:
        srv.kill()
    return code


def test_requests_running_past_the_shutdown_timeout_get_a_clean_answer():
    srv = ServerProcess("--shutdown-timeout", "1").start()
    answers: dict[str, tuple[int, str]] = {}
    streamed: list[str] = []

    def plain() -> None:
        body = {"text": arithmetic_prompt(1), "sampling_params": LONG}
        r = httpx.post(srv.url + "/generate", json=body, timeout=60)
        answers["plain"] = (r.status_code, r.text)

    def program() -> None:
        r = httpx.post(srv.url + "/program", json={"ir": LONG_IR}, timeout=60)
        answers["program"] = (r.status_code, r.text)

    def stream() -> None:
        body = {"text": arithmetic_prompt(2), "sampling_params": LONG, "stream": True}
        with httpx.stream("POST", srv.url + "/generate", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    streamed.append(line[6:])

    def running() -> str | None:  # all three running in the engine
        stats = httpx.get(srv.url + "/stats", timeout=10).json()
        return None if stats["engine_requests"] == 3 and streamed else str(stats)

    threads = [threading.Thread(target=f, daemon=True) for f in (plain, program, stream)]
    code = _stop_while_running(srv, threads, running)
    assert code == 0, srv.output()
    for name in ("plain", "program"):
        status, text = answers[name]
        assert status == 503, (name, text)
        body = json.loads(text)
        assert body["error"]["type"] == "server_shutting_down" and "shutting down" in body["error"]["message"]
    assert streamed[-1] == "[DONE]"
    last = json.loads(streamed[-2])
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert "shutting down" in last["meta_info"]["finish_reason"]["message"]
    log = srv.output()
    assert "Traceback" not in log and "never retrieved" not in log and "Cancel" not in log, log


def test_openai_streams_the_shutdown_aborts_end_with_an_error_saying_so():
    """An OpenAI stream still running at ``--shutdown-timeout`` gets its ``abort`` chunk, then an
    error event in the shape of every other error, saying why and to send the request again."""
    srv = ServerProcess("--shutdown-timeout", "1").start()
    base = {"model": "llmir-tiny", "max_tokens": 900, "temperature": 0.0, "ignore_eos": True, "stream": True}
    routes = {
        "/v1/completions": {**base, "prompt": "Once upon a time"},
        "/v1/chat/completions": {**base, "messages": [{"role": "user", "content": "Tell me a story"}]},
    }
    streamed: dict[str, list[str]] = {route: [] for route in routes}

    def stream(route: str) -> None:
        with httpx.stream("POST", srv.url + route, json=routes[route], timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    streamed[route].append(line[6:])

    threads = [threading.Thread(target=stream, args=(route,), daemon=True) for route in routes]
    code = _stop_while_running(srv, threads, lambda: None if all(streamed.values()) else srv.output())
    assert code == 0, srv.output()
    for route, events in streamed.items():
        assert events[-1] == "[DONE]", (route, events[-3:])
        error = json.loads(events[-2])
        assert set(error) == {"error"}, (route, error)
        assert error["error"]["type"] == "server_shutting_down" and error["error"]["code"] is None, error
        message = error["error"]["message"]
        assert "shutting down" in message and "send the request again" in message, message
        assert json.loads(events[-3])["choices"][0]["finish_reason"] == "abort", (route, events[-3])
