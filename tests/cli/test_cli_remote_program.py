"""Programs on an llmir server go whole to ``/program`` (dsl.runner) and equal the embedded engine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import llmir_lang as llmir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from server_harness import ServerProcess  # noqa: E402

SHOTS = "Q: What is 1 + 1?\nA: 2\nQ: What is 3 + 4?\nA: 7\n"


@llmir.function
def qa_check(s, question):
    s += SHOTS + "Q: " + question + "\nA: " + llmir.gen("answer", max_tokens=8, stop="\n")
    s += "\nQ: Is that right?\nA: " + llmir.select("check", choices=["True", "False"])


@llmir.function
def loop(s, n):
    # a sync point: Python reads a generated value, so the program runs as several segments
    s += SHOTS + "Q: What is " + n + " + 1?\nA: " + llmir.gen("a", max_tokens=6, stop="\n")
    if s["a"].strip().isdigit():
        s += "\nQ: What is " + s["a"].strip() + " + 1?\nA: " + llmir.gen("b", max_tokens=6, stop="\n")


@llmir.function
def branches(s):
    s += SHOTS + "Q: What is 8 + 1?\nA: "
    first, second = s.fork(2)
    first += llmir.gen("a", max_tokens=6, stop="\n")
    second += "9\nQ: What is 2 + 2?\nA: " + llmir.gen("b", max_tokens=6, stop="\n")


@llmir.function
def chat(s):
    s += llmir.user("What is 6 times 7?") + llmir.assistant(llmir.gen_int("product", max_tokens=4))


@llmir.function
def bad(s):
    s += "Q: What is 5 + 7?\nA: " + llmir.gen("x", max_tokens=4, regex="(")


class CountingEndpoint:
    """Wraps an Endpoint's ``run_program`` and ``submit`` to count which path the runner took."""

    def __init__(self, ep: Any) -> None:
        self.ep, self.programs, self.submits = ep, 0, 0
        self.url = str(ep.base_url)
        real_run, real_submit = ep.run_program, ep.submit

        def run_program(*a: Any, **k: Any) -> Any:
            self.programs += 1
            return real_run(*a, **k)

        def submit(*a: Any, **k: Any) -> Any:
            self.submits += 1
            return real_submit(*a, **k)

        ep.run_program, ep.submit = run_program, submit


@pytest.fixture(scope="module")
def backends() -> Any:
    torch.set_num_threads(1)
    server = ServerProcess().start()
    ep = llmir.Endpoint(server.url)
    rt = llmir.Runtime(kv_memory="64MB")
    try:
        yield CountingEndpoint(ep), rt
    finally:
        rt.shutdown()
        ep.close() if hasattr(ep, "close") else None
        server.stop()


def test_programs_run_whole_on_the_server_and_match_the_engine(backends: Any) -> None:
    counting, rt = backends
    ep = counting.ep
    for program, kwargs in ((qa_check, {"question": "What is 5 + 7?"}), (branches, {}), (chat, {})):
        before = (counting.programs, counting.submits)
        remote = program.run(backend=ep, **kwargs)
        local = program.run(backend=rt, **kwargs)
        assert (counting.programs, counting.submits) == (before[0] + 1, before[1]), program.name
        assert remote.text() == local.text() and remote.variables() == local.variables(), program.name
        assert remote.run_stats()["segments"] == 1 and remote.run_stats()["requests"] >= 1
    remote = qa_check.run(backend=ep, question="What is 5 + 7?")
    assert remote["answer"] == "12" and remote.get_meta_info("answer")["finish_reason"] == "stop"
    assert remote.get_meta_info("check")["choices"] == ["True", "False"]


def test_sync_points_send_one_module_per_segment(backends: Any) -> None:
    counting, rt = backends
    before = counting.programs
    remote = loop.run(backend=counting.ep, n="4")
    local = loop.run(backend=rt, n="4")
    assert remote.variables() == local.variables() and remote.text() == local.text()
    assert counting.programs - before == remote.run_stats()["segments"] == 2


def test_batch_goes_as_modules_and_matches(backends: Any) -> None:
    counting, rt = backends
    args = [{"question": f"What is {i} + 7?"} for i in range(5)]
    before = counting.programs
    remote = qa_check.run_batch(args, backend=counting.ep)
    local = qa_check.run_batch(args, backend=rt)
    assert [st.error() for st in remote] == [None] * 5
    assert [st.variables() for st in remote] == [st.variables() for st in local]
    assert 1 <= counting.programs - before <= 5  # rounds, not one request per call


def test_failure_on_the_server_is_the_programs_error(backends: Any) -> None:
    counting, _ = backends
    with pytest.raises(llmir.DSLError, match="'x'"):
        bad.run(backend=counting.ep)
    (state,) = bad.run_batch([{}], backend=counting.ep)
    assert state.error() is not None and "regex" in str(state.error()).lower()


def test_streaming_stays_call_by_call(backends: Any) -> None:
    counting, _ = backends
    before = (counting.programs, counting.submits)
    state = qa_check.run(backend=counting.ep, question="What is 5 + 7?", stream=True)
    text = "".join(state.text_iter())
    assert state.error() is None and "12" in text
    assert counting.programs == before[0] and counting.submits > before[1]


def test_extract_over_url_runs_on_the_server(backends: Any, tmp_path: Path) -> None:
    import argparse
    import json
    import random

    from llmir_lang.cli.extract import add_arguments, run_extract
    from llmir_lang.models.tiny_tasks import make_extraction_example

    counting, _ = backends
    rng = random.Random(5)
    expected = {}
    with open(tmp_path / "in.jsonl", "w") as f:
        for i in range(4):
            text, record = make_extraction_example(rng, "person")
            expected[i] = record
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    ns = p.parse_args(
        ["--schema", "person", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
         "--url", counting.url, "--no-progress", "--max-tokens", "96"]
    )  # fmt: skip
    summary = run_extract(ns)  # its own Endpoint, closed at the end
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert summary.ok == 4 and [r["id"] for r in rows] == [0, 1, 2, 3]
    assert sum(r["record"] == expected[r["id"]] for r in rows) >= 3
