"""``separate_reasoning`` on the remote backends: a whole program sent to ``llmir serve``
(``/program``, run by the server's evaluator), the SGLang protocol and the OpenAI API (run by the
client's evaluator) split the output as the embedded engine does, text and variables."""

from __future__ import annotations

import pytest
import torch

import llmir_lang as llmir
from llmir_lang.executor.remote import Endpoint, OpenAI
from llmir_lang.models import __path__ as _models_path

MODEL_DIR = f"{_models_path[0]}/llmir-tiny"
THINK = r"<think>[a-z ]{1,8}</think> ?[a-z]{1,5}"


@llmir.function
def reasoned(s, q):
    s += llmir.user(q)
    s += llmir.assistant(
        llmir.separate_reasoning(llmir.gen("a", max_tokens=64, regex=THINK), model_type="deepseek-r1")
    )
    s += "PREFER:" + llmir.separate_reasoning(llmir.select("c", ["<think>x</think> yes", "no"]), "qwen3")
    forks = s.fork(2)
    forks += lambda i: (
        f" {i}:" + llmir.separate_reasoning(llmir.gen("t", max_tokens=64, regex=THINK), "step3")
    )
    forks.join()
    s += "\nNext:" + llmir.gen("b", max_tokens=4, stop="\n")


NAMES = ["a", "a_reasoning_content", "c", "c_reasoning_content", "t", "t_reasoning_content", "b"]


@pytest.fixture(scope="module")
def runtime():
    torch.set_num_threads(1)
    rt = llmir.Runtime(kv_memory="64MB")
    yield rt
    rt.shutdown()


def _snapshot(state):
    return state.text(), state.messages(), {n: state[n] for n in NAMES}


def test_every_remote_backend_splits_as_the_embedded_engine(server, runtime):
    want = _snapshot(reasoned.run(q="Think first.", backend=runtime))
    assert want[2]["a_reasoning_content"] and "</think>" not in want[0]
    with (
        Endpoint(server.url) as ep,
        Endpoint(server.url, protocol="sglang", tokenizer=MODEL_DIR) as sglang,
        OpenAI(server.url + "/v1", "llmir-tiny") as oa,
    ):
        assert ep.protocol == "llmir"  # the whole program runs on the server (/program)
        for backend in (ep, sglang, oa):
            assert _snapshot(reasoned.run(q="Think first.", backend=backend)) == want, backend
