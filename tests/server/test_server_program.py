"""``POST /program``: IR text plus arguments in, final states out, optimized whole on the server."""

from __future__ import annotations

import httpx
import pytest
from server_harness import wait_idle

import llmir_lang as llmir
from llmir_lang.ir import Module, print_ir

SHOTS = "Q: What is 1 + 1?\nA: 2\nQ: What is 3 + 4?\nA: 7\n"


@llmir.function
def answer_then_check(s, question):
    s += SHOTS + "Q: " + question + "\nA: " + llmir.gen("answer", max_tokens=8, stop="\n")
    s += "\nQ: Is that right?\nA: " + llmir.select("check", choices=["True", "False"])


@llmir.function
def branches(s, n):
    s += "Q: What is " + n + " + 1?\nA: "
    first, second = s.fork(2)
    first += llmir.gen("a", max_tokens=6, stop="\n")
    second += "12\nQ: What is 2 + 2?\nA: " + llmir.gen("b", max_tokens=6, stop="\n")


def _batch_module(questions: list[str]) -> tuple[str, list[dict[str, str]]]:
    fns = []
    for i, _ in enumerate(questions):
        fn = answer_then_check.trace().functions[0]
        fns.append(type(fn)(f"qa{i}", fn.params, fn.ops))
    return print_ir(Module(tuple(fns))), [{"question": q} for q in questions]


def test_program_runs_a_traced_program(client):
    ir = print_ir(answer_then_check.trace())
    out = client.post("/program", json={"ir": ir, "args": {"question": "What is 5 + 7?"}})
    assert out.status_code == 200, out.text
    body = out.json()
    (fn,) = body["functions"]
    (state,) = fn["states"]
    assert fn["name"] == "answer_then_check" and state["error"] is None
    assert state["vars"]["answer"] == "12" and state["vars"]["check"] in ("True", "False")
    assert (
        state["text"] == SHOTS + f"Q: What is 5 + 7?\nA: 12\nQ: Is that right?\nA: {state['vars']['check']}"
    )
    assert state["meta"]["answer"]["finish_reason"] == "stop"
    assert state["meta"]["check"]["choices"] == ["True", "False"]


def test_program_batch_is_optimized_whole_and_equals_call_by_call(client):
    ir, args = _batch_module(["What is 5 + 7?", "What is 30 + 9?", "What is 11 + 11?"])
    whole = client.post("/program", json={"ir": ir, "args": args}).json()
    plain = client.post("/program", json={"ir": ir, "args": args, "passes": ""}).json()
    texts = [[s["text"] for s in f["states"]] for f in whole["functions"]]
    assert texts == [[s["text"] for s in f["states"]] for f in plain["functions"]]
    assert [f["states"][0]["vars"]["answer"] for f in whole["functions"]] == ["12", "39", "22"]
    # the server's engine computes the prefix the three programs share once by itself (it defers
    # the others a step), so the evaluator sends no separate prefill; the later ones hit the cache
    assert whole["stats"]["prefills"] == 0 and plain["stats"]["prefills"] == 0
    cached = sorted(f["states"][0]["meta"]["answer"]["cached_tokens"] for f in whole["functions"])
    assert cached[1] > 0 and cached[2] > 0


def test_program_with_forks_returns_every_state(client):
    ir = print_ir(branches.trace())
    body = client.post("/program", json={"ir": ir, "args": {"n": "4"}}).json()
    states = body["functions"][0]["states"]
    assert len(states) >= 2
    found = {k: v for s in states for k, v in s["vars"].items()}
    assert found["a"] == "5" and found["b"] == "4"


@pytest.mark.parametrize(
    "args,needle",
    [
        ({}, "missing ['question']"),
        ({"question": "q", "extra": "x"}, "unknown ['extra']"),
        ([{"question": "a"}, {"question": "b"}], "2 entries for 1 functions"),
    ],
)
def test_program_argument_errors(client, args, needle):
    ir = print_ir(answer_then_check.trace())
    r = client.post("/program", json={"ir": ir, "args": args})
    assert r.status_code == 400 and needle in r.json()["error"]["message"]


def test_program_wrong_argument_type_and_bad_pipeline(client):
    ir = print_ir(answer_then_check.trace())
    r = client.post("/program", json={"ir": ir, "args": {"question": 5}})
    assert r.status_code == 400 and "args" in r.json()["error"]["message"]
    r = client.post("/program", json={"ir": ir, "args": {"question": "q"}, "passes": "no-such-pass"})
    assert r.status_code == 400 and "no-such-pass" in r.json()["error"]["message"]


def test_program_max_tokens_limit_applies_to_every_gen(client):
    ir = print_ir(answer_then_check.trace()).replace("max_tokens = 8", "max_tokens = 5000")
    r = client.post("/program", json={"ir": ir, "args": {"question": "q"}})
    assert r.status_code == 400
    assert "5000" in r.json()["error"]["message"] and "limit of 960" in r.json()["error"]["message"]


# a regex that parses (the verifier refuses one that does not: a 400 naming ``ir``) but admits no
# output: only running it with the model's vocabulary finds that, and that gen fails there
BAD_REGEX_IR = """module {
  func @f() {
    %0 = start
    %1 = text %0 "Q: What is 5 + 7?\\nA: "
    %2 = gen %1 "x" {max_tokens = 4, regex = "[^\\\\s\\\\S]"}
    return %2
  }
}
"""
UNPARSABLE_REGEX_IR = BAD_REGEX_IR.replace("[^\\\\s\\\\S]", "(")


def test_program_failure_is_reported_per_state(client, server):
    body = client.post("/program", json={"ir": BAD_REGEX_IR}).json()
    (state,) = body["functions"][0]["states"]
    assert state["error"]["var"] == "x" and "regex" in state["error"]["message"].lower()
    assert state["text"] == "Q: What is 5 + 7?\nA: " and state["vars"] == {}
    from llmir_lang.executor.remote import Endpoint

    with Endpoint(server.url) as ep:
        (remote,) = ep.run_program(BAD_REGEX_IR).functions[0][1]
    assert remote.error_var == "x" and remote.error == state["error"]["message"]
    _still_ok = client.post(
        "/program", json={"ir": print_ir(answer_then_check.trace()), "args": {"question": "q"}}
    )
    assert _still_ok.status_code == 200
    refused = client.post("/program", json={"ir": UNPARSABLE_REGEX_IR})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "ir"
    assert "regex does not compile" in refused.json()["error"]["message"]


LONG_IR = """module {
  func @f() {
    %0 = start
    %1 = text %0 "Once upon a time"
    %2 = gen %1 "a" {max_tokens = 900, ignore_eos = true}
    %3 = gen %2 "b" {max_tokens = 900, ignore_eos = true}
    return %3
  }
}
"""


def test_program_is_aborted_when_its_client_disconnects_and_counted(client, server):
    before = wait_idle(server.url)
    mark = server.log_size()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/program", json={"ir": LONG_IR}, timeout=0.5)
    after = wait_idle(server.url, timeout=15.0)
    assert after["tokens_computed"] - before["tokens_computed"] < 900  # stopped early
    assert after["cache"]["protected_tokens"] == 0
    counted = {k: after["server"][k] - before["server"][k] for k in ("requests", "aborted", "finished")}
    assert counted == {"requests": 1, "aborted": 1, "finished": 0}
    ir = print_ir(answer_then_check.trace())
    assert client.post("/program", json={"ir": ir, "args": {"question": "q"}}).status_code == 200
    done = client.get("/stats").json()["server"]
    assert done["requests"] - after["server"]["requests"] == 1
    assert done["finished"] - after["server"]["finished"] == 1
    assert "Traceback" not in server.log_since(mark)
