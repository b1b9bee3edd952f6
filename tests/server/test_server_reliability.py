"""Reliability of a real ``llmir serve`` on loopback: many concurrent clients, dropped clients,
graceful shutdown. Every loop is bounded in count and time."""

from __future__ import annotations

import json
import threading
import time

import httpx
import psutil
import pytest
from server_harness import arithmetic_prompt, kv_is_free, run_clients, served, server_stats, wait_idle

N_CLIENTS = 32
N_REQUESTS = 50  # per client
N_PROMPTS = 64
LOAD_DEADLINE_S = 300.0
PARAMS = {"temperature": 0.0, "max_new_tokens": 6, "stop": ["\n"]}
LONG = {"temperature": 0.0, "max_new_tokens": 900, "ignore_eos": True}


@pytest.fixture(scope="module")
def srv():
    with served("--max-running-requests", "64", "--shutdown-timeout", "20") as proc:
        yield proc


def _one(client: httpx.Client, prompt: str, rid: str, stream: bool) -> tuple[str, str]:
    body = {"text": prompt, "sampling_params": PARAMS, "rid": rid}
    if not stream:
        out = client.post("/generate", json=body).json()
        return out["text"], out["meta_info"]["id"]
    last = None
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                last = json.loads(line[6:])
    assert last is not None
    return last["text"], last["meta_info"]["id"]


def _load(url: str, n_clients: int, n_requests: int) -> dict[str, tuple[int, str, str]]:
    """rid -> (prompt index, text, id the server answered with). Every 5th request streams."""
    results: dict[str, tuple[int, str, str]] = {}
    lock = threading.Lock()

    def client_loop(c: int) -> None:
        with httpx.Client(base_url=url, timeout=60.0) as client:
            for j in range(n_requests):
                i = (c * 7 + j * 13) % N_PROMPTS
                rid = f"c{c}-r{j}"
                text, got_id = _one(client, arithmetic_prompt(i), rid, stream=j % 5 == 4)
                with lock:
                    assert rid not in results
                    results[rid] = (i, text, got_id)

    run_clients(client_loop, n_clients, LOAD_DEADLINE_S, "load")
    return results


def test_32_clients_x_50_requests_no_lost_duplicated_or_mixed_up_and_flat_memory(srv):
    with httpx.Client(base_url=srv.url, timeout=60.0) as client:
        expected = [_one(client, arithmetic_prompt(i), f"base{i}", stream=False)[0] for i in range(N_PROMPTS)]
    assert len(set(expected)) >= N_PROMPTS - 4  # answers tell prompts apart
    _load(srv.url, N_CLIENTS, 5)  # warm-up: allocator pools, caches, threads
    wait_idle(srv.url)
    rss_before = psutil.Process(srv.pid).memory_info().rss
    counters_before = server_stats(srv.url)["server"]
    started = time.monotonic()
    results = _load(srv.url, N_CLIENTS, N_REQUESTS)
    elapsed = time.monotonic() - started
    stats = wait_idle(srv.url)
    rss_after = psutil.Process(srv.pid).memory_info().rss

    want = {f"c{c}-r{j}" for c in range(N_CLIENTS) for j in range(N_REQUESTS)}
    assert set(results) == want  # none lost, none duplicated
    wrong = [(rid, i, text, expected[i]) for rid, (i, text, _) in results.items() if text != expected[i]]
    assert not wrong, wrong[:5]  # every answer is its own prompt's answer
    assert all(got == rid for rid, (_, _, got) in results.items())
    served = stats["server"]["requests"] - counters_before["requests"]
    assert served == len(want)  # the server saw each request exactly once
    assert stats["server"]["finished"] - counters_before["finished"] == len(want)
    assert stats["cache"]["protected_tokens"] == 0
    growth = rss_after - rss_before
    assert growth < 64 * 2**20, f"server RSS grew {growth / 2**20:.1f} MiB over {len(want)} requests"
    print(
        f"\n{len(want)} requests in {elapsed:.1f}s ({len(want) / elapsed:.0f} req/s), "
        f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
    )


def test_client_disconnecting_mid_stream_frees_its_kv(srv):
    before = wait_idle(srv.url)
    with httpx.Client(base_url=srv.url, timeout=60.0) as client:
        body = {"text": arithmetic_prompt(3), "sampling_params": LONG, "stream": True}
        with client.stream("POST", "/generate", json=body) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen == 3:
                        break  # leaving the block closes the connection mid-stream
    after = wait_idle(srv.url, timeout=15.0)
    assert after["server"]["aborted"] == before["server"]["aborted"] + 1
    assert after["tokens_computed"] - before["tokens_computed"] < 900  # generation stopped early
    assert kv_is_free(after)


def test_client_timing_out_on_a_plain_request_frees_its_kv(srv):
    before = wait_idle(srv.url)
    mark = srv.log_size()
    with httpx.Client(base_url=srv.url, timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/generate", json={"text": arithmetic_prompt(4), "sampling_params": LONG})
    after = wait_idle(srv.url, timeout=15.0)
    assert after["server"]["aborted"] == before["server"]["aborted"] + 1
    assert after["tokens_computed"] - before["tokens_computed"] < 900
    assert kv_is_free(after)
    time.sleep(0.3)  # asyncio logs an unretrieved outcome when the future is collected
    log = srv.log_since(mark)
    assert "Traceback" not in log and "never retrieved" not in log, log  # aborted quietly


def test_graceful_shutdown_finishes_in_flight_streams(srv):
    events: list[dict] = []
    done = threading.Event()
    first = threading.Event()

    def stream() -> None:
        body = {
            "text": arithmetic_prompt(8),
            "sampling_params": {**LONG, "max_new_tokens": 200},
            "stream": True,
        }
        try:
            with httpx.stream("POST", srv.url + "/generate", json=body, timeout=60.0) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done.set()
                    elif line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        first.set()
        finally:
            first.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert first.wait(30) and events
    code = srv.stop(timeout=60)
    t.join(timeout=30)
    assert code == 0, srv.output()
    assert done.is_set()
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 200}
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health", timeout=2.0)


def test_streamed_request_aborted_when_its_client_leaves_before_the_first_token():
    """One request at a time: a stream queued behind a long request has no token to send for
    seconds. Its client leaving is seen at once (not at the first token, after the long one), and
    the queued request is aborted without computing anything."""
    with served("--max-running-requests", "1") as proc:
        before = wait_idle(proc.url)
        long_done = threading.Event()

        def occupy() -> None:
            # long enough (900 tokens, seconds) that a loaded machine still sees the abort first
            body = {"text": arithmetic_prompt(5), "sampling_params": LONG}
            try:
                httpx.post(proc.url + "/generate", json=body, timeout=120.0)
            finally:
                long_done.set()

        threading.Thread(target=occupy, daemon=True).start()
        deadline = time.monotonic() + 20
        while server_stats(proc.url)["engine_requests"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        body = {"text": arithmetic_prompt(6), "sampling_params": PARAMS, "stream": True}
        # queued behind the long request: no header or event comes before its first token, so the
        # client gives up (and closes the connection) while the server waits for that token
        with httpx.Client(base_url=proc.url, timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
            client.post("/generate", json=body)
        deadline = time.monotonic() + 5
        while (
            server_stats(proc.url)["server"]["aborted"] == before["server"]["aborted"]
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        stats = server_stats(proc.url)
        assert stats["server"]["aborted"] == before["server"]["aborted"] + 1
        assert not long_done.is_set()  # seen while the long request still ran, not after it
        long_done.wait(120)
        assert wait_idle(proc.url)["server"]["finished"] == before["server"]["finished"] + 1
