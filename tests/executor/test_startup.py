"""Start-up: an engine's process imports neither transformers nor torch's dynamo stack nor lark (about
2.5 s of start and exit on a 2-core CPU, ``benchmarks/bench_startup.py``), and the model built on
the meta device without them is the model built as before."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from torch import nn

from llmir_lang.executor.model import CausalLM
from llmir_lang.executor.model_config import ModelConfig, rope_inv_freq
from llmir_lang.models import TINY_MODEL_DIR

HEAVY = ("transformers", "torch._dynamo", "triton", "sympy", "lark")

SCRIPT = """
import json, sys
import llmir_lang as llmir

SPEC = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@llmir.function
def qa(s, q):
    s += llmir.user("Q: " + q)
    s += llmir.assistant(llmir.gen("a", max_tokens=4, stop="\\n"))
    s += llmir.gen("j", max_tokens=12, json_schema=SPEC)


rt = llmir.Runtime(device="cpu")  # on CUDA the engine imports triton and compiles, by design
state = qa.run(q="What is 7 + 5?", backend=rt)
assert state.error() is None, state.error()
print(json.dumps([m for m in %r if m in sys.modules]))
"""


def test_an_engine_process_imports_no_transformers_nor_dynamo() -> None:
    """Runtime() on the CPU, a gen in chat roles and a JSON-schema constraint on the bundled model."""
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT % (HEAVY,)], capture_output=True, text=True, timeout=300, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _config() -> ModelConfig:
    return ModelConfig.from_dict(json.loads((TINY_MODEL_DIR / "config.json").read_text()))


def test_the_meta_built_model_is_torchs_to_the_stride() -> None:
    cfg = _config()
    with torch.device("meta"):
        ours, ref = CausalLM(cfg), CausalLM(cfg)
    assert ours.model.embed_tokens.weight.is_meta
    assert ours.rotary.inv_freq.is_meta and ours.rotary.inv_freq.shape == rope_inv_freq(cfg).shape
    assert ours.rotary.inv_freq.dtype == rope_inv_freq(cfg).dtype
    ours = ours.to(torch.bfloat16).to_empty(device="cpu")
    ref = nn.Module.to_empty(ref.to(torch.bfloat16), device="cpu")  # torch's own, empty_like
    a, b = dict(ours.named_parameters()), dict(ref.named_parameters())
    a.update(ours.named_buffers())
    b.update(ref.named_buffers())
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].shape, a[k].dtype, a[k].stride(), a[k].device) == (
            b[k].shape,
            b[k].dtype,
            b[k].stride(),
            b[k].device,
        ), k
        assert isinstance(a[k], nn.Parameter) == isinstance(b[k], nn.Parameter)


def test_a_model_built_on_the_cpu_draws_the_same_random_weights() -> None:
    cfg = _config()
    torch.manual_seed(0)
    model = CausalLM(cfg)
    torch.manual_seed(0)
    embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # the first module that draws
    assert torch.equal(model.model.embed_tokens.weight, embedding.weight)
    assert torch.equal(model.rotary.inv_freq, rope_inv_freq(cfg))
