"""A select's method keys (``greedy_logprob_matrix``; ``unconditional_token_logprobs`` and
``normalized_unconditional_prompt_logprobs``) on the remote backends: whole programs
(``/program``: the server's meta info comes back as JSON), call by call (``/generate``, the
backend's ``score``) and ``OpenAI`` (``/completions`` with echo). Each reports what the embedded
Runtime reports, one entry per choice as given, the triples as tuples."""

from __future__ import annotations

import pytest
from server_harness import remote_backend, server_beside_runtime

import llmir_lang as llmir

CHOICES = [" yes", " no", " yes", " it depends", " no"]
METHOD_KEYS = {
    "greedy_token_selection": ("greedy_logprob_matrix",),
    "unconditional_likelihood_normalized": (
        "unconditional_token_logprobs",
        "normalized_unconditional_prompt_logprobs",
    ),
}


@pytest.fixture(scope="module")
def served():
    with server_beside_runtime() as pair:
        yield pair


def _program(method: str):
    @llmir.function
    def verdict(s):
        s += "Q: Is the sky blue on a clear day?\nA:" + llmir.select("ans", CHOICES, choices_method=method)

    return verdict


@pytest.mark.parametrize("method", list(METHOD_KEYS))
@pytest.mark.parametrize("kind", ["program", "calls", "openai"])
@pytest.mark.parametrize("passes", [None, ""])
def test_remote_select_reports_the_method_keys(served, kind, passes, method):
    server, rt = served
    kw = {} if passes is None else {"passes": passes}
    backend = remote_backend(kind, server.url)
    try:
        got = _program(method).run(backend=backend, **kw)
    finally:
        backend.close()
    want = _program(method).run(backend=rt, **kw)
    assert got.error() is None and got["ans"] == want["ans"]
    g, w = got.get_meta_info("ans"), want.get_meta_info("ans")
    other = {k for keys in METHOD_KEYS.values() for k in keys} - set(METHOD_KEYS[method])
    assert not other & g.keys()
    for key in METHOD_KEYS[method]:
        assert len(g[key]) == len(CHOICES), key
    if method == "greedy_token_selection":
        for a, b in zip(g["greedy_logprob_matrix"], w["greedy_logprob_matrix"], strict=True):
            assert a == pytest.approx(b, abs=1e-4)
        return
    assert g["normalized_unconditional_prompt_logprobs"] == pytest.approx(
        w["normalized_unconditional_prompt_logprobs"], abs=1e-4
    )
    for row, want_row, inputs in zip(
        g["unconditional_token_logprobs"],
        w["unconditional_token_logprobs"],
        g["input_token_logprobs"],
        strict=True,
    ):
        assert all(isinstance(t, tuple) and len(t) == 3 for t in row)
        assert [t[1:] for t in row] == [t[1:] for t in inputs]  # the same tokens as the select's
        assert [t[0] for t in row] == pytest.approx([t[0] for t in want_row], abs=1e-4)
