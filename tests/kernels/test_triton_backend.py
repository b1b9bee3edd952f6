"""TritonAttentionBackend against TorchAttentionBackend on the same batches (CPU interpreter).

Covers prefill, extend over a cached (shared) prefix, decode, and shared-prefix decode through the
backend, checking both the attention outputs and the pool contents each step leaves behind.
"""

from __future__ import annotations

import pytest
import torch
from llmir_lang.kernels.testing import indptr, rel_error

from llmir_lang.executor.attention import ForwardBatch, ForwardMode, TorchAttentionBackend
from llmir_lang.executor.triton_backend import TritonAttentionBackend, select_attention_backend

pytestmark = pytest.mark.usefixtures("triton_interpreter")

H, HKV, D, LAYERS, SLOTS = 4, 2, 16, 2, 512
DTYPE = torch.float16


def _batch(mode: ForwardMode, qo_lens: list[int], kv_lists: list[torch.Tensor]) -> ForwardBatch:
    new_slots = torch.cat([kv[len(kv) - n :] for kv, n in zip(kv_lists, qo_lens)])
    total = sum(qo_lens)
    return ForwardBatch(
        mode=mode,
        input_ids=torch.zeros(total, dtype=torch.int64),
        positions=torch.zeros(total, dtype=torch.int64),
        out_cache_loc=new_slots,
        qo_indptr=indptr(qo_lens),
        kv_indptr=indptr([len(kv) for kv in kv_lists]),
        kv_indices=torch.cat(kv_lists),
        batch_size=len(qo_lens),
    )


class _Pair:
    """The two backends over two copies of one pool, stepped together."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.gen = g
        pool = [torch.randn(SLOTS, HKV, D, generator=g).to(DTYPE) for _ in range(2 * LAYERS)]
        self.torch_be = TorchAttentionBackend(
            [p.clone() for p in pool[:LAYERS]], [p.clone() for p in pool[LAYERS:]], D**-0.5
        )
        self.triton_be = TritonAttentionBackend(
            [p.clone() for p in pool[:LAYERS]], [p.clone() for p in pool[LAYERS:]], D**-0.5, max_batch_size=16
        )

    def step(self, batch: ForwardBatch, shared: tuple[torch.Tensor, ...] | None = None) -> None:
        self.torch_be.prepare(batch)
        self.triton_be.prepare(batch)
        if shared is not None:
            # Tiny test shapes are far below the cost rule's break-even: force the path.
            assert self.triton_be.use_shared_prefix(*shared, force=True)
        tokens = batch.out_cache_loc.shape[0]
        for layer in range(LAYERS):
            q = torch.randn(tokens, H, D, generator=self.gen).to(DTYPE)
            k = torch.randn(tokens, HKV, D, generator=self.gen).to(DTYPE)
            v = torch.randn(tokens, HKV, D, generator=self.gen).to(DTYPE)
            expect = self.torch_be.forward(q, k, v, layer)
            out = self.triton_be.forward(q, k, v, layer)
            assert rel_error(out, expect) < 2e-3, (batch.mode, layer)
            assert torch.equal(self.triton_be.k_buffers[layer], self.torch_be.k_buffers[layer])
            assert torch.equal(self.triton_be.v_buffers[layer], self.torch_be.v_buffers[layer])


def test_prefill_extend_and_decode_match_the_torch_backend() -> None:
    pair = _Pair()
    slots = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(1))
    r0, r1 = slots[:5], slots[5:24]
    pair.step(_batch(ForwardMode.EXTEND, [5, 19], [r0, r1]))
    # r0 continues with 3 tokens; r2 reuses r1's first 16 slots as a cached prefix and adds 4.
    r0 = torch.cat([r0, slots[24:27]])
    r2 = torch.cat([r1[:16], slots[27:31]])
    pair.step(_batch(ForwardMode.EXTEND, [3, 4], [r0, r2]))
    # One decode step for all three (r1 has no new extend tokens, so it decodes too).
    r0, r1, r2 = (torch.cat([r, slots[31 + i : 32 + i]]) for i, r in enumerate([r0, r1, r2]))
    pair.step(_batch(ForwardMode.DECODE, [1, 1, 1], [r0, r1, r2]))


def test_shared_prefix_decode_through_the_backend() -> None:
    pair = _Pair()
    slots = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(2))
    prefix = slots[:260]
    suffix_lens = [1, 2, 3, 1, 2, 1, 4, 1]
    suffixes, first = [], 260
    for n in suffix_lens:
        suffixes.append(slots[first : first + n])
        first += n
    batch = _batch(ForwardMode.DECODE, [1] * 8, [torch.cat([prefix, s]) for s in suffixes])
    pair.step(batch, shared=(prefix, indptr(suffix_lens), torch.cat(suffixes)))


def test_cost_rule_gates_the_shared_prefix_path() -> None:
    pair = _Pair()
    prefix = torch.arange(300)
    lists = [torch.cat([prefix, torch.tensor([300 + i])]) for i in range(7)]
    pair.triton_be.prepare(_batch(ForwardMode.DECODE, [1] * 7, lists))
    # 7 x 300 tokens of 128 bytes save far less than the path costs.
    assert not pair.triton_be.use_shared_prefix(prefix, indptr([1] * 7), torch.arange(300, 307))


def test_select_attention_backend_on_cpu_is_the_torch_reference() -> None:
    k = [torch.zeros(4, HKV, D)]
    assert isinstance(select_attention_backend(k, k, 1.0), TorchAttentionBackend)


def test_decode_rotary_forward_equals_the_models_rotary_then_forward() -> None:
    """A decode step's ``rotary_forward`` (the rotary inside the KV store's kernel) gives what the
    model's ``rope_qkv`` then ``forward`` give: the torch backend's attention output, the same pool
    bits. Extends, and ``fuse_rotary`` off, decline (None: the model runs its own rotary)."""
    from llmir_lang.executor.model import rope_qkv

    pair = _Pair()
    slots = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(3))
    lens = [40, 1, 300]
    lists, first = [], 0
    for n in lens:
        lists.append(slots[first : first + n])
        first += n
    batch = _batch(ForwardMode.DECODE, [1] * 3, lists)
    pair.torch_be.prepare(batch)
    pair.triton_be.prepare(batch)
    g = pair.gen
    pos = torch.tensor([39.0, 0.0, 299.0])
    freqs = pos[:, None] * 10000.0 ** (-torch.arange(0, D, 2).float() / D)[None, :]
    cos = torch.cat((freqs.cos(), freqs.cos()), -1).to(DTYPE).unsqueeze(1)
    sin = torch.cat((-freqs.sin(), freqs.sin()), -1).to(DTYPE).unsqueeze(1)
    for layer in range(LAYERS):
        qkv = torch.randn(3, (H + 2 * HKV) * D, generator=g).to(DTYPE)
        q, k, v = rope_qkv(qkv, cos, sin, H, HKV, None, None, 1e-6)
        expect = pair.torch_be.forward(q, k, v, layer)
        out = pair.triton_be.rotary_forward(qkv, cos, sin, H, layer)
        assert out is not None and rel_error(out, expect) < 2e-3, layer
        assert torch.equal(pair.triton_be.k_buffers[layer], pair.torch_be.k_buffers[layer])
        assert torch.equal(pair.triton_be.v_buffers[layer], pair.torch_be.v_buffers[layer])
    assert pair.torch_be.rotary_forward(qkv, cos, sin, H, 0) is None
    pair.triton_be.fuse_rotary = False
    assert pair.triton_be.rotary_forward(qkv, cos, sin, H, 0) is None
    pair.triton_be.fuse_rotary = True
    pair.triton_be.prepare(_batch(ForwardMode.EXTEND, [2, 1], [lists[0][:2], lists[1]]))
    assert pair.triton_be.rotary_forward(qkv[:3], cos, sin, H, 0) is None
