"""The remote backends' scoring when the server's ``/tokenize`` fails (``fault_server``).

An answer of ``/tokenize`` that cannot be read (not JSON, another shape, a 200 that carries an
error) makes a backend score without the server's tokenization, warning once; it may be a passing
fault (a proxy's page, a server restarting), so the backend asks ``/tokenize`` again after a pause
and stops asking only after several such answers in a row. A route that is absent (404 / 405)
is remembered at once; an HTTP error (5xx) fails the call and is remembered not at all.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fault_server import FaultServer  # noqa: E402

import llmir_lang as llmir  # noqa: E402
from llmir_lang.executor import remote_tokens  # noqa: E402
from llmir_lang.executor.remote import RemoteBackendError  # noqa: E402

PROMPT, CHOICES = "P1: Q: ", ["yes", "no"]  # the tag makes the prompt's /tokenize fail
UNREADABLE = ("bad_shape", "bad_json", "not_json", "error_200")
LATER = 3600.0  # seconds: past any pause of the backends'


def backend(kind: str, server: FaultServer) -> llmir.Endpoint | llmir.OpenAI:
    if kind == "endpoint":
        return llmir.Endpoint(server.url, protocol="sglang", timeout=5)
    return llmir.OpenAI(server.url + "/v1", "fake-model", timeout=5)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backends' clock for /tokenize pauses, moved by the test (``clock[0] += s``)."""
    now = [1000.0]
    monkeypatch.setattr(remote_tokens, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def tokenize_requests(server: FaultServer) -> list[str]:
    return [e.fault for e in server.log if e.route == "/tokenize"]


@pytest.fixture(scope="module")
def want() -> dict[str, list[list[float]]]:
    """The scores from a server whose /tokenize never fails."""
    server = FaultServer()
    try:
        out = {}
        for kind in ("endpoint", "openai"):
            with backend(kind, server) as b:
                out[kind] = b.score(PROMPT, CHOICES)
        return out
    finally:
        server.close()


@pytest.mark.parametrize("fault", UNREADABLE)
@pytest.mark.parametrize("kind", ["endpoint", "openai"])
def test_an_unreadable_tokenize_answer_pauses_tokenize_for_a_while_only(kind, fault, clock, want):
    """Before: one such answer switched the backend to scoring without /tokenize for good, with
    no word said; a server whose proxy failed once was never asked again."""
    server = FaultServer(
        seed=3, rate=1.0, faults=(fault,), tokenize_faults=(fault,), routes=("/tokenize",), max_faults=1
    )
    b = backend(kind, server)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert b.score(PROMPT, CHOICES) == want[kind]  # scored without the server's tokenization
            assert tokenize_requests(server) == [fault]
            clock[0] += 1.0
            assert b.score(PROMPT, CHOICES) == want[kind]  # within the pause: not asked again
            assert tokenize_requests(server) == [fault]
            clock[0] += LATER
            assert b.score(PROMPT, CHOICES) == want[kind]  # after it: asked again, and read
            assert tokenize_requests(server) == [fault, "ok", "ok", "ok"]
            assert b.score(PROMPT, CHOICES) == want[kind]
            assert tokenize_requests(server)[4:] == ["ok", "ok", "ok"]
    finally:
        b.close()
        server.close()
    said = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(said) == 1, [str(w.message) for w in said]  # warned once
    assert server.url + "/tokenize" in str(said[0].message) and "tokenizer=" in str(said[0].message)


@pytest.mark.parametrize("kind", ["endpoint", "openai"])
def test_unreadable_tokenize_answers_in_a_row_stop_the_asking(kind, clock, want):
    server = FaultServer(
        seed=3, rate=1.0, faults=("bad_shape",), tokenize_faults=("bad_shape",), routes=("/tokenize",)
    )
    b = backend(kind, server)
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            for _ in range(6):
                assert b.score(PROMPT, CHOICES) == want[kind]
                clock[0] += LATER
    finally:
        b.close()
        server.close()
    assert tokenize_requests(server) == ["bad_shape"] * remote_tokens._TOKENIZE_GIVE_UP


@pytest.mark.parametrize("kind", ["endpoint", "openai"])
def test_an_absent_tokenize_route_is_remembered_at_once(kind, clock, want):
    server = FaultServer(absent=("/tokenize",))
    b = backend(kind, server)
    try:
        for _ in range(3):
            assert b.score(PROMPT, CHOICES) == want[kind]
            clock[0] += LATER
    finally:
        b.close()
        server.close()
    assert tokenize_requests(server) == ["absent"]


@pytest.mark.parametrize("kind", ["endpoint", "openai"])
def test_a_tokenize_http_error_fails_the_call_and_is_not_remembered(kind, clock, want):
    server = FaultServer(
        seed=3, rate=1.0, faults=("500",), tokenize_faults=("500",), routes=("/tokenize",), max_faults=1
    )
    b = backend(kind, server)
    try:
        with pytest.raises(RemoteBackendError, match="HTTP 500"):
            b.score(PROMPT, CHOICES)
        assert b.score(PROMPT, CHOICES) == want[kind]  # the next call asks again at once
    finally:
        b.close()
        server.close()
    assert tokenize_requests(server) == ["500", "ok", "ok", "ok"]
