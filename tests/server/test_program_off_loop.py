"""``/program`` parses and verifies its IR off the event loop: a large module (about 1.5 s a MB to
parse here) must not stall the server's other requests meanwhile. In-process server (uvicorn in a
thread) on a tiny random-weight engine, with the parser held until another request got through."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

import llmir_lang as llmir
from llmir_lang.executor.engine import Engine
from llmir_lang.ir import print_ir
from llmir_lang.server import program as program_route


@llmir.function
def short(s):
    s += "Q: 1 + 1?\nA:" + llmir.gen("a", max_tokens=2)


@pytest.fixture()
def served(tmp_path_factory):
    from server_harness import InProcessServer

    from llmir_lang.dsl.testing import random_checkpoint

    folder = random_checkpoint(tmp_path_factory.mktemp("off_loop_model"))
    server = InProcessServer(Engine(str(folder), device="cpu", kv_memory="16MB"))
    yield server.url
    server.close()


def test_a_program_being_parsed_does_not_stall_other_requests(served, monkeypatch):
    parsing, release = threading.Event(), threading.Event()
    real_parse = program_route.parse_ir

    def slow_parse(text: str):
        parsing.set()
        release.wait(10)  # held until the health check below got its answer (or 10 s)
        return real_parse(text)

    monkeypatch.setattr(program_route, "parse_ir", slow_parse)
    out: dict = {}

    def post() -> None:
        out["program"] = httpx.post(served + "/program", json={"ir": print_ir(short.trace())}, timeout=60)

    poster = threading.Thread(target=post)
    poster.start()
    assert parsing.wait(30)
    started = time.monotonic()
    health = httpx.get(served + "/health", timeout=30)
    waited = time.monotonic() - started
    release.set()
    poster.join(60)
    assert health.status_code == 200
    assert waited < 5, f"/health waited {waited:.1f} s for a program's parse"
    assert out["program"].status_code == 200, out["program"].text
