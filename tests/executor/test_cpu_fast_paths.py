"""The CPU fast paths compute what the generic paths compute: ``CausalLM._forward_cpu``
(``cpu_forward``: OpenBLAS projections, numpy one-row steps) within rounding of the module path;
the torch backend's CPU workspaces and chunked decode, and the cached rotary table, exactly."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from llmir_lang.kernels import reference as ref
from test_model_runner import _model as runner_model

from llmir_lang.executor import cpu_forward
from llmir_lang.executor.attention import ForwardBatch, ForwardMode, TorchAttentionBackend
from llmir_lang.executor.kv_pool import KVPool
from llmir_lang.executor.model import PLAIN_OPS, CausalLM
from llmir_lang.executor.model_config import rope_inv_freq

CONFIGS = {
    "llama": {"architectures": ["LlamaForCausalLM"]},
    "llama-bias-tied": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": True,
        "tie_word_embeddings": True,
    },
    "llama3-scaled": {
        "architectures": ["LlamaForCausalLM"],
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "qwen2": {"architectures": ["Qwen2ForCausalLM"]},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "head_dim": 32},
}


def _model(arch: str, dtype: torch.dtype = torch.float32) -> CausalLM:
    return runner_model(dtype, ctx=4096, **CONFIGS[arch])


def _batch(slots: list[list[int]], new: list[int], ids: list[int], logits: bool = True) -> ForwardBatch:
    """Request b holds KV in ``slots[b]``, the last ``new[b]`` of them written by this step."""
    qo, kv, loc, pos, last = [0], [0], [], [], []
    for s, n in zip(slots, new):
        qo.append(qo[-1] + n)
        kv.append(kv[-1] + len(s))
        loc += s[len(s) - n :]
        pos += range(len(s) - n, len(s))
        last.append(qo[-1] - 1)
    decode = all(n == 1 for n in new)
    return ForwardBatch(
        ForwardMode.DECODE if decode else ForwardMode.EXTEND,
        torch.tensor(ids),
        torch.tensor(pos),
        torch.tensor(loc),
        torch.tensor(qo),
        torch.tensor(kv),
        torch.tensor([x for s in slots for x in s]),
        len(slots),
        None if decode or not logits else torch.tensor(last),
    )


def _steps() -> list[tuple[list[list[int]], list[int]]]:
    """Prefills (a short padded group and a long one), decode steps, a mixed step."""
    a, b, c = list(range(0, 5)), list(range(100, 109)), list(range(200, 270))
    out = [([a, b, c], [5, 9, 70])]
    for i in range(3):
        a, b, c = a + [10 + i], b + [120 + i], c + [300 + i]
        out.append(([a, b, c], [1, 1, 1]))
    a, b, c = a + [20, 21, 22], b + [130], c + [310]
    out.append(([a, b, c], [3, 1, 1]))
    return out


def _one_request_steps() -> list[tuple[list[list[int]], list[int]]]:
    """One request alone: a prompt, decode steps (one-row steps: ``layer_row``), extends of 2
    and 3 tokens (``layer_rows``, a sgemv per row) and of 5 (``layer_rows``, sgemm)."""
    s = list(range(400, 411))
    out = [([s], [11])]
    for i in range(3):
        s = s + [420 + i]
        out.append(([s], [1]))
    for n in (2, 3, 5):
        s = s + list(range(430 + 10 * n, 430 + 10 * n + n))
        out.append(([s], [n]))
    return out


class _NoBlas:
    """``openblas()`` where numpy's BLAS cannot be held to one thread: projections stay in torch."""

    usable = False

    def held(self) -> contextlib.AbstractContextManager[int]:
        return contextlib.nullcontext(0)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to rounding, relative to the tensor's scale: another BLAS's summation order and
    numpy's exp move logits by ~1e-7 of their largest value here; a wrong op moves them by far more."""
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("blas", ["openblas", "torch"])
@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_cpu_forward_equals_the_module_path_within_rounding(
    arch: str, column_major: bool, blas: str, monkeypatch
) -> None:
    if blas == "openblas" and not cpu_forward.openblas().usable:
        pytest.skip("numpy's BLAS is not an OpenBLAS threadpoolctl can hold to one thread")
    if blas == "torch":
        monkeypatch.setattr(cpu_forward, "openblas", _NoBlas)
    rows_run = {"one": 0, "few": 0, "many": 0}
    for name, key in (("layer_row", "one"), ("layer_rows", "few"), ("layer_torch", "many")):
        monkeypatch.setattr(cpu_forward, name, _counted(getattr(cpu_forward, name), rows_run, key))
    model = _model(arch)
    if column_major:
        model.column_major_projections()  # what the loader does for fp32 on the CPU
    cfg = model.config
    generic_ops = dataclasses.replace(PLAIN_OPS)  # equal functions, not PLAIN_OPS: the module path
    pools = [
        KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 512, torch.float32, "cpu") for _ in range(2)
    ]
    backends = [TorchAttentionBackend(p.k_buffers, p.v_buffers, cfg.head_dim**-0.5) for p in pools]
    g = torch.Generator().manual_seed(1)
    for slots, new in _steps() + _one_request_steps():
        ids = torch.randint(0, cfg.vocab_size, (sum(new),), generator=g).tolist()
        batch = _batch(slots, new, ids)
        model.ops = PLAIN_OPS
        fast = model(batch, backends[0])
        model.ops = generic_ops
        slow = model(batch, backends[1])
        assert fast.shape == slow.shape and fast.dtype == torch.float32
        _close(fast, slow)
        for x, y in zip(pools[0].k_buffers + pools[0].v_buffers, pools[1].k_buffers + pools[1].v_buffers):
            _close(x, y)
    model.ops = PLAIN_OPS
    assert model._cpu_layers is not None, "the fast path ran"
    assert all(rows_run.values()), f"every arrangement ran: {rows_run}"


def _counted(fn, counts: dict[str, int], key: str):  # type: ignore[no-untyped-def]
    def run(*args, **kwargs):  # type: ignore[no-untyped-def]
        counts[key] += 1
        return fn(*args, **kwargs)

    return run


def test_openblas_runs_on_one_thread_and_only_one_row_steps_use_it_at_more_torch_threads(
    monkeypatch,
) -> None:
    """OpenBLAS never gets more threads than torch (benchmarks compare at equal thread counts),
    its threads never run beside torch's, and the process's own setting is back after a forward."""
    if not cpu_forward.openblas().usable:
        pytest.skip("numpy's BLAS is not an OpenBLAS threadpoolctl can hold to one thread")
    from threadpoolctl import threadpool_info, threadpool_limits

    routes: list[tuple[int, bool]] = []
    inside: list[int] = []
    proj = cpu_forward.proj_t

    def openblas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas"]

    proj_rows = cpu_forward.proj_rows

    def spy(x, wt, w, b, blas):  # type: ignore[no-untyped-def]
        routes.append((x.shape[0], blas))
        inside.extend(openblas_threads())
        return proj(x, wt, w, b, blas)

    def spy_rows(x, w, wt, b, blas, out=None):  # type: ignore[no-untyped-def]
        routes.append((x.shape[0], blas))
        inside.extend(openblas_threads())
        return proj_rows(x, w, wt, b, blas, out)

    monkeypatch.setattr(cpu_forward, "proj_t", spy)
    monkeypatch.setattr(cpu_forward, "proj_rows", spy_rows)
    model = _model("llama")
    cfg = model.config
    pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 64, torch.float32, "cpu")
    be = TorchAttentionBackend(pool.k_buffers, pool.v_buffers, cfg.head_dim**-0.5)
    before = torch.get_num_threads()
    blas_before = max(openblas_threads())
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            threadpool_limits(2, user_api="blas")  # the process's own setting
            routes.clear()
            inside.clear()
            for n_rows in (3, cpu_forward.NUMPY_ROWS + 2):  # numpy rows (logits of 1), torch ops
                model(_batch([list(range(n_rows))], [n_rows], list(range(5, 5 + n_rows))), be)
            assert inside and all(c == 1 for c in inside)  # one thread during the forward
            assert openblas_threads() and all(c == 2 for c in openblas_threads())  # given back
            assert routes and all(blas == (n == 1 or rows == 1) for rows, blas in routes), routes
    finally:
        torch.set_num_threads(before)
        threadpool_limits(blas_before, user_api="blas")


def test_weight_views_follow_replaced_parameters() -> None:
    """The fast path's transposed weight views are dropped when parameters may be replaced."""
    model = _model("qwen2")
    cfg = model.config
    pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 64, torch.float32, "cpu")
    be = TorchAttentionBackend(pool.k_buffers, pool.v_buffers, cfg.head_dim**-0.5)
    batch = _batch([list(range(6))], [6], [1, 2, 3, 4, 5, 6])

    one_row = _batch([list(range(7))], [1], [9])

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of a 6-row step then a one-row step, fast path and module path."""
        model.ops = PLAIN_OPS
        fast = torch.cat((model(batch, be), model(one_row, be)))
        model.ops = dataclasses.replace(PLAIN_OPS)
        return fast, torch.cat((model(batch, be), model(one_row, be)))

    before, _ = both()
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(new, assign=True)  # new Parameter objects
    fast, slow = both()
    _close(fast, slow)
    assert not torch.allclose(fast, before)
    model.double().float()  # _apply twice: new storage
    fast, slow = both()
    _close(fast, slow)


def test_other_dtypes_and_compiled_ops_take_the_module_path(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the CPU fp32 path ran")

    monkeypatch.setattr(cpu_forward, "forward", boom)
    for dtype, ops in ((torch.bfloat16, PLAIN_OPS), (torch.float32, dataclasses.replace(PLAIN_OPS))):
        model = _model("llama", dtype)
        model.ops = ops
        cfg = model.config
        pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 64, dtype, "cpu")
        be = TorchAttentionBackend(pool.k_buffers, pool.v_buffers, cfg.head_dim**-0.5)
        out = model(_batch([list(range(4))], [4], [1, 2, 3, 4]), be)
        assert out.dtype == torch.float32 and out.shape == (1, cfg.vocab_size)


def test_cached_rotary_rows_equal_the_computed_tables() -> None:
    model = _model("llama3-scaled")
    rot = model.rotary
    pos = torch.tensor([0, 1, 7, 1023, 5, 3000, 2])  # past the first table: it grows
    for _ in range(2):
        cos, sin = rot.cached_tables(pos)
        want_cos, want_sin = rot.tables(pos, torch.float32)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    assert rot._table is not None and rot._table.shape[0] == 4096
    # the loader replaces inv_freq after loading: the table must follow
    rot.inv_freq = rope_inv_freq(dataclasses.replace(model.config, rope_theta=1000.0, rope_scaling=None))
    cos, sin = rot.cached_tables(pos)
    want_cos, want_sin = rot.tables(pos, torch.float32)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)


def _decode_case(lens: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    slots, hkv, h, d = 600, 2, 8, 16
    kb = torch.randn(slots, hkv, d, generator=g)
    vb = torch.randn(slots, hkv, d, generator=g)
    perm = torch.randperm(slots - 1, generator=g).tolist()
    indices, indptr, off = [], [0], 0
    for n in lens:
        indices += perm[off : off + n]
        off += n
        indptr.append(len(indices))
    loc = [indices[e - 1] for e in indptr[1:]]
    b = len(lens)
    batch = ForwardBatch(
        ForwardMode.DECODE,
        torch.zeros(b, dtype=torch.int64),
        torch.tensor([n - 1 for n in lens]),
        torch.tensor(loc),
        torch.arange(b + 1),
        torch.tensor(indptr),
        torch.tensor(indices),
        b,
    )
    q = torch.randn(b, h, d, generator=g)
    k = torch.randn(b, hkv, d, generator=g)
    v = torch.randn(b, hkv, d, generator=g)
    return kb, vb, batch, q, k, v


def test_chunked_cpu_decode_equals_one_chunk_and_the_reference() -> None:
    kb, vb, batch, q, k, v = _decode_case([3, 17, 1, 9, 30, 2, 11])
    outs = []
    for chunk in (3, 64):
        be = TorchAttentionBackend([kb.clone()], [vb.clone()], 16**-0.5)
        be.cpu_decode_chunk = chunk
        be.prepare(batch)
        outs.append(be.forward(q, k, v, 0))
        # new K/V went where the step said (index_copy_ on the CPU)
        assert torch.equal(be.k_buffers[0][batch.out_cache_loc], k)
        assert torch.equal(be.v_buffers[0][batch.out_cache_loc], v)
    assert torch.equal(outs[0], outs[1])
    kb2, vb2 = kb.clone(), vb.clone()
    ref.store_kv(kb2, vb2, batch.out_cache_loc, k, v)
    want = ref.decode_attention(q, kb2, vb2, batch.kv_indptr, batch.kv_indices, 16**-0.5)
    torch.testing.assert_close(outs[0], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("keep", [True, False])
def test_reused_workspaces_give_what_fresh_backends_give(keep: bool) -> None:
    """Steps of growing and shrinking sizes over two layers through one backend (its workspaces
    reused, or too small to keep) against a fresh backend per step."""
    kb0, vb0 = _decode_case([1])[:2]
    shared = TorchAttentionBackend([kb0, kb0.clone()], [vb0, vb0.clone()], 16**-0.5)
    shared.numpy_max_requests = 0  # the torch path's workspaces (steps of <= 4 requests skip them)
    if not keep:
        shared.max_workspace_bytes = 16
    for i, lens in enumerate(([5, 40, 7], [2, 3], [60, 1, 33, 8], [4])):
        kb, vb, batch, q, k, v = _decode_case(lens, seed=i)
        shared.k_buffers, shared.v_buffers = [kb.clone(), kb.clone()], [vb.clone(), vb.clone()]
        shared.prepare(batch)
        got = [shared.forward(q, k, v, layer) for layer in (0, 1)]
        fresh = TorchAttentionBackend([kb.clone()], [vb.clone()], 16**-0.5)
        fresh.numpy_max_requests = 0
        fresh.prepare(batch)
        want = fresh.forward(q, k, v, 0)
        assert torch.equal(got[0], want) and torch.equal(got[1], want)
    assert bool(shared._workspace) == keep


def test_sequential_cpu_steps_attend_in_numpy_with_arrays(monkeypatch) -> None:
    """A lone request on the CPU engine (prefill, decode, jump-forward text, drafts) attends
    through the numpy plan (never the torch path), with arrays, and produces what the torch path
    produces."""
    from llmir_lang.executor import cpu_attention
    from llmir_lang.executor.backend import ChainRequest, EngineBackend, GenStep
    from llmir_lang.executor.constraints import spec_from_json_schema
    from llmir_lang.executor.engine import Engine
    from llmir_lang.executor.sampling_params import SamplingParams
    from llmir_lang.models.tiny_tasks import SCHEMAS, extraction_items

    calls = {"numpy": 0, "torch": 0, "via_tensors": 0}
    plan_forward, torch_forward = cpu_attention.NumpyPlan.forward, TorchAttentionBackend.forward

    def numpy_spy(self, q, k, v, layer_id):  # type: ignore[no-untyped-def]
        assert all(isinstance(a, np.ndarray) for a in (q, k, v)), "arrays, not tensors"
        calls["numpy"] += 1
        return plan_forward(self, q, k, v, layer_id)

    def torch_spy(self, q, k, v, layer_id):  # type: ignore[no-untyped-def]
        calls["torch"] += self.numpy_plan is None  # the torch path
        # tensors handed on to the numpy plan: only from layer_torch (the prefill's step of more
        # than NUMPY_ROWS rows); decode and short steps call the plan with arrays
        calls["via_tensors"] += self.numpy_plan is not None
        return torch_forward(self, q, k, v, layer_id)

    monkeypatch.setattr(cpu_attention.NumpyPlan, "forward", numpy_spy)
    monkeypatch.setattr(TorchAttentionBackend, "forward", torch_spy)
    eng = Engine(device="cpu", kv_memory="8MB")
    try:
        kind, prompt, _ = extraction_items(1, seed=5, kinds=("person",))[0]
        prompt = prompt[-80:]  # short enough that the prefill is a numpy step too (<= 64 tokens)
        assert len(eng.tokenizer.encode(prompt)) <= 64
        spec = spec_from_json_schema(SCHEMAS[kind], whitespace="")
        outs = {}
        for numpy_max in (4, 0):
            eng.runner.backend.numpy_max_requests = numpy_max
            eng.flush_cache()
            calls.update(numpy=0, torch=0, via_tensors=0)
            req = ChainRequest(prompt, [GenStep("x", SamplingParams(max_new_tokens=40), spec)])
            outs[numpy_max] = EngineBackend(eng).run([req])[0].steps[0]
            if numpy_max:
                layers = eng.model.config.num_layers
                assert calls["numpy"] > 2 * layers and calls["torch"] == 0, calls
                assert calls["via_tensors"] <= layers, calls  # at most the prefill's step
            else:
                assert calls["numpy"] == 0 and calls["torch"] > 0, calls
        assert outs[4].token_ids == outs[0].token_ids
    finally:
        eng.shutdown()
