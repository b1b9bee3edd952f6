"""Torch reference implementations. They define what each kernel computes; they run anywhere."""

from __future__ import annotations

import torch


def store_kv(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write new keys/values ``k, v [T, Hkv, D]`` into pool slots ``loc [T]``."""
    k_buffer[loc] = k.to(k_buffer.dtype)
    v_buffer[loc] = v.to(v_buffer.dtype)


def rope_store_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    loc: torch.Tensor,
) -> torch.Tensor:
    """A step's rotary and KV store in one: split ``qkv [T, (H + 2 Hkv) * D]`` into q, k, v, rotate
    q and k (rotate-half layout: ``x * cos + roll(x, D / 2) * sin`` with ``cos`` and the sign-folded
    ``sin`` of ``Rotary.tables``, ``[T, 1, D]`` or ``[T, D]``, in qkv's dtype: each product and the
    sum rounded to it, as the model's ``rope_qkv`` and Hugging Face's rotary round); write k and v
    into pool slots ``loc [T]`` and return q ``[T, H, D]``."""
    t = qkv.shape[0]
    d = cos.shape[-1]
    hkv = k_buffer.shape[1]
    qk = qkv[:, : (num_heads + hkv) * d].reshape(t, num_heads + hkv, d)
    c, s = cos.reshape(t, 1, d).to(qkv.dtype), sin.reshape(t, 1, d).to(qkv.dtype)
    qk = qk * c + torch.roll(qk, d // 2, -1) * s
    store_kv(k_buffer, v_buffer, loc, qk[:, num_heads:], qkv[:, (num_heads + hkv) * d :].reshape(t, hkv, d))
    return qk[:, :num_heads].contiguous()


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


def _attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float):
    """Unmasked attention that also returns the log-sum-exp of the scaled scores.

    q [Tq, H, D], k/v [Tk, Hkv, D] -> (out [Tq, H, D] fp32, lse [Tq, H] fp32, natural log).
    With no keys (Tk == 0) the output is 0 and the lse is -inf, so merging it changes nothing.
    """
    h, hkv = q.shape[1], k.shape[1]
    if k.shape[0] == 0:
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        return out, torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    group = h // hkv
    qf = q.float().transpose(0, 1)
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * sm_scale  # [H, Tq, Tk]
    lse = torch.logsumexp(scores, dim=-1)  # [H, Tq]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.matmul(probs, vf).transpose(0, 1), lse.transpose(0, 1)


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


def decode_attention_with_lse(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode_attention`` that also returns each row's log-sum-exp, for merging partial results.

    Returns ``(out [B, H, D] in q's dtype, lse [B, H] fp32)``; the lse is the natural log of the sum of
    ``exp(sm_scale * q.k)`` over the request's keys; a request with no keys gets out 0, lse -inf.
    """
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    kv = kv_indptr.tolist()
    for b in range(q.shape[0]):
        idx = kv_indices[kv[b] : kv[b + 1]]
        o_b, lse_b = _attend_with_lse(q[b : b + 1], k_buffer[idx], v_buffer[idx], sm_scale)
        out[b : b + 1] = o_b.to(q.dtype)
        lse[b : b + 1] = lse_b
    return out, lse


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets into attention over their union.

    ``out_* [..., D]`` and ``lse_* [...]`` (natural log) come from ``*_with_lse`` functions. The result
    is ``(out in out_a's dtype, lse fp32)``; a side whose lse is -inf contributes nothing.
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    # Both sides empty gives lse -inf; a zero weight then avoids nan from (-inf) - (-inf).
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    out = w_a * out_a.float() + w_b * out_b.float()
    return out.to(out_a.dtype), lse


def shared_prefix_decode(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    prefix_indices: torch.Tensor,
    suffix_kv_indptr: torch.Tensor,
    suffix_kv_indices: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Decode for B requests that share one KV prefix (the cascade / Hydragen split).

    ``q [B, H, D]``; every request's KV is ``prefix_indices [P]`` followed by its own suffix
    ``suffix_kv_indices[suffix_kv_indptr[b]:suffix_kv_indptr[b+1]]``. The result equals
    ``decode_attention`` over the concatenated indices; it is computed as one attention of all B
    queries over the prefix, one per-request attention over the suffixes, merged by log-sum-exp.
    """
    bsz = q.shape[0]
    # All B queries as one batch of rows against the common prefix: [B, H, D] -> [B, H, D] + [B, H].
    pre_out, pre_lse = _attend_with_lse(q, k_buffer[prefix_indices], v_buffer[prefix_indices], sm_scale)
    suf_out, suf_lse = decode_attention_with_lse(
        q, k_buffer, v_buffer, suffix_kv_indptr[: bsz + 1], suffix_kv_indices, sm_scale
    )
    out, _ = merge_attention_states(pre_out, pre_lse, suf_out.float(), suf_lse)
    return out.to(q.dtype)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: ``logits [B, V]`` gets -inf where bit ``v % 32`` of ``bitmask[b, v // 32]`` is 0.

    ``bitmask`` is int32 ``[B, ceil(V / 32)]``; a set bit means the token is allowed.
    """
    b, vocab = logits.shape
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().reshape(b, -1)[:, :vocab]
    logits.masked_fill_(~allowed, float("-inf"))


def greedy_tokens(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """int64 ``[B]``: the index of the first largest of each row's first ``vocab`` logits (a NaN
    ranks above every number, as in ``torch.argmax``), -1 where all of them are -inf (every token
    masked)."""
    x = logits[:, :vocab]
    tokens = torch.argmax(x, dim=-1)
    top = x.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens.masked_fill(top == float("-inf"), -1)
