"""The Triton attention backend: the GPU counterpart of ``TorchAttentionBackend``.

``prepare(batch)`` does all per-batch host work once; ``forward`` (once per layer) only launches
kernels: ``store_kv`` (in a decode step, ``rotary_forward``: the model's rotary and the store in
one kernel), then extend attention, decode attention (split-KV: the last split of each
(request, KV head) merges the others in the same launch, or a merge launch follows, as
``triton_decode.merge_in_split_kernel`` picks from the split count; one direct kernel when the batch
is large enough not to split), or shared-prefix decode.

CUDA graphs (DECODE only). ``prepare`` and ``forward`` do no host syncs and no device work besides
the kernels for a decode batch: each request's split count is computed inside the decode kernel
from its KV length, and the partial results and the merge's arrival counters (0 between launches;
each launch leaves them 0) live in one preallocated workspace. To capture and replay, keep fixed:
- the batch size B (it sets the grid ``(B, kv_heads, split_cap(B))`` and whether a merge launch
  ``(B, H)`` follows);
- the tensors of the captured ``ForwardBatch`` (``kv_indptr``, ``kv_indices`` sized for the longest
  replay, ``out_cache_loc``): refill them in place before each replay; KV lengths may change freely;
- this backend object (its workspace address is baked into the graph).
``prepare`` may run inside or outside the captured region. Run one eager decode forward (or pass
``num_q_heads``) before capturing so the workspace exists. Padding rows of a bucket may have KV
length 0: they get output 0, never nan. Shared-prefix decode allocates per call and is meant for
eager steps only.
"""

from __future__ import annotations

import torch

from llmir_lang.errors import InvalidRequestError
from llmir_lang.executor.attention import AttentionBackend, ForwardBatch, ForwardMode, TorchAttentionBackend
from llmir_lang.kernels import policy, support
from llmir_lang.kernels import reference as ref


class TritonAttentionBackend(AttentionBackend):
    """Paged attention through the Triton kernels (CUDA; CPU only under ``TRITON_INTERPRET=1``).

    Falls back to the torch reference, with one warning, when the pool's head dim or dtype is not
    one the kernels support: slower, never wrong.
    """

    # decode steps run the rotary inside the KV store's kernel (``rotary_forward``); benchmarks
    # turn it off to compare
    fuse_rotary = True

    def __init__(
        self,
        k_buffers: list[torch.Tensor],
        v_buffers: list[torch.Tensor],
        sm_scale: float,
        *,
        max_batch_size: int = 256,
        num_q_heads: int | None = None,
    ):
        super().__init__(k_buffers, v_buffers, sm_scale)
        from llmir_lang.kernels import triton_decode, triton_extend

        self._td = triton_decode
        self._te = triton_extend
        kb = k_buffers[0]
        self.device = kb.device
        self.num_kv_heads = int(kb.shape[1])
        self.head_dim = int(kb.shape[2])
        self.decode_config = triton_decode.default_decode_config(self.head_dim, self.device)
        self.extend_config = triton_extend.default_extend_config(self.head_dim, self.device)
        self._extend_cfg = self.extend_config  # this batch's (extend_config_for, in prepare)
        self.max_batch_size = max_batch_size
        self._grid_splits = 1
        self._workspace_flat: torch.Tensor | None = None
        self._lse_flat: torch.Tensor | None = None
        self._counters_flat: torch.Tensor | None = None
        self._num_q_heads: int | None = None
        self._extend_plan: triton_extend.ExtendPlan | None = None
        self._shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._use_triton: bool | None = None
        if num_q_heads is not None:
            self._alloc_workspace(num_q_heads)

    # --- per batch -----------------------------------------------------------------------
    def prepare(self, batch: ForwardBatch) -> None:
        super().prepare(batch)
        self._shared = None
        self._extend_plan = None
        if batch.mode is ForwardMode.DECODE:
            if batch.batch_size > self.max_batch_size:
                raise InvalidRequestError(
                    f"decode batch of {batch.batch_size} requests exceeds the attention backend's "
                    f"max_batch_size={self.max_batch_size}; create the backend with a larger max_batch_size"
                )
            self._grid_splits = self._td.split_cap(
                batch.batch_size, self.num_kv_heads, self.decode_config, self.device
            )
        else:
            new_tokens = int(batch.input_ids.shape[0])
            self._extend_cfg = self._te.extend_config_for(
                self.extend_config, self.device, new_tokens, int(batch.kv_indices.shape[0]) - new_tokens
            )
            self._extend_plan = self._te.plan_extend(
                batch.qo_indptr, batch.kv_indptr, self._extend_cfg.block_m
            )

    def use_shared_prefix(
        self,
        prefix_indices: torch.Tensor,
        suffix_kv_indptr: torch.Tensor,
        suffix_kv_indices: torch.Tensor,
        *,
        force: bool = False,
    ) -> bool:
        """Offer the current DECODE batch's shared prefix; returns whether it will be used.

        Call after ``prepare`` when every request of the batch has KV ``prefix_indices`` followed by
        its own ``suffix_kv_indices[suffix_kv_indptr[b]:suffix_kv_indptr[b+1]]`` (this step's slot
        included). Used only when ``policy.should_use_shared_prefix`` says it pays, or ``force``.
        """
        b = self.batch
        if b is None or b.mode is not ForwardMode.DECODE:
            raise InvalidRequestError(
                "use_shared_prefix applies to a prepared DECODE batch; call prepare first"
            )
        token_bytes = 2 * self.num_kv_heads * self.head_dim * self.k_buffers[0].element_size()
        prefix_len = int(prefix_indices.shape[0])
        if not force and not policy.should_use_shared_prefix(prefix_len, b.batch_size, token_bytes):
            return False
        self._shared = (prefix_indices, suffix_kv_indptr, suffix_kv_indices)
        return True

    # --- per layer -----------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        b = self.batch
        assert b is not None, "prepare(batch) must be called before forward"
        kb, vb = self.k_buffers[layer_id], self.v_buffers[layer_id]
        if self._use_triton is None:
            self._use_triton = support.attention_ok("TritonAttentionBackend", q, kb, vb)
        if not self._use_triton:
            ref.store_kv(kb, vb, b.out_cache_loc, k, v)
            if b.mode is ForwardMode.EXTEND:
                return ref.extend_attention(q, kb, vb, b.qo_indptr, b.kv_indptr, b.kv_indices, self.sm_scale)
            if self._shared is not None:
                return ref.shared_prefix_decode(q, kb, vb, *self._shared, self.sm_scale)
            return ref.decode_attention(q, kb, vb, b.kv_indptr, b.kv_indices, self.sm_scale)
        from llmir_lang.kernels import triton_misc

        k, v = _lastdim(k), _lastdim(v)
        triton_misc.store_kv(kb, vb, b.out_cache_loc, k, v)
        q = _lastdim(q)
        if b.mode is ForwardMode.DECODE:
            return self._attend_decode(q, kb, vb)
        assert self._extend_plan is not None
        # The new tokens' keys straight from this step's k, v (no slot gather) when they are
        # exactly what store_kv wrote, i.e. already in the pool's dtype.
        direct = k.dtype == kb.dtype and v.dtype == vb.dtype
        return self._te.extend_attention(
            q,
            kb,
            vb,
            b.qo_indptr,
            b.kv_indptr,
            b.kv_indices,
            self.sm_scale,
            plan=self._extend_plan,
            config=self._extend_cfg,
            k_new=k if direct else None,
            v_new=v if direct else None,
        )

    def rotary_forward(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, layer_id: int
    ) -> torch.Tensor | None:
        """Decode steps: the rotary, and the KV store, in one kernel (``kernels.triton_misc.
        rope_store_kv``), then decode attention. None (the model's rotary and ``forward``) for
        extends, with ``fuse_rotary`` off, or where the Triton kernels do not apply."""
        b = self.batch
        assert b is not None, "prepare(batch) must be called before forward"
        if not self.fuse_rotary or b.mode is not ForwardMode.DECODE:
            return None
        t, d = qkv.shape[0], self.head_dim
        kb, vb = self.k_buffers[layer_id], self.v_buffers[layer_id]
        if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * self.num_kv_heads) * d or qkv.stride(1) != 1:
            return None
        if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.numel() != t * d or sin.numel() != t * d:
            return None
        if self._use_triton is None:
            q_like = qkv[:, : num_heads * d].view(t, num_heads, d)
            self._use_triton = support.attention_ok("TritonAttentionBackend", q_like, kb, vb)
        if not self._use_triton:
            return None
        from llmir_lang.kernels import triton_misc

        q = triton_misc.rope_store_kv(qkv, cos, sin, num_heads, kb, vb, b.out_cache_loc)
        return self._attend_decode(q, kb, vb)

    def _attend_decode(self, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
        if self._shared is not None:
            from llmir_lang.kernels import triton_shared_prefix

            prefix, suf_indptr, suf_indices = self._shared
            return triton_shared_prefix.shared_prefix_decode(
                q, kb, vb, prefix, suf_indptr, suf_indices, self.sm_scale
            )
        return self._decode(q, kb, vb)

    def _decode(self, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
        b = self.batch
        assert b is not None
        bsz, num_heads, _ = q.shape
        if self._num_q_heads != num_heads:
            self._alloc_workspace(num_heads)
        assert self._workspace_flat is not None and self._lse_flat is not None
        splits = self._grid_splits
        part_o = self._workspace_flat[: bsz * num_heads * splits * self.head_dim].view(
            bsz, num_heads, splits, self.head_dim
        )
        part_lse = self._lse_flat[: bsz * num_heads * splits].view(bsz, num_heads, splits)
        assert self._counters_flat is not None
        counters = self._counters_flat[: bsz * num_heads].view(bsz, num_heads)
        return self._td.decode_attention(
            q,
            kb,
            vb,
            b.kv_indptr,
            b.kv_indices,
            self.sm_scale,
            workspace=self._td.DecodeWorkspace(part_o, part_lse, counters),
            config=self.decode_config,
        )

    def _alloc_workspace(self, num_q_heads: int) -> None:
        # Largest B * split_cap(B) over allowed batch sizes: one flat buffer, viewed per batch, so
        # its address never changes between graph replays.
        rows = max(
            bs * self._td.split_cap(bs, self.num_kv_heads, self.decode_config, self.device)
            for bs in range(1, self.max_batch_size + 1)
        )
        self._num_q_heads = num_q_heads
        self._workspace_flat = torch.empty(
            rows * num_q_heads * self.head_dim, dtype=torch.float32, device=self.device
        )
        self._lse_flat = torch.empty(rows * num_q_heads, dtype=torch.float32, device=self.device)
        # Zeroed once: every one-launch decode leaves its counters at 0 again.
        self._counters_flat = torch.zeros(
            self.max_batch_size * num_q_heads, dtype=torch.int32, device=self.device
        )


def _lastdim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def select_attention_backend(
    k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], sm_scale: float, **kwargs: int
) -> AttentionBackend:
    """The backend for a pool: Triton on CUDA when Triton is installed, the torch reference otherwise.

    ``kwargs`` (``max_batch_size``, ``num_q_heads``) go to ``TritonAttentionBackend``.
    """
    if k_buffers and k_buffers[0].is_cuda and support.triton_available():
        return TritonAttentionBackend(k_buffers, v_buffers, sm_scale, **kwargs)
    return TorchAttentionBackend(k_buffers, v_buffers, sm_scale)


__all__ = ["TritonAttentionBackend", "select_attention_backend"]
