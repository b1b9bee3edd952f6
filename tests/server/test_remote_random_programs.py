"""Differential test: random DSL programs on the embedded engine and through the remote backends.

The promise: a program runs unchanged on a server. The random programs of
``tests/dsl/test_random_programs_engine.py`` (its strategies and interpreter, imported) run greedy
on the embedded engine (``llmir.Runtime``) and, against an llmir server serving the same
random-weight checkpoint in this process (uvicorn on a thread, fp32 on the CPU, so greedy tokens
are the same), through:

- ``program``: ``Endpoint(url)``, which sends every segment module whole to ``/program``;
- ``calls``: ``Endpoint(url)`` call by call (``/generate``, ``/score``, ``/apply_chat_template``),
  as it runs when it cannot send whole programs;
- ``sglang``: ``Endpoint(url, protocol="sglang", tokenizer=...)``: SGLang's API only (``/generate``
  with token-id scoring, the chat template from the tokenizer);
- ``openai``: ``OpenAI(url + "/v1", model)`` (``/v1/completions``, ``echo`` scoring);
- ``calls+stream``, ``openai+stream`` (and ``sglang+stream`` locally): the same with
  ``stream=True`` (server-sent events), whose chunks must also add up to the state's text.

Texts, variables, fork branch texts and errors (type and message, numbers as N) must be those of
the embedded engine. Locally: ``LLMIR_REMOTE_RANDOM_PROGRAMS=N`` examples (CI default below),
``LLMIR_REMOTE_RANDOM_SEED=K`` another reproducible set, ``LLMIR_REMOTE_RANDOM_BACKENDS=a,b`` a
subset of the backends, ``LLMIR_REMOTE_RANDOM_PASSES=''`` a pipeline other than the default.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dsl"))

import test_random_programs_engine as rp  # noqa: E402 - the generator and the interpreter

import llmir_lang as llmir  # noqa: E402

MAX_EXAMPLES = int(os.environ.get("LLMIR_REMOTE_RANDOM_PROGRAMS", "60"))
SEED = os.environ.get("LLMIR_REMOTE_RANDOM_SEED")
# "+stream": the program runs with stream=True (server-sent events), its chunks joined
BACKENDS = os.environ.get(
    "LLMIR_REMOTE_RANDOM_BACKENDS", "program,calls,sglang,openai,calls+stream,openai+stream"
).split(",")
PASSES = os.environ.get("LLMIR_REMOTE_RANDOM_PASSES")  # None: the default pipeline
HANG_S = float(os.environ.get("LLMIR_REMOTE_RANDOM_HANG_S", "60"))
KV = "64MB"


class CallByCallEndpoint(llmir.Endpoint):
    """``Endpoint`` on an llmir server without ``/program``: one request per call."""

    run_program = None  # type: ignore[assignment]


class Served:
    """The random checkpoint served by an in-process llmir server, the same checkpoint on an
    embedded Runtime, and a client backend of each kind."""

    def __init__(self, model_dir: Path) -> None:
        from server_harness import InProcessServer

        from llmir_lang.executor.engine import Engine

        self.model_dir = str(model_dir)
        self.server = InProcessServer(Engine(self.model_dir, device="cpu", kv_memory=KV))
        self.url = self.server.url
        self.rt = llmir.Runtime(self.model_dir, device="cpu", kv_memory=KV)
        self.backends: dict[str, Any] = {}

    def backend(self, kind: str) -> Any:
        if kind not in self.backends:
            if kind == "program":
                b = llmir.Endpoint(self.url)
            elif kind == "calls":
                b = CallByCallEndpoint(self.url)
            elif kind == "sglang":
                b = llmir.Endpoint(self.url, protocol="sglang", tokenizer=self.model_dir)
            elif kind == "openai":
                b = llmir.OpenAI(self.url + "/v1", Path(self.model_dir).name)
            else:
                raise ValueError(kind)
            self.backends[kind] = b
        return self.backends[kind]

    def close(self) -> None:
        for b in self.backends.values():
            b.close()
        self.rt.shutdown()
        self.server.close()


def outcomes(
    backend: Any, prog: dict[str, Any], passes: str | None = PASSES, stream: bool = False
) -> list[dict[str, Any]] | str:
    """One outcome per program of ``prog`` (``rp._outcome``), or "hang"."""
    recs: list[list] = [[] for _ in prog["items"]]
    got: list[Any] = []

    def go() -> None:
        if stream and not prog["batch"]:
            (ops, arg), rec = prog["items"][0], recs[0]
            state = rp.interp.run(
                ops=ops, arg=arg, rec=rec, backend=backend, passes=passes, temperature=0, stream=True
            )
            chunks = []
            with contextlib.suppress(Exception):  # the state's error is compared below
                chunks.extend(state.text_iter())
            state.sync()  # the program's end
            joined = "".join(chunks)
            if state.error() is None and joined != state.text():
                got.append(
                    AssertionError(f"the stream's chunks {joined!r} differ from the text {state.text()!r}")
                )
            elif state.error() is not None:
                got.append(state.error())
            else:
                got.append([state])
            return
        if not prog["batch"]:
            (ops, arg), rec = prog["items"][0], recs[0]
            try:
                got.append(
                    [rp.interp.run(ops=ops, arg=arg, rec=rec, backend=backend, passes=passes, temperature=0)]
                )
            except Exception as e:  # noqa: BLE001 - compared, not swallowed
                got.append(e)
            return
        args = [{"ops": ops, "arg": arg, "rec": rec} for (ops, arg), rec in zip(prog["items"], recs)]
        got.append(rp.interp.run_batch(args, backend=backend, passes=passes, temperature=0))

    worker = threading.Thread(target=go, daemon=True)
    worker.start()
    worker.join(HANG_S)
    if worker.is_alive():
        return "hang"
    if isinstance(got[0], Exception):
        return [rp._outcome(None, got[0], recs[0])]
    return [rp._outcome(state, None, rec) for state, rec in zip(got[0], recs)]


def differences(served: Served, prog: dict[str, Any], kinds: list[str] = BACKENDS) -> dict[str, Any]:
    """{backend: (its outcomes, the engine's)} for every backend whose outcomes differ."""
    prog = {**prog, "kv": "roomy"}
    want = outcomes(served.rt, prog)
    assert want != "hang"
    out = {}
    for kind in kinds:
        name, _, how = kind.partition("+")
        got = outcomes(served.backend(name), prog, stream=how == "stream")
        if got != want:
            out[kind] = (got, want)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from llmir_lang.dsl.testing import random_checkpoint

    s = Served(random_checkpoint(tmp_path_factory.mktemp("remote_random_model")))
    yield s
    s.close()


@rp.random_settings(MAX_EXAMPLES, SEED)
@given(prog=rp.programs())
def test_random_programs_remote_equal_engine(served, prog):
    diffs = differences(served, prog)
    assert not diffs, (prog, diffs)


# --- found by the test above (minimal programs) -----------------------------------------------
ALL = ["program", "calls", "sglang", "openai", "calls+stream", "sglang+stream", "openai+stream"]


def _same_as_engine(served: Served, ops: tuple, arg: str = "") -> dict[str, Any]:
    prog = {"items": [(ops, arg)], "batch": False, "kv": "roomy"}
    want = outcomes(served.rt, prog)
    assert want != "hang" and want[0]["error"] is not None, want
    assert not differences(served, prog, ALL), differences(served, prog, ALL)
    return want[0]


def test_invalid_regex_fails_the_gen_with_the_engines_error(served):
    # the servers refused it (400) and the gen failed with a RemoteBackendError, not the engine's
    # InvalidRegexError; now every backend refuses it at the gen's line, before anything runs
    out = _same_as_engine(served, (("text", "Q: "), ("gen", "v1", 3, None, ("regex", rp.BAD_REGEX), ())))
    assert out["error"][1].endswith(
        "regex '(?=x)x' does not parse: look-around, including look-ahead and look-behind, is not supported"
    )


def test_gen_on_an_empty_prompt_fails_with_the_engines_error(served):
    out = _same_as_engine(served, (("gen", "v1", 3, None, None, ()),))
    assert "EmptyPromptError: the prompt is empty" in out["error"][1]


def test_select_on_an_empty_prompt_fails_with_the_engines_error(served):
    # SGLang's and OpenAI's scoring asked the server for logprobs of nothing and failed with
    # "expected logprobs of 1 continuation tokens, got input_token_logprobs []"
    out = _same_as_engine(served, (("select", "v1", ("yes", "no"), "sum_logprob"),))
    assert "EmptyPromptError: score() needs a non-empty prompt" in out["error"][1]


@pytest.mark.parametrize("kind", ["calls", "sglang", "openai"])
def test_score_on_an_empty_prompt_raises_empty_prompt_error(served, kind):
    from llmir_lang.errors import EmptyPromptError

    with pytest.raises(EmptyPromptError, match="score\\(\\) needs a non-empty prompt"):
        served.backend(kind).score("", ["yes", "no"])


def test_a_typed_server_error_is_still_a_remote_backend_error(served):
    from llmir_lang.executor.constraints.errors import InvalidRegexError
    from llmir_lang.executor.remote import RemoteBackendError

    r = httpx.post(
        served.url + "/generate", json={"text": "Q: ", "sampling_params": {"regex": "("}}, timeout=30
    )
    assert r.status_code == 400 and r.headers["x-llmir-error"] == "InvalidRegexError", r.headers
    ep = served.backend("calls")
    with pytest.raises(InvalidRegexError) as info:
        ep._post("/generate", {"text": "Q: ", "sampling_params": {"regex": "("}})
    assert isinstance(info.value, RemoteBackendError) and info.value.status == 400
    assert (
        type(info.value).__name__ == "InvalidRegexError" and str(info.value) == r.json()["error"]["message"]
    )
    assert info.value.url == served.url + "/generate"
    # errors that are no library input error keep the plain RemoteBackendError with the URL
    with pytest.raises(RemoteBackendError) as info:
        ep._post("/generate", {"text": "Q: ", "sampling_params": {"temperature": "hot"}})
    assert type(info.value) is RemoteBackendError and "/generate: HTTP 400" in str(info.value)


def test_gen_of_max_tokens_zero_before_another_gen(served):
    # with passes on the two gens are one fused engine chain; the engine finished the whole request
    # after the prefill of the first (max_new_tokens == 0), so 'v2' "failed: the backend returned
    # no result"; every remote backend (one request per gen) and passes="" give v2 its text (fixed:
    # such a gen ends with finish length and the chain goes on)
    ops = (
        ("text", "Q: "),
        ("gen", "v1", 0, None, None, ()),
        ("text", " then"),
        ("gen", "v2", 2, None, None, ()),
    )
    prog = {"items": [(ops, "")], "batch": False, "kv": "roomy"}
    assert outcomes(served.rt, prog) == outcomes(served.rt, prog, passes="")
