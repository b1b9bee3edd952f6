"""A constraint after the reasoning (``ConstraintSpec.reasoning``) on the bundled model: the
reasoning runs free (jump-forward forces nothing there), the answer after the end tag is
constrained, and speculation's drafts that cross the end tag are rolled back across it, giving
the output plain decoding gives.

The bundled model writes no ``<think>`` tags; it writes ``Person JSON:\\n{...}`` for an
extraction prompt, so the tags here are ``<think>`` / ``JSON:``: what it writes before ``JSON:``
is its "reasoning", the record after it the answer."""

from __future__ import annotations

import json

import pytest
import torch

from llmir_lang.executor.constraints import (
    ReasoningTags,
    gated_by_reasoning,
    spec_from_json_schema,
    spec_from_regex,
)
from llmir_lang.executor.constraints.reasoning_gate import ReasoningGateMatcher
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.models.tiny_tasks import SCHEMAS

JSON_TAG = ReasoningTags("<think>", "JSON:", forced=True)
THINK = ReasoningTags("<think>", "</think>", forced=True)
SHOT = (
    "Text: Ada Lovelace is 36 and lives in London. She works as a mathematician. She is married.\n"
    'Person JSON:\n{"name":"Ada Lovelace","age":36,"city":"London","occupation":"mathematician",'
    '"married":true}\n'
)
PROMPT = SHOT + "Text: Bob Marley is 41 and works as a pilot in Oslo. He is married.\nPerson"


@pytest.fixture(scope="module")
def engines():
    torch.set_num_threads(1)
    fast = Engine(kv_memory="64MB", speculative_draft_tokens=4)  # jump-forward on (the default)
    plain = Engine(kv_memory="64MB", speculative_draft_tokens=0, jump_forward=False)
    yield fast, plain
    fast.shutdown()
    plain.shutdown()


def _run(engine: Engine, prompt: str, spec, max_tokens: int = 80):
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, constraint=spec)
    return engine.submit(prompt, params).result()


def test_the_answer_after_the_tag_is_constrained_and_speculation_crosses_the_tag(engines, monkeypatch):
    crossed: list[str] = []
    rollback = ReasoningGateMatcher.rollback

    def spy(self, n):
        before = self.phase
        rollback(self, n)
        if before != self.phase:
            crossed.append(f"{before} -> {self.phase}")

    monkeypatch.setattr(ReasoningGateMatcher, "rollback", spy)
    fast, plain = engines
    spec = gated_by_reasoning(spec_from_json_schema(SCHEMAS["person"]), JSON_TAG)
    out = _run(fast, PROMPT, spec)
    assert out.finish_reason == "stop" and out.text.startswith(" JSON:\n{")
    record = json.loads(out.text[len(" JSON:") :])
    assert list(record) == list(SCHEMAS["person"]["properties"]) and record["age"] == 41
    assert "inside the reasoning" in " ".join(crossed)  # drafts went past the tag and came back
    assert _run(plain, PROMPT, spec).text == out.text  # what plain decoding gives
    whole = _run(plain, PROMPT, spec_from_json_schema(SCHEMAS["person"]))
    assert whole.text.startswith("{")  # ungated, the record begins at once: no " JSON:" to split at


@pytest.mark.parametrize("which", [0, 1])
def test_nothing_is_forced_inside_the_reasoning(engines, which):
    """A fully forced constraint ("hello world") would be written at once by jump-forward; gated,
    the model reasons freely and never reaches the tag within the budget."""
    out = _run(
        engines[which],
        "Q: What is 12 + 5?\nA: ",
        gated_by_reasoning(spec_from_regex("hello world"), THINK),
        16,
    )
    assert out.finish_reason == "length" and "hello" not in out.text and out.completion_tokens == 16
    assert (
        _run(engines[which], "Q: What is 12 + 5?\nA: ", spec_from_regex("hello world"), 16).text
        == "hello world"
    )
