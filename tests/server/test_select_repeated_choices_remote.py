"""A select with repeated choices on the remote backends: whole programs (``/program``: the IR
carries ``choices_given`` to the server, the meta info comes back as JSON), call by call
(``/generate``) and ``OpenAI``. Each reports one meta entry per choice as given, like the
embedded Runtime, and scores each distinct choice once."""

from __future__ import annotations

import pytest
from server_harness import CallByCallEndpoint, remote_backend, server_beside_runtime

import llmir_lang as llmir

CHOICES = [" yes", " no", " yes", " it depends", " no"]
PER_CHOICE = (
    "choices",
    "logprobs",
    "normalized_prompt_logprobs",
    "input_token_logprobs",
    "output_token_logprobs",
)


class CountingEndpoint(CallByCallEndpoint):
    """Records the continuations it is asked to score."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scored: list[str] = []

    def score(self, prompt, continuations):
        self.scored += list(continuations)
        return super().score(prompt, continuations)


@pytest.fixture(scope="module")
def served():
    with server_beside_runtime() as pair:
        yield pair


@llmir.function
def verdict(s):
    s += "Q: Is the sky blue on a clear day?\nA:" + llmir.select("ans", CHOICES)


@pytest.mark.parametrize("kind", ["program", "calls", "openai"])
@pytest.mark.parametrize("passes", [None, ""])
def test_remote_select_meta_follows_the_choices_as_given(served, kind, passes):
    server, rt = served
    kw = {} if passes is None else {"passes": passes}
    backend = remote_backend(kind, server.url)
    try:
        got = verdict.run(backend=backend, **kw)
    finally:
        backend.close()
    want = verdict.run(backend=rt, **kw)
    assert got.error() is None and got["ans"] == want["ans"]
    g, w = got.get_meta_info("ans"), want.get_meta_info("ans")
    for key in PER_CHOICE:
        assert len(g[key]) == len(CHOICES), key
    assert g["choices"] == CHOICES and g["picked"] == w["picked"] == CHOICES.index(got["ans"])
    assert g["normalized_prompt_logprobs"] == pytest.approx(w["normalized_prompt_logprobs"], abs=1e-4)
    for i, choice in enumerate(CHOICES):
        first = CHOICES.index(choice)
        assert g["normalized_prompt_logprobs"][i] == g["normalized_prompt_logprobs"][first]
        assert g["logprobs"][i] == g["logprobs"][first]


def test_remote_scores_each_distinct_choice_once(served):
    server, _ = served
    backend = CountingEndpoint(server.url)
    try:
        for passes in (None, ""):
            backend.scored.clear()
            verdict.run(backend=backend, **({} if passes is None else {"passes": passes}))
            assert sorted(backend.scored) == sorted(set(CHOICES)), passes
    finally:
        backend.close()
