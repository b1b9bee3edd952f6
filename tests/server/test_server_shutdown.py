"""Shutdown past ``--shutdown-timeout``: requests still running are aborted and answered as such
(503 ``server_shutting_down``, or a last stream event with finish_reason ``abort``), the server
exits with 0, and its log has no traceback."""

from __future__ import annotations

import json
import threading
import time

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

    threads = [threading.Thread(target=f, daemon=True) for f in (plain, program, stream)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # all three running in the engine
            stats = httpx.get(srv.url + "/stats", timeout=10).json()
            if stats["engine_requests"] == 3 and streamed:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the requests did not all start: {stats}")
        code = srv.stop(timeout=60)
        for t in threads:
            t.join(timeout=30)
    finally:
        srv.kill()
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
