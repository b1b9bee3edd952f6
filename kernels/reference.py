"""Torch reference implementations. They define what each kernel computes; they run anywhere."""

from __future__ import annotations

import torch


def store_kv(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write new keys/values ``k, v [T, Hkv, D]`` into pool slots ``loc [T]``."""
    k_buffer[loc] = k.to(k_buffer.dtype)
    v_buffer[loc] = v.to(v_buffer.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, causal_offset: int | None):
    """q [Tq, H, D], k/v [Tk, Hkv, D] -> [Tq, H, D], computed in fp32.

    causal_offset: query i sits at key position causal_offset + i (keys after it are masked);
    None means no mask (every query sees every key).
    """
    h, hkv = q.shape[1], k.shape[1]
    group = h // hkv
    qf = q.float().transpose(0, 1)  # [H, Tq, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, Tk, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * sm_scale  # [H, Tq, Tk]
    if causal_offset is not None:
        tq, tk = q.shape[0], k.shape[0]
        qpos = torch.arange(tq, device=q.device).unsqueeze(1) + causal_offset
        kpos = torch.arange(tk, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).transpose(0, 1)  # [Tq, H, D]


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Prefill with a cached prefix.

    q: ``[T, H, D]``, the new tokens of B requests back to back (``qo_indptr [B+1]``).
    Request b's KV (prefix then its new tokens, already stored) is ``kv_indices[kv_indptr[b]:
    kv_indptr[b+1]]``; its new tokens are the last ``qo_len`` of them. New token j of request b
    attends to all prefix keys and causally to new tokens 0..j. Returns ``[T, H, D]`` in q's dtype.
    """
    out = torch.empty_like(q)
    qo = qo_indptr.tolist()
    kv = kv_indptr.tolist()
    for b in range(len(qo) - 1):
        q_b = q[qo[b] : qo[b + 1]]
        if q_b.shape[0] == 0:
            continue
        idx = kv_indices[kv[b] : kv[b + 1]]
        prefix = idx.shape[0] - q_b.shape[0]
        out[qo[b] : qo[b + 1]] = _attend(q_b, k_buffer[idx], v_buffer[idx], sm_scale, prefix).to(q.dtype)
    return out


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """One query token per request: ``q [B, H, D]`` attends to all of its KV. Returns ``[B, H, D]``."""
    out = torch.empty_like(q)
    kv = kv_indptr.tolist()
    for b in range(q.shape[0]):
        idx = kv_indices[kv[b] : kv[b + 1]]
        out[b : b + 1] = _attend(q[b : b + 1], k_buffer[idx], v_buffer[idx], sm_scale, None).to(q.dtype)
    return out


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: ``logits [B, V]`` gets -inf where bit ``v % 32`` of ``bitmask[b, v // 32]`` is 0.

    ``bitmask`` is int32 ``[B, ceil(V / 32)]``; a set bit means the token is allowed.
    """
    b, vocab = logits.shape
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().reshape(b, -1)[:, :vocab]
    logits.masked_fill_(~allowed, float("-inf"))
