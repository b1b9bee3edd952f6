"""Logit processors of the sampler: penalties, the constraint bitmask, top-k / top-p / min-p.

Each works on float32 logits ``[B, V]`` for a whole batch at once (in place unless stated); the
sampler applies them in the order its module docstring gives.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch

_LITTLE_ENDIAN = sys.byteorder == "little"

_NEG_INF = float("-inf")
_MIN_PENALTY = 1e-30  # repetition penalties are clamped to [1e-30, 1e30] (apply_repetition_penalty)
# Token ids of one row: a list of ints, a numpy array or a 1-D int tensor (passed through cheaply).
TokenIds = Sequence[int] | np.ndarray | torch.Tensor


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device``, copied without waiting for the device's queue
    (``torch.tensor(..., device=cuda)`` would wait for every kernel queued before it, which undoes
    the engine's run-ahead decode)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def apply_repetition_penalty(
    x: torch.Tensor, rows: Sequence[int], token_ids: Sequence[TokenIds], penalties: Sequence[float]
) -> None:
    """HF convention, in place: for each distinct token seen in row ``rows[j]``, a positive logit is
    divided by ``penalties[j]`` and a negative one multiplied by it (once, however often it occurs).
    A row may be listed more than once (same penalty each time): its id lists are merged."""
    r, t = _flat_pairs(rows, token_ids, x.shape[1], x.device)
    if t.numel() == 0:
        return
    # NOTE: a penalty outside [1e-30, 1e30] (validation takes any positive number) would turn a
    # logit into +-inf, or 0 * inf into NaN, and a NaN row samples token 0 whatever its mask says
    clamped = [min(max(float(p), _MIN_PENALTY), 1.0 / _MIN_PENALTY) for p in penalties]
    pen = _per_row(rows, clamped, x.shape[0], x.device)[r]
    # NOTE: a token seen twice appears twice in (r, t); every copy writes the same value, computed
    # from the logit before any write, so it is penalized once without a (sorting) unique.
    vals = x[r, t]
    x[r, t] = torch.where(vals < 0, vals * pen, vals / pen)


def apply_frequency_presence_penalty(
    x: torch.Tensor,
    rows: Sequence[int],
    output_ids: Sequence[TokenIds],
    frequency: Sequence[float],
    presence: Sequence[float],
) -> None:
    """OpenAI convention, in place: ``logit[t] -= count[t] * frequency + (count[t] > 0) * presence``
    where ``count`` counts token t among the row's generated tokens. Rows must be distinct."""
    r, t = _flat_pairs(rows, output_ids, x.shape[1], x.device)
    if t.numel() == 0:
        return
    freq = _per_row(rows, frequency, x.shape[0], x.device)[r]
    pres = _per_row(rows, presence, x.shape[0], x.device)[r]
    # Presence first: duplicate pairs all write the same value (taken before any write), so it
    # is subtracted once. Then frequency accumulates once per occurrence. No unique / sort needed.
    x[r, t] = x[r, t] - pres
    x.index_put_((r, t), -freq, accumulate=True)


def apply_bitmask(x: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: ``x[b, v] = -inf`` where bit ``v % 32`` of ``bitmask[b, v // 32]`` is 0 (the
    semantics of ``kernels.reference.apply_token_bitmask``); extra words past ``V`` are ignored."""
    batch, vocab = x.shape
    words = bitmask.to(device=x.device, dtype=torch.int32)
    if x.is_cuda and words.shape[-1] * 32 >= vocab:
        # one Triton launch instead of ~6 torch ops (the kernels package falls back to the
        # reference, with a one-time warning, where the kernel cannot run)
        from llmir_lang.kernels import apply_token_bitmask

        apply_token_bitmask(x, words)
        return
    if x.device.type == "cpu" and x.dtype == torch.float32 and _LITTLE_ENDIAN and words.shape[-1] * 32 >= vocab:
        # numpy: the words' bytes unpacked low bit first are the tokens in order (little-endian),
        # two calls instead of ~6 torch ops (measured 23-27 us against 48-57 us at vocab 4096)
        raw = np.ascontiguousarray(words.numpy()).view(np.uint8)
        allowed = np.unpackbits(raw, axis=-1, count=vocab, bitorder="little")
        np.copyto(x.numpy(), np.float32(_NEG_INF), where=allowed == 0)
        return
    bits = torch.arange(32, device=x.device, dtype=torch.int32)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().reshape(batch, -1)[:, :vocab]
    x.masked_fill_(~allowed, _NEG_INF)


def apply_top_k(x: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """Per-row top-k alone (same result as ``apply_top_k_top_p`` with ``top_p = 1``): keeps every
    logit >= the row's k-th largest; ``k <= 0`` or ``k >= V`` keeps all. Returns a new tensor."""
    vocab = x.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    cut = [k for k in ks if k < vocab]
    if not cut:
        return x
    # One partial topk with the batch's largest k serves every row; rows without a cut get -inf.
    kmax = max(cut)
    vals = torch.topk(x, kmax, dim=-1).values
    k = to_device([min(k, kmax) for k in ks], torch.int64, x.device)
    kth = vals.gather(1, (k - 1).unsqueeze(1))
    no_cut = to_device([k >= vocab for k in ks], torch.bool, x.device)
    kth = kth.masked_fill(no_cut.unsqueeze(1), _NEG_INF)
    return x.masked_fill(x < kth, _NEG_INF)


def apply_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row top-k then top-p on ``x [B, V]``; returns a new tensor with removed logits at -inf.

    top-k keeps every logit >= the k-th largest (ties kept; ``k <= 0`` or ``k >= V`` keeps all).
    top-p keeps the smallest set of most likely tokens whose mass (after top-k, renormalized)
    reaches ``top_p``, always at least one token, and every token tied with the least likely of
    them (as top-k keeps ties). Both match the HF warpers applied in that order, except at a tie
    on the top-p cutoff, where HF keeps whichever tied tokens its sort happens to put first.
    """
    vocab = x.shape[1]
    # Ascending order: the top-k threshold is at column V - k and the top-p test is a cumsum.
    sorted_x, order = torch.sort(x, dim=-1)
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    kth = sorted_x.gather(1, (vocab - k).unsqueeze(1))
    sorted_x = sorted_x.masked_fill(sorted_x < kth, _NEG_INF)
    cum = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
    remove = cum <= (1.0 - top_p).unsqueeze(1)
    remove[:, -1] = False
    # cum is nondecreasing, so the removed tokens are a prefix of the ascending order; the first
    # kept one sets the cut. Comparing values (not positions) keeps every token tied with it: the
    # sort's order among equal logits would otherwise decide which of them may be sampled.
    cut = sorted_x.gather(1, remove.sum(dim=-1, keepdim=True))
    return x.masked_fill(x < cut, _NEG_INF)


def apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p * (max probability)`` of their row (the most
    likely token always stays); returns a new tensor."""
    probs = torch.softmax(x, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return x.masked_fill(probs < threshold, _NEG_INF)


# --- helpers ---------------------------------------------------------------------------------


def _flat_pairs(
    rows: Sequence[int], token_ids: Sequence[TokenIds], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-row id lists into (row, token) index tensors, dropping ids outside [0, vocab)."""
    # numpy turns Python int lists into an array several times faster than torch.as_tensor does,
    # which matters for long prompts under a repetition penalty; tensors pass through as they are.
    parts = [
        ids.detach().to("cpu", torch.int64).reshape(-1).numpy()
        if isinstance(ids, torch.Tensor)
        else np.asarray(ids, dtype=np.int64).reshape(-1)
        for ids in token_ids
    ]
    t = torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, dtype=torch.int64)
    r = torch.repeat_interleave(
        torch.tensor(list(rows), dtype=torch.int64), torch.tensor([p.shape[0] for p in parts])
    )
    keep = (t >= 0) & (t < vocab)
    return r[keep].to(device), t[keep].to(device)


def _per_row(rows: Sequence[int], values: Sequence[float], batch: int, device: torch.device) -> torch.Tensor:
    """A [batch] float32 tensor holding ``values[j]`` at ``rows[j]`` (zero elsewhere)."""
    out = torch.zeros(batch, dtype=torch.float32)
    out[torch.tensor(list(rows), dtype=torch.int64)] = torch.tensor(list(values), dtype=torch.float32)
    return out.to(device)
