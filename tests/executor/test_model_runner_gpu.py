"""ModelRunner on a GPU: CUDA-graph decode against eager decode and transformers, shared-prefix graphs.

Skipped without CUDA. Run in a process where ``TRITON_INTERPRET`` is unset:
``python -m pytest -q -m gpu tests/executor/test_model_runner_gpu.py``.
"""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch
from llmir_lang.kernels import policy
from test_model_runner import _generate, _model, _pool, _prefill_greedy, _reference_logits, _req

from llmir_lang.executor.attention import ForwardMode
from llmir_lang.executor.model_runner import ModelRunner
from llmir_lang.executor.scheduler import ScheduledBatch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="runs compiled kernels only"),
]

BF16 = torch.bfloat16


def _triton_runner(model, pool, **kw) -> ModelRunner:
    from llmir_lang.executor.triton_backend import TritonAttentionBackend

    be = TritonAttentionBackend(
        pool.k_buffers,
        pool.v_buffers,
        model.config.head_dim**-0.5,
        max_batch_size=32,
        num_q_heads=model.config.num_heads,
    )
    return ModelRunner(model, be, pool.device, **kw)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return float((a.float() - b.float()).abs().max()) <= tol * max(1.0, float(b.float().abs().max()))


def test_graph_decode_matches_eager_decode_at_every_bucket() -> None:
    model = _model(BF16, "cuda", hidden=256)  # head dim 64, as Llama-3.2-1B
    pool = _pool(model, 4096)
    runner = _triton_runner(model, pool)
    assert runner._graphs_ok, "bf16 pool + Triton backend on CUDA must use graphs"
    rng = random.Random(0)
    reqs = [_req(i, [rng.randrange(128) for _ in range(rng.randrange(5, 200))]) for i in range(13)]
    _prefill_greedy(runner, pool, reqs)
    for size in (1, 3, 8, 13, 5, 1):  # buckets 1, 4, 8, 16, 8, 1
        live = reqs[:size]
        for r in live:
            r.kv_slots.extend(pool.alloc(1).tolist())
        sb = ScheduledBatch(ForwardMode.DECODE, live, [r.kv_len - 1 for r in live], [1] * size, [True] * size)
        runner.cuda_graphs = True
        graphed = runner.run(sb).logits.clone()
        runner.cuda_graphs = False
        eager = runner.run(sb).logits.clone()
        assert graphed.shape == eager.shape == (size, model.config.vocab_size)
        assert torch.isfinite(graphed).all()
        assert _close(graphed, eager, 2e-2), size
        for r, row in zip(live, range(size)):
            ref = _reference_logits(model, r.fill_ids)
            assert _close(graphed[row], ref, 5e-2)
            r.output_ids.append(int(eager[row].argmax()))
    assert runner.graphs is not None and runner.graphs.num_captures == 4
    assert runner.num_graph_replays == 6


def test_shared_prefix_graphs_match_plain_graph_decode(monkeypatch) -> None:
    monkeypatch.setattr(policy, "should_use_shared_prefix", lambda p, n, b=0: p >= 64 and n >= 8)
    model = _model(BF16, "cuda", hidden=256, ctx=1024)
    rng = random.Random(3)
    system = [rng.randrange(128) for _ in range(300)]
    prompts = [system + [rng.randrange(128) for _ in range(rng.randrange(1, 20))] for _ in range(10)]
    on, lon, r_on = _generate(model, prompts, 8, shared=True)
    off, loff, r_off = _generate(model, prompts, 8, shared=False)
    assert r_on.num_shared_prefix_steps >= 5 and r_off.num_shared_prefix_steps == 0
    assert r_on.graphs is not None and any(k[1] >= 300 for k in r_on.graphs._graphs)
    # compare step by step while the two greedy runs agree (bf16 near-ties may split them later)
    compared = 0
    for a, b, la, lb in zip(on, off, lon, loff):
        for i in range(len(la)):
            assert _close(la[i], lb[i], 2e-2)
            compared += 1
            if a[i + 1] != b[i + 1]:
                break
    assert compared >= 30


def test_engine_fp32_on_cuda_matches_transformers_greedy(checkpoints) -> None:
    from hf_fixtures import hf_greedy

    from llmir_lang.executor.engine import Engine

    folder, hf = checkpoints("llama")
    ids = [random.Random(5).randrange(1, 300) for _ in range(21)]
    with Engine(str(folder), device="cuda", dtype="float32", kv_memory="64MB") as eng:
        r = eng.generate(ids, {"max_new_tokens": 16, "ignore_eos": True})
        assert not eng.runner._graphs_ok  # fp32 runs the torch reference kernels, eagerly
    assert r.token_ids == hf_greedy(hf, ids, 16)[0]


def test_engine_bf16_graphs_on_equals_off_and_tracks_transformers(checkpoints) -> None:
    """Graphs on == off for the first steps; every chosen token is (near) transformers' argmax."""
    from llmir_lang.executor.engine import Engine

    folder, hf = checkpoints("llama")
    rng = random.Random(6)
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randrange(8, 40))] for _ in range(5)]
    params = {"max_new_tokens": 12, "ignore_eos": True}
    with Engine(str(folder), device="cuda", dtype="bfloat16", kv_memory="64MB") as eng:
        on = eng.generate(prompts, params)
        stats = eng.call_in_engine_thread(lambda: (eng.runner.num_graph_replays, eng.runner._graphs_ok))
        eng.flush_cache()
        eng.call_in_engine_thread(lambda: setattr(eng.runner, "cuda_graphs", False))
        off = eng.generate(prompts, params)
    assert stats[1] and stats[0] >= 11
    for a, b in zip(on, off):
        assert a.token_ids[:4] == b.token_ids[:4]
    hf_bf16 = copy.deepcopy(hf).to("cuda", BF16)
    for p, r in zip(prompts, on):
        with torch.no_grad():
            logits = hf_bf16(torch.tensor([p + r.token_ids], device="cuda")).logits[0].float()
        lp = torch.log_softmax(logits[len(p) - 1 : -1], -1)
        chosen = lp.gather(1, torch.tensor(r.token_ids, device="cuda")[:, None])[:, 0]
        assert (lp.max(-1).values - chosen).max() <= 0.1


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_compiled_ops_are_as_accurate_as_plain_ops_in_graphed_decode(arch: str) -> None:
    """compile_model=None turns compile on with graphs. Compiled bf16 prefill logits are no further
    from an fp32 run than plain bf16 ops are (the compiled kernels round fewer intermediates, so they
    are usually closer), graphed compiled decode stays within bf16 tolerance of it: q/k/v bias of
    Qwen2, q/k norms of Qwen3."""
    from llmir_lang.executor.model import PLAIN_OPS, CausalLM, compiled_ops
    from llmir_lang.executor.model_config import ModelConfig

    cfg = ModelConfig.from_dict(
        {
            "architectures": [arch],
            "hidden_size": 256,
            "intermediate_size": 384,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "vocab_size": 128,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6,
        }
    )
    torch.manual_seed(0)
    ref32 = CausalLM(cfg).eval()
    with torch.no_grad():
        for p in ref32.parameters():
            p.normal_(0, 0.08) if p.dim() == 2 else p.normal_(1.0, 0.1)
    ref32 = ref32.to("cuda")
    model = copy.deepcopy(ref32).to(BF16)
    pool = _pool(model, 2048)
    runner = _triton_runner(model, pool)
    assert runner.compiled and model.ops is compiled_ops()
    # short extends keep the plain ops (host-bound there; see test_model_runner's spy test)
    assert model.plain_extend_tokens == 2048 * 2048 // model.config.hidden_size
    model.plain_extend_tokens = 0  # below, the compiled ops on every extend

    def errors(ids: list[int], got: torch.Tensor) -> tuple[float, float, float]:
        """(|got - fp32|, |plain bf16 - fp32|, |fp32|), max over the vocab."""
        want = _reference_logits(ref32, ids).float()
        model.ops = PLAIN_OPS
        try:
            plain = _reference_logits(model, ids).float()
        finally:
            model.ops = compiled_ops()
        err = float((got.float() - want).abs().max())
        return err, float((plain - want).abs().max()), float(want.abs().max())

    rng = random.Random(7)
    prompts = [[rng.randrange(128) for _ in range(rng.randrange(3, 60))] for _ in range(6)]
    for ids in prompts[:2]:
        err, plain_err, scale = errors(ids, _reference_logits(model, ids))
        assert err <= max(1.5 * plain_err, 0.01 * scale), (err, plain_err)
    reqs = [_req(i, p) for i, p in enumerate(prompts)]
    _prefill_greedy(runner, pool, reqs)
    n = len(reqs)
    for _ in range(3):
        for r in reqs:
            r.kv_slots.extend(pool.alloc(1).tolist())
        sb = ScheduledBatch(ForwardMode.DECODE, reqs, [r.kv_len - 1 for r in reqs], [1] * n, [True] * n)
        graphed = runner.run(sb).logits.clone()
        for row, r in enumerate(reqs):
            # decode adds its own bf16 roundings (K/V read back from the bf16 pool, another kernel),
            # so it is held to the bound the plain graphed decode meets in the test above
            err, _, scale = errors(r.fill_ids, graphed[row])
            assert err <= 5e-2 * max(1.0, scale), err
            r.output_ids.append(int(graphed[row].argmax()))
    assert runner.num_graph_replays == 3


def test_triton_projections_match_cublas_in_graphed_decode() -> None:
    """On CUDA the runner puts ``kernels.linear`` in the model (one-row projections through the
    Triton GEMV); graphed decode logits equal ``F.linear``'s within bf16 rounding, at batch 1 (the
    GEMV) and 3 (cuBLAS either way)."""
    import llmir_lang.kernels as K

    model = _model(BF16, "cuda", hidden=512)  # K = 512 and 1,024: the GEMV's slices
    pool = _pool(model, 4096)
    runner = _triton_runner(model, pool)
    assert runner.triton_linear and model.linear is K.linear
    rng = random.Random(1)
    reqs = [_req(i, [rng.randrange(128) for _ in range(rng.randrange(5, 60))]) for i in range(3)]
    _prefill_greedy(runner, pool, reqs)
    for size in (1, 1, 3):
        live = reqs[:size]
        for r in live:
            r.kv_slots.extend(pool.alloc(1).tolist())
        sb = ScheduledBatch(ForwardMode.DECODE, live, [r.kv_len - 1 for r in live], [1] * size, [True] * size)
        on = runner.run(sb).logits.clone()
        assert runner.set_triton_linear(False) is False and model.linear is torch.nn.functional.linear
        off = runner.run(sb).logits.clone()
        runner.set_triton_linear(True)
        assert _close(on, off, 2e-2), size
        for r, row in zip(live, range(size)):
            r.output_ids.append(int(off[row].argmax()))


def test_fused_norm_and_swiglu_projections_match_the_plain_ops(monkeypatch) -> None:
    """Row lengths that are multiples of 256 and no biases: a batch-1 decode step runs each RMSNorm
    (with its residual add) and SwiGLU's product inside the projection after it
    (``kernels.add_norm_linear`` / ``silu_mul_linear``); its logits equal those of the plain ops
    and ``F.linear`` within bf16 rounding, step after step."""
    import llmir_lang.kernels as K

    calls = {"norm": 0, "silu": 0}
    real_norm, real_silu = K.add_norm_linear, K.silu_mul_linear

    def norm(*a, **k):
        calls["norm"] += 1
        return real_norm(*a, **k)

    def silu(*a, **k):
        calls["silu"] += 1
        return real_silu(*a, **k)

    monkeypatch.setattr(K, "add_norm_linear", norm)
    monkeypatch.setattr(K, "silu_mul_linear", silu)
    model = _model(BF16, "cuda", hidden=512, intermediate_size=1024)
    pool = _pool(model, 4096)
    runner = _triton_runner(model, pool)
    rng = random.Random(2)
    reqs = [_req(0, [rng.randrange(128) for _ in range(37)])]
    _prefill_greedy(runner, pool, reqs)
    assert calls == {"norm": 0, "silu": 0}  # a prefill of 37 rows: the plain path
    r = reqs[0]
    for _ in range(4):
        r.kv_slots.extend(pool.alloc(1).tolist())
        sb = ScheduledBatch(ForwardMode.DECODE, [r], [r.kv_len - 1], [1], [True])
        on = runner.run(sb).logits.clone()
        runner.set_triton_linear(False)
        off = runner.run(sb).logits.clone()
        runner.set_triton_linear(True)
        assert _close(on, off, 2e-2)
        r.output_ids.append(int(off[0].argmax()))
    assert calls["norm"] >= 2 * 2 + 1 and calls["silu"] >= 2  # 2 layers + the output norm


@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (28672, 4096), (128256, 4096), (3072, 2048)])
def test_fused_row_kernels_real_shapes(n: int, k: int) -> None:
    import llmir_lang.kernels as K
    from llmir_lang.kernels.testing import rel_error

    from llmir_lang.executor.model import add_rms_norm, silu_mul

    torch.manual_seed(n)
    x = torch.randn(1, k, device="cuda", dtype=BF16)
    res = torch.randn(1, k, device="cuda", dtype=BF16)
    nw = (1 + 0.1 * torch.randn(k, device="cuda")).to(BF16)
    w = torch.randn(n, k, device="cuda", dtype=BF16) * k**-0.5
    h, want_res = add_rms_norm(x, res, nw, 1e-5)
    y, got_res = K.add_norm_linear(x, res, nw, 1e-5, w)
    assert torch.equal(got_res, want_res)  # the residual add rounds exactly as the model's
    assert rel_error(y, torch.nn.functional.linear(h.float(), w.float())) < 1.5e-2
    gate_up = torch.randn(1, 2 * k, device="cuda", dtype=BF16)
    y2 = K.silu_mul_linear(gate_up, w)
    assert rel_error(y2, torch.nn.functional.linear(silu_mul(gate_up).float(), w.float())) < 1.5e-2
