"""Attention kernels over a paged, token-granular KV pool (imported as ``llmir_lang.kernels``).

Pool layout (shared by every kernel): for each layer, ``k_buffer`` and ``v_buffer`` of shape
``[num_slots, num_kv_heads, head_dim]``. A request's KV is a list of slot indices, given in the
ragged form ``kv_indptr`` (``[B+1]``, int32/int64) and ``kv_indices`` (``[kv_indptr[-1]]``, int64),
in token order. ``reference`` defines what every kernel computes; Triton versions must match it.

The functions below dispatch: Triton for CUDA tensors (and for CPU tensors while
``TRITON_INTERPRET=1``, the tests' mode), the torch reference otherwise. Cases Triton does not
cover (see ``support``) fall back to the reference with a one-time ``KernelFallbackWarning``.

``linear``, ``add_norm_linear`` and ``silu_mul_linear`` are not attention: a decode step's
projections through weight-streaming Triton kernels where they beat cuBLAS (``triton_gemv``),
the last two with the RMSNorm or SwiGLU product before the projection fused in (their references:
``F.linear`` after the model's own ops). ``linear`` runs only on CUDA tensors and takes
``F.linear`` for everything it does not cover, silently, since that path is the fast one there;
the fused two are called only where ``fused_rows_ok`` says they apply.
"""

from __future__ import annotations

import torch
from llmir_lang.kernels import (
    reference,  # noqa: F401
    support,
)
from llmir_lang.kernels.policy import should_use_shared_prefix
from llmir_lang.kernels.reference import merge_attention_states
from llmir_lang.kernels.support import KernelFallbackWarning

__all__ = [
    "KernelFallbackWarning",
    "add_norm_linear",
    "apply_token_bitmask",
    "decode_attention",
    "decode_attention_with_lse",
    "extend_attention",
    "greedy_tokens",
    "linear",
    "merge_attention_states",
    "reference",
    "shared_prefix_decode",
    "silu_mul_linear",
    "should_use_shared_prefix",
    "store_kv",
]


def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _pool_ok(kernel: str, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> bool:
    if k_buffer.stride(-1) == 1 and v_buffer.stride(-1) == 1:
        return True
    support.warn_once(kernel, "the KV pool buffers are not contiguous along head_dim")
    return False


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on CUDA in fp16/bf16, a decode step's projection of one row
    (and an output layer's of 9-128 rows) through the Triton weight-streaming kernels
    (``triton_gemv``), which read the weights faster than cuBLAS there. Everything else, and any
    input these kernels do not take (a bias, other dtypes, strided rows), goes to ``F.linear``."""
    if (
        x.is_cuda
        and bias is None
        and x.dim() == 2
        and x.dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
        and x.stride(1) == 1
        and weight.stride(1) == 1
    ):
        from llmir_lang.kernels import triton_gemv

        cfg = triton_gemv.plan(x, weight)
        if cfg is not None:
            out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
            if isinstance(cfg, triton_gemv.GemvConfig):
                return triton_gemv.gemv(x, weight, out, cfg)
            return triton_gemv.skinny(x, weight, out, cfg)
    return torch.nn.functional.linear(x, weight, bias)


def fused_rows_ok(x: torch.Tensor, *dims: int) -> bool:
    """Whether ``add_norm_linear`` / ``silu_mul_linear`` take one row ``x`` whose fused
    projections have the input lengths ``dims`` (the hidden and intermediate sizes): CUDA,
    fp16/bf16, every length a multiple of 256."""
    return (
        x.is_cuda
        and x.dim() == 2
        and x.shape[0] == 1
        and x.dtype in (torch.float16, torch.bfloat16)
        and all(d % 256 == 0 for d in dims)
    )


def add_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual) @ weight.T, x + residual)`` for one row in one Triton kernel (the
    model's ``add_rms_norm`` then its projection; ``residual`` None: the norm of ``x``, and ``x``
    is the residual). Only where ``fused_rows_ok``; ``weight`` bias-free."""
    from llmir_lang.kernels import triton_gemv

    cfg = triton_gemv.fused_config(weight.shape[0], x.shape[1])
    assert cfg is not None, "add_norm_linear needs a row length that is a multiple of 256"
    return triton_gemv.norm_gemv(x, residual, norm_weight, eps, weight, cfg)


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(silu(gate) * up) @ weight.T`` for one row ``gate_up = [gate | up]`` in one Triton kernel
    (the model's ``silu_mul`` then the down projection). Only where ``fused_rows_ok``."""
    from llmir_lang.kernels import triton_gemv

    cfg = triton_gemv.fused_config(weight.shape[0], gate_up.shape[1] // 2)
    assert cfg is not None, "silu_mul_linear needs a row length that is a multiple of 256"
    return triton_gemv.silu_gemv(gate_up, weight, cfg)


def store_kv(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write new keys/values ``k, v [T, Hkv, D]`` into pool slots ``loc [T]`` (see reference)."""
    if support.device_ok("store_kv", k_buffer) and _pool_ok("store_kv", k_buffer, v_buffer):
        from llmir_lang.kernels import triton_misc

        triton_misc.store_kv(k_buffer, v_buffer, loc, _lastdim_contiguous(k), _lastdim_contiguous(v))
        return
    reference.store_kv(k_buffer, v_buffer, loc, k, v)


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill with a cached prefix (see ``reference.extend_attention``).

    ``k_new``/``v_new`` ``[T, Hkv, D]``: optionally, this step's keys/values of the new tokens (in
    ``qo_indptr`` order), already stored in the pool; the Triton kernel then reads them directly
    instead of through the slot list. The reference ignores them (the pool holds the same values),
    and so does the Triton path when their dtype is not the pool's (they would not be the same).
    """
    kernel = "extend_attention"
    if support.attention_ok(kernel, q, k_buffer, v_buffer) and _pool_ok(kernel, k_buffer, v_buffer):
        from llmir_lang.kernels import triton_extend

        if k_new is None or v_new is None or k_new.dtype != k_buffer.dtype or v_new.dtype != v_buffer.dtype:
            k_new = v_new = None
        else:
            k_new, v_new = _lastdim_contiguous(k_new), _lastdim_contiguous(v_new)
        return triton_extend.extend_attention(
            _lastdim_contiguous(q),
            k_buffer,
            v_buffer,
            qo_indptr,
            kv_indptr,
            kv_indices,
            sm_scale,
            k_new=k_new,
            v_new=v_new,
        )
    return reference.extend_attention(q, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, sm_scale)


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """One query token per request over its paged KV (see ``reference.decode_attention``)."""
    kernel = "decode_attention"
    if support.attention_ok(kernel, q, k_buffer, v_buffer) and _pool_ok(kernel, k_buffer, v_buffer):
        from llmir_lang.kernels import triton_decode

        return triton_decode.decode_attention(
            _lastdim_contiguous(q), k_buffer, v_buffer, kv_indptr, kv_indices, sm_scale
        )
    return reference.decode_attention(q, k_buffer, v_buffer, kv_indptr, kv_indices, sm_scale)


def decode_attention_with_lse(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode that also returns the lse ``[B, H]`` for ``merge_attention_states``."""
    kernel = "decode_attention_with_lse"
    if support.attention_ok(kernel, q, k_buffer, v_buffer) and _pool_ok(kernel, k_buffer, v_buffer):
        from llmir_lang.kernels import triton_decode

        out, lse = triton_decode.decode_attention(
            _lastdim_contiguous(q), k_buffer, v_buffer, kv_indptr, kv_indices, sm_scale, return_lse=True
        )
        return out, lse
    return reference.decode_attention_with_lse(q, k_buffer, v_buffer, kv_indptr, kv_indices, sm_scale)


def shared_prefix_decode(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    prefix_indices: torch.Tensor,
    suffix_kv_indptr: torch.Tensor,
    suffix_kv_indices: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Decode for requests sharing one prefix (see ``reference.shared_prefix_decode``).

    Always computes the cascade; callers decide with ``should_use_shared_prefix`` whether to call
    this or ``decode_attention`` over the concatenated slot lists.
    """
    kernel = "shared_prefix_decode"
    if support.attention_ok(kernel, q, k_buffer, v_buffer) and _pool_ok(kernel, k_buffer, v_buffer):
        from llmir_lang.kernels import triton_shared_prefix

        return triton_shared_prefix.shared_prefix_decode(
            _lastdim_contiguous(q),
            k_buffer,
            v_buffer,
            prefix_indices,
            suffix_kv_indptr,
            suffix_kv_indices,
            sm_scale,
        )
    return reference.shared_prefix_decode(
        q, k_buffer, v_buffer, prefix_indices, suffix_kv_indptr, suffix_kv_indices, sm_scale
    )


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: disallowed tokens' logits become -inf (see ``reference.apply_token_bitmask``)."""
    kernel = "apply_token_bitmask"
    if support.device_ok(kernel, logits):
        if bitmask.dtype == torch.int32 and logits.is_floating_point() and logits.stride(-1) == 1:
            from llmir_lang.kernels import triton_misc

            triton_misc.apply_token_bitmask(logits, _lastdim_contiguous(bitmask))
            return
        support.warn_once(
            kernel,
            f"logits {logits.dtype} (stride {logits.stride(-1)}) / bitmask {bitmask.dtype}; "
            "want float logits contiguous along the vocab and an int32 bitmask",
        )
    reference.apply_token_bitmask(logits, bitmask)


def greedy_tokens(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Each row's first argmax over ``logits[:, :vocab]`` (int64, -1 where every logit is -inf); see
    ``reference.greedy_tokens``. A greedy decode step's token without the vocabulary-wide row
    reduction's one program per row."""
    kernel = "greedy_tokens"
    if support.device_ok(kernel, logits) and logits.dim() == 2 and logits.stride(-1) == 1 and vocab > 0:
        from llmir_lang.kernels import triton_misc

        return triton_misc.greedy_tokens(logits, min(vocab, logits.shape[1]))
    return reference.greedy_tokens(logits, vocab)
