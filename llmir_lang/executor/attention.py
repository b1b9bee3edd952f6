"""The attention backend interface and the torch reference backend.

A backend turns one ForwardBatch into attention outputs for every layer. The model calls
``backend.forward(q, k, v, layer_id)`` and never looks inside; a new backend (Triton on CUDA)
plugs in without touching the model.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmir_lang.executor import cpu_attention
from llmir_lang.kernels import reference as ref

# torch's CPU flash attention with its log-sum-exp (a private op; where it is missing the shared
# prefix is attended with two matmuls and an explicit softmax)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True: attend) as the additive fp32 bias the fused kernel takes."""
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # new tokens (>= 1 per request) over a cached prefix; prefill is prefix 0
    DECODE = "decode"  # exactly one new token per request


@dataclass(slots=True)
class ForwardBatch:
    """Everything one model forward needs to know about the batch.

    Invariants: ``input_ids``, ``positions`` and ``out_cache_loc`` have one entry per new token,
    grouped by request in batch order. ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` lists request b's
    slots for every token it has KV for after this step (prefix, then the new tokens), so its last
    ``qo_len[b]`` entries equal request b's part of ``out_cache_loc``.
    """

    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64: where this step's K/V go
    qo_indptr: torch.Tensor  # [B+1] int64: new tokens per request
    kv_indptr: torch.Tensor  # [B+1] int64
    kv_indices: torch.Tensor  # [kv_indptr[-1]] int64
    batch_size: int
    # Indices into the T new tokens whose logits the caller wants (last token of each request
    # for sampling; more for prompt logprobs / scoring). None = all tokens.
    logits_indices: torch.Tensor | None = None


class AttentionBackend(ABC):
    """Computes paged attention for a model whose KV lives in a KVPool.

    Contract: ``prepare(batch)`` is called once before the model forward of that batch; then
    ``forward`` is called once per layer, in layer order. ``forward`` stores this step's k/v into
    the pool at ``batch.out_cache_loc`` before attending, so new tokens see themselves.
    """

    def __init__(self, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], sm_scale: float):
        self.k_buffers = k_buffers
        self.v_buffers = v_buffers
        self.sm_scale = sm_scale
        self.batch: ForwardBatch | None = None
        # set by prepare() where this step's attention runs on numpy arrays (CPU, few requests):
        # the CPU forward then calls its forward(q, k, v, layer_id) with arrays, not tensors
        self.numpy_plan: cpu_attention.NumpyPlan | None = None

    def prepare(self, batch: ForwardBatch) -> None:
        self.batch = batch

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        """q ``[T, H, D]``, k/v ``[T, Hkv, D]`` for this step's tokens -> ``[T, H, D]``."""

    def rotary_forward(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, layer_id: int
    ) -> torch.Tensor | None:
        """``forward`` after the model's rotary, where the backend does both in fewer kernels:
        ``qkv [T, (H + 2 Hkv) * D]`` unrotated (no per-head norm), ``cos`` / ``sin`` from
        ``Rotary.tables``; returns ``[T, H, D]`` as ``forward`` does, or None where it does not
        apply (the model then runs its rotary and ``forward``). This base: never."""
        return None


@dataclass(slots=True)
class _DecodePlan:
    """One query row per request: keys ``idx [B, L]`` (``valid`` marks real ones) after an optional
    prefix ``prefix_idx`` shared by all; ``q_rows`` are the queries' rows in the step (None: all)."""

    q_rows: torch.Tensor | None
    idx: torch.Tensor
    valid: torch.Tensor
    prefix_idx: torch.Tensor | None


@dataclass(slots=True)
class _ExtendPlan:
    """Padded extend: query rows ``q_rows [B, Tq]`` (``q_valid``), keys ``k_idx [B, S]`` after an
    optional shared prefix, ``masked [B, 1, 1, Tq, S]`` True where a query must not see a key.
    ``whole``: the plan covers every row of the step, unpadded and in order."""

    q_rows: torch.Tensor
    q_valid: torch.Tensor
    k_idx: torch.Tensor
    masked: torch.Tensor
    allowed: torch.Tensor  # [B, 1, Tq, S]: ~masked, in the layout scaled_dot_product_attention takes
    prefix_idx: torch.Tensor | None
    whole: bool
    # 0 / -inf of ``masked`` for the fused split path: [B, 1, 1, Tq, S], then (from the first
    # layer on) [B, 1, G * Tq, S] with a row per query head of a KV head
    bias: torch.Tensor | None = None


class TorchAttentionBackend(AttentionBackend):
    """Reference backend: gather from the pool and run masked attention in fp32. CPU default.

    Requests are grouped by how many new tokens they have, each group batched (one padded gather
    and two matmuls per layer, no Python loop over requests):

    * one new token (decode steps, and decode rows that share an extend step with short extends):
      a batched form of ``reference.decode_attention``;
    * 2..``max_padded_extend`` new tokens (forced tokens of jump-forward, short chain text): padded
      to the longest of them, with a bottom-right causal mask; one request alone is not padded;
    * longer extends (prompt prefills): one fused attention per request, where the matmuls are big
      enough that a loop costs nothing.

    A CPU step of at most ``numpy_max_requests`` requests (the sequential and speculative cases),
    none a long prompt, skips all of this: ``prepare`` builds a ``cpu_attention.NumpyPlan`` and each
    request attends on numpy views of the fp32 pool (about 2-3x faster there: the torch path's ten
    ops per layer cost more than the arithmetic); the CPU forward calls that plan with arrays.

    Within the first two groups, when every request starts with the same KV slots (a shared
    radix-cache prefix of at least ``min_shared_prefix`` cached tokens, and prefix length x
    requests at least ``min_shared_keys``: about the key reads saved) the prefix is gathered and
    attended once for all queries, the per-request suffixes separately, and the two merged by
    log-sum-exp (the cascade idea). On the CPU the prefix (and an extend's suffixes) go through
    torch's flash kernel, which returns each row's log-sum-exp for the merge. The split costs about
    ten more ops per layer than one fused kernel over whole rows; measured on the benchmark model's
    attention shape (8 heads, 4 KV heads, head dim 32, 2-core EPYC, 4 layers), it pays from about
    6,000 saved key reads (batch 20 x 256-token prefix, batch 64 x 100) and costs up to 2x below. Without such a prefix the two groups run
    ``F.scaled_dot_product_attention`` (GQA, boolean mask) on keys gathered in the pool's layout:
    one fused kernel per layer, about 4x faster on the CPU than matmuls over permuted copies. Every
    path computes the attention ``reference`` defines.

    On the CPU, gathers write into workspaces reused from layer to layer and step to step (a fresh
    multi-MB tensor per gather is fresh pages to fault in: at batch 120 that doubled the step), and
    decode rows go through in chunks of ``cpu_decode_chunk`` (a chunk's gathered keys are still in
    cache when the attention reads them); new K/V are stored with ``index_copy_``. Other devices
    keep fresh tensors (their caching allocator makes them cheap), one chunk and
    ``reference.store_kv``.

    """

    min_shared_prefix = 32
    min_shared_keys = 6144  # prefix length x requests (about the key reads saved) below which the split does not pay
    max_padded_extend = 64  # extends longer than this (prompt prefills) keep the per-request loop
    max_workspace_bytes = 64 << 20  # a CPU workspace larger than this is not kept between gathers
    cpu_decode_chunk = 64  # CPU decode rows per gather + attention: 5-8% off a step at batch 120
    # CPU steps of up to this many requests, none with more than max_padded_extend new tokens,
    # attend in numpy (cpu_attention; 0 turns it off): fp32 pools only
    numpy_max_requests = cpu_attention.MAX_REQUESTS

    def __init__(self, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], sm_scale: float):
        super().__init__(k_buffers, v_buffers, sm_scale)
        self._cpu = k_buffers[0].device.type == "cpu"
        # split (shared-prefix) paths through torch's CPU flash kernel, which returns log-sum-exp
        self._flash = self._cpu and _FLASH_CPU is not None
        self._workspace: dict[str, torch.Tensor] = {}
        self._np_bufs: tuple[tuple[int, ...], list, list] | None = None  # numpy views of the pool

    def prepare(self, batch: ForwardBatch) -> None:
        super().prepare(batch)
        self._dec: _DecodePlan | None = None
        self._ext: _ExtendPlan | None = None
        self._long: list[int] = []
        self.numpy_plan = None
        qo, kv = batch.qo_indptr, batch.kv_indptr
        if self._cpu and batch.batch_size <= self.numpy_max_requests:
            qo_h = qo.tolist()
            bufs = self._numpy_buffers()
            if bufs is not None and all(
                qo_h[i + 1] - qo_h[i] <= self.max_padded_extend for i in range(len(qo_h) - 1)
            ):
                self.numpy_plan = cpu_attention.NumpyPlan(
                    *bufs,
                    self.sm_scale,
                    qo_h,
                    kv.tolist(),
                    batch.kv_indices.numpy(),
                    batch.out_cache_loc.numpy(),
                )
                return
        kv_lens = kv[1:] - kv[:-1]
        if batch.mode is ForwardMode.DECODE:
            self._dec = self._plan_decode(kv[:-1], kv_lens, batch.kv_indices, None)
            return
        qo_h = qo.tolist()
        q_lens = [qo_h[i + 1] - qo_h[i] for i in range(len(qo_h) - 1)]
        one = [b for b, n in enumerate(q_lens) if n == 1]
        short = [b for b, n in enumerate(q_lens) if 1 < n <= self.max_padded_extend]
        self._long = [b for b, n in enumerate(q_lens) if n > self.max_padded_extend]
        everyone = len(q_lens)
        if one:
            if len(one) == everyone:
                self._dec = self._plan_decode(kv[:-1], kv_lens, batch.kv_indices, None)
            else:
                sel = torch.tensor(one, device=qo.device)
                self._dec = self._plan_decode(kv[:-1][sel], kv_lens[sel], batch.kv_indices, qo[:-1][sel])
        if short:
            self._ext = self._plan_extend(batch, short, [q_lens[b] for b in short], len(short) == everyone)

    def _numpy_buffers(self) -> tuple[list, list] | None:
        """Numpy views of the pool's buffers (None where they are not fp32), made again when the
        buffers are replaced."""
        key = tuple(map(id, self.k_buffers)) + tuple(map(id, self.v_buffers))
        if self._np_bufs is None or self._np_bufs[0] != key:
            k, v = cpu_attention.numpy_buffers(self.k_buffers), cpu_attention.numpy_buffers(self.v_buffers)
            self._np_bufs = (key, k, v) if k is not None and v is not None else (key, [], [])
        _, k, v = self._np_bufs
        return (k, v) if k else None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        b = self.batch
        assert b is not None, "prepare(batch) must be called before forward"
        if self.numpy_plan is not None:
            return torch.from_numpy(self.numpy_plan.forward(q.numpy(), k.numpy(), v.numpy(), layer_id))
        kb, vb = self.k_buffers[layer_id], self.v_buffers[layer_id]
        if self._cpu and k.dtype == kb.dtype:  # one copy kernel each, without index_put's checks
            kb.index_copy_(0, b.out_cache_loc, k)
            vb.index_copy_(0, b.out_cache_loc, v)
        else:
            ref.store_kv(kb, vb, b.out_cache_loc, k, v)
        dec, ext = self._dec, self._ext
        if dec is not None and dec.q_rows is None:
            return self._decode(q, kb, vb, dec)  # one new token for every request, in order
        if ext is not None and ext.whole:
            return self._extend(q, kb, vb, ext).reshape(q.shape).to(q.dtype)
        result = torch.empty_like(q)
        if dec is not None:
            result[dec.q_rows] = self._decode(q[dec.q_rows], kb, vb, dec)
        if ext is not None:
            out = self._extend(q, kb, vb, ext)
            result[ext.q_rows[ext.q_valid]] = out[ext.q_valid].to(q.dtype)
        for r in self._long:
            lo, hi = int(b.qo_indptr[r]), int(b.qo_indptr[r + 1])
            idx = b.kv_indices[int(b.kv_indptr[r]) : int(b.kv_indptr[r + 1])]
            result[lo:hi] = self._attend_long(q[lo:hi], kb, vb, idx).to(q.dtype)
        return result

    def _attend_long(
        self, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        """One long extend (a prompt): ``q [T, H, D]`` over keys ``idx``, whose last T are its own
        tokens (causal); ``reference._attend``'s result through one fused kernel."""
        t, s = q.shape[0], idx.numel()
        keys = self._gather("k", kb, idx).float().transpose(0, 1).unsqueeze(0)  # [1, Hkv, S, D]
        vals = self._gather("v", vb, idx).float().transpose(0, 1).unsqueeze(0)
        mask = None
        if s != t:  # bottom-right causal: query i sits at key position s - t + i
            mask = torch.arange(s, device=q.device) <= torch.arange(s - t, s, device=q.device).unsqueeze(1)
        out = F.scaled_dot_product_attention(
            q.float().transpose(0, 1).unsqueeze(0),
            keys,
            vals,
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.sm_scale,
            enable_gqa=True,
        )  # [1, H, T, D]
        return out[0].transpose(0, 1)

    def _prefix_flash(
        self, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, prefix_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every query of ``q [B, Hkv, G, T, D]`` against the shared prefix in one fused call (no
        ``[Hkv, G, B*T, P]`` score tensor written and read back): the normalized output ``[B, Hkv,
        G, T, D]`` and each row's log-sum-exp ``[B, Hkv, G, T, 1]``."""
        bsz, hkv, g, t, d = q.shape
        kp = self._gather("pk", kb, prefix_idx).float().transpose(0, 1).unsqueeze(0)  # [1, Hkv, P, D]
        vp = self._gather("pv", vb, prefix_idx).float().transpose(0, 1).unsqueeze(0)
        qq = q.permute(1, 2, 0, 3, 4).reshape(1, hkv, g * bsz * t, d)
        op, lse = _FLASH_CPU(qq, kp, vp, 0.0, False, scale=self.sm_scale)
        op = op.view(hkv, g, bsz, t, d).permute(2, 0, 1, 3, 4)
        return op, lse.view(hkv, g, bsz, t, 1).permute(2, 0, 1, 3, 4)

    def _merge_prefix(
        self,
        q: torch.Tensor,
        kb: torch.Tensor,
        vb: torch.Tensor,
        prefix_idx: torch.Tensor,
        num: torch.Tensor,
        den: torch.Tensor,
        m: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend every query of ``q [B, Hkv, G, T, D]`` to one shared prefix (gathered once, one
        matmul per KV head) and merge with the per-request partials (``num``, ``den``, running max
        ``m``, all ``[B, Hkv, G, T, .]``) by log-sum-exp."""
        bsz, hkv, g, t, d = q.shape
        if self._flash:
            op, lsep = self._prefix_flash(q, kb, vb, prefix_idx)
            top = torch.maximum(m, lsep)
            a, c = torch.exp(m - top), torch.exp(lsep - top)
            return num * a + op * c, den * a + c
        kp = self._gather("pk", kb, prefix_idx).float().permute(1, 2, 0).unsqueeze(1)  # [Hkv, 1, D, P]
        vp = self._gather("pv", vb, prefix_idx).float().permute(1, 0, 2).unsqueeze(1)  # [Hkv, 1, P, D]
        qq = q.permute(1, 2, 0, 3, 4).reshape(hkv, g, bsz * t, d)
        # in place on the one score tensor ([Hkv, G, B*T, P]: the big one of a few-shot batch)
        sp = torch.matmul(qq * self.sm_scale, kp)
        mp = sp.amax(-1, keepdim=True)
        ep = sp.sub_(mp).exp_()
        nump = torch.matmul(ep, vp).view(hkv, g, bsz, t, d).permute(2, 0, 1, 3, 4)
        denp = ep.sum(-1, keepdim=True).view(hkv, g, bsz, t, 1).permute(2, 0, 1, 3, 4)
        mp = mp.view(hkv, g, bsz, t, 1).permute(2, 0, 1, 3, 4)
        top = torch.maximum(m, mp)
        a, c = torch.exp(m - top), torch.exp(mp - top)
        return num * a + nump * c, den * a + denp * c

    # ---- planning (once per step) ----------------------------------------------------------
    def _plan_decode(
        self, starts: torch.Tensor, lens: torch.Tensor, kv_indices: torch.Tensor, q_rows: torch.Tensor | None
    ) -> _DecodePlan:
        """One query per request; request b's keys are ``kv_indices[starts[b]:starts[b] + lens[b]]``."""
        width = int(lens.max())
        cols = torch.arange(width, device=lens.device)
        valid = cols.unsqueeze(0) < lens.unsqueeze(1)  # [B, L]
        pos = (starts.unsqueeze(1) + cols.unsqueeze(0)).clamp_max(kv_indices.numel() - 1)
        idx = kv_indices[pos].masked_fill(~valid, 0)
        shared, prefix_idx = 0, None
        if idx.shape[0] > 1:
            same = ((idx == idx[:1]) & valid).all(0)
            shared = min(int(same.int().cumprod(0).sum()), int(lens.min()) - 1)
        if shared >= self.min_shared_prefix and shared * idx.shape[0] >= self.min_shared_keys:
            prefix_idx = idx[0, :shared]
            idx, valid = idx[:, shared:], valid[:, shared:]
        return _DecodePlan(q_rows, idx, valid, prefix_idx)

    def _plan_extend(
        self, batch: ForwardBatch, reqs: list[int], q_len_list: list[int], whole: bool
    ) -> _ExtendPlan:
        """Padded extend for ``reqs`` (each with 2..max_padded_extend new tokens)."""
        dev = batch.qo_indptr.device
        sel = torch.tensor(reqs, device=dev)
        qo_s, kv_s = batch.qo_indptr[:-1][sel], batch.kv_indptr[:-1][sel]
        q_lens = torch.tensor(q_len_list, device=dev)
        kv_lens = batch.kv_indptr[1:][sel] - kv_s
        t_max = max(q_len_list)
        shared = 0
        limit = int((kv_lens - q_lens).min())  # only cached prefix tokens: no causal mask needed there
        if len(reqs) > 1 and limit >= self.min_shared_prefix:
            cols = torch.arange(limit, device=dev)
            rows = batch.kv_indices[kv_s.unsqueeze(1) + cols.unsqueeze(0)]  # [B, limit]
            same = (rows == rows[:1]).all(0)
            shared = int(same.int().cumprod(0).sum())
            if shared < self.min_shared_prefix or shared * len(reqs) < self.min_shared_keys:
                shared = 0
        prefix_idx = batch.kv_indices[int(kv_s[0]) : int(kv_s[0]) + shared] if shared else None
        s_lens = kv_lens - shared
        s_max = int(s_lens.max())
        cols_q = torch.arange(t_max, device=dev)
        cols_k = torch.arange(s_max, device=dev)
        q_valid = cols_q.unsqueeze(0) < q_lens.unsqueeze(1)  # [B, Tq]
        k_valid = cols_k.unsqueeze(0) < s_lens.unsqueeze(1)  # [B, S]
        q_rows = (qo_s.unsqueeze(1) + cols_q.unsqueeze(0)).masked_fill(~q_valid, 0)
        k_pos = (kv_s.unsqueeze(1) + shared + cols_k.unsqueeze(0)).clamp_max(batch.kv_indices.numel() - 1)
        k_idx = batch.kv_indices[k_pos].masked_fill(~k_valid, 0)
        q_pos = (s_lens - q_lens).unsqueeze(1) + cols_q.unsqueeze(0)  # each query's position in its suffix
        mask = k_valid.unsqueeze(1) & (cols_k.view(1, 1, -1) <= q_pos.unsqueeze(2))  # [B, Tq, S]
        # the whole step, unpadded and in order: the output is the step's output as it is
        whole = whole and min(q_len_list) == t_max
        bias = _additive(mask[:, None, None]) if prefix_idx is not None and self._flash else None
        return _ExtendPlan(q_rows, q_valid, k_idx, ~mask[:, None, None], mask[:, None], prefix_idx, whole, bias)

    # ---- attention (per layer) -------------------------------------------------------------
    def _extend(self, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, plan: _ExtendPlan) -> torch.Tensor:
        """Padded output ``[B, Tq, H, D]`` in fp32 (padded query rows hold garbage)."""
        h, d = q.shape[1], q.shape[2]
        hkv = kb.shape[1]
        g = h // hkv
        bsz, t_max = plan.q_rows.shape
        qf = q.float()
        qp = qf.view(bsz, t_max, hkv, g, d) if plan.whole else qf[plan.q_rows].view(bsz, t_max, hkv, g, d)
        keys = self._gather("k", kb, plan.k_idx).float()  # [B, S, Hkv, D]
        vals = self._gather("v", vb, plan.k_idx).float()
        if plan.prefix_idx is None:
            # one fused kernel (no score tensors, keys read in the pool's layout), GQA by head groups
            out = F.scaled_dot_product_attention(
                qp.view(bsz, t_max, h, d).transpose(1, 2),
                keys.transpose(1, 2),  # [B, Hkv, S, D], strided
                vals.transpose(1, 2),
                attn_mask=plan.allowed,
                scale=self.sm_scale,
                enable_gqa=True,
            )  # [B, H, Tq, D]
            return out.transpose(1, 2)
        qp = qp.permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Tq, D]
        if self._flash:
            # the suffixes in one fused kernel that also gives each row's log-sum-exp: a normalized
            # output is the merge's partial with denominator 1 and running max lse
            assert plan.bias is not None
            if plan.bias.dim() == 5:  # first layer: a row per query head of a KV head, kept for the rest
                plan.bias = plan.bias.expand(bsz, 1, g, t_max, -1).reshape(bsz, 1, g * t_max, -1)
            o, lse = _FLASH_CPU(
                qp.reshape(bsz, hkv, g * t_max, d),
                keys.transpose(1, 2),
                vals.transpose(1, 2),
                0.0,
                False,
                attn_mask=plan.bias,
                scale=self.sm_scale,
            )
            num, m = o.view(bsz, hkv, g, t_max, d), lse.view(bsz, hkv, g, t_max, 1)
            den = torch.ones_like(m)
        else:
            # the G query heads of a KV head as more query rows: keys are not broadcast (copied) G times
            s = torch.matmul(qp.reshape(bsz, hkv, g * t_max, d) * self.sm_scale, keys.permute(0, 2, 3, 1))
            s = s.view(bsz, hkv, g, t_max, -1).masked_fill_(plan.masked, float("-inf"))  # [B, Hkv, G, Tq, S]
            m = s.amax(-1, keepdim=True).clamp_min(-1e30)  # padded query rows see no key
            e = s.sub_(m).exp_()
            num = torch.matmul(e.view(bsz, hkv, g * t_max, -1), vals.permute(0, 2, 1, 3)).view(bsz, hkv, g, t_max, d)
            den = e.sum(-1, keepdim=True)
        num, den = self._merge_prefix(qp, kb, vb, plan.prefix_idx, num, den, m)
        return (num / den).permute(0, 3, 1, 2, 4).reshape(bsz, t_max, h, d)

    def _decode_rows(
        self,
        q: torch.Tensor,
        kb: torch.Tensor,
        vb: torch.Tensor,
        idx: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One fused attention for decode rows ``q [B, H, D]`` over keys ``idx [B, L]``, ``mask``
        ``[B, 1, 1, L]`` True for real keys (None: every key is real)."""
        bsz, h, d = q.shape
        keys = self._gather("k", kb, idx).float().transpose(1, 2)  # [B, Hkv, L, D], strided
        vals = self._gather("v", vb, idx).float().transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.float().unsqueeze(2),
            keys,
            vals,
            attn_mask=mask,
            scale=self.sm_scale,
            enable_gqa=True,
        )  # [B, H, 1, D]
        return out.view(bsz, h, d).to(q.dtype)

    def _decode(self, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, plan: _DecodePlan) -> torch.Tensor:
        bsz, h, d = q.shape
        hkv = kb.shape[1]
        g = h // hkv
        if plan.prefix_idx is None:
            # a lone request has no padding (on the CPU, skip the mask's conversion at every layer)
            mask = None if self._cpu and bsz == 1 else plan.valid[:, None, None, :]
            n = self.cpu_decode_chunk if self._cpu else bsz
            if bsz <= n:
                return self._decode_rows(q, kb, vb, plan.idx, mask)
            assert mask is not None
            parts = [
                self._decode_rows(q[i : i + n], kb, vb, plan.idx[i : i + n], mask[i : i + n])
                for i in range(0, bsz, n)
            ]
            return torch.cat(parts)
        qg = q.float().view(bsz, hkv, g, d)  # query heads grouped by their KV head
        # per-request part: [B, Hkv, G, L]
        keys = self._gather("k", kb, plan.idx).float().permute(0, 2, 3, 1)  # [B, Hkv, D, L]
        vals = self._gather("v", vb, plan.idx).float().permute(0, 2, 1, 3)  # [B, Hkv, L, D]
        s = torch.matmul(qg * self.sm_scale, keys)
        s.masked_fill_(~plan.valid[:, None, None, :], float("-inf"))
        m = s.amax(-1, keepdim=True)
        e = s.sub_(m).exp_()
        num, den = torch.matmul(e, vals), e.sum(-1, keepdim=True)
        if plan.prefix_idx is not None:
            # shared prefix: all B*G query rows of a KV head against one gathered prefix
            num, den = self._merge_prefix(
                qg.unsqueeze(3), kb, vb, plan.prefix_idx, num.unsqueeze(3), den.unsqueeze(3), m.unsqueeze(3)
            )
            num, den = num.squeeze(3), den.squeeze(3)
        return (num / den).reshape(bsz, h, d).to(q.dtype)

    def _gather(self, name: str, buf: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``buf[idx]`` for a pool buffer ``[slots, Hkv, D]``: ``index_select`` over rows of one slot
        each, about 3x faster on the CPU than advanced indexing for the same copy. On the CPU the
        rows land in the workspace ``name``, valid until the next gather into it."""
        flat, rows = buf.flatten(1), idx.reshape(-1)
        out = None
        if self._cpu:
            need = rows.numel() * flat.shape[1]
            ws = self._workspace.get(name)
            if ws is None or ws.numel() < need or ws.dtype != buf.dtype:
                ws = torch.empty(need + need // 4, dtype=buf.dtype)  # headroom: lists grow by a token a step
                if ws.numel() * ws.element_size() <= self.max_workspace_bytes:
                    self._workspace[name] = ws
            out = ws[:need].view(rows.numel(), flat.shape[1])
        return torch.index_select(flat, 0, rows, out=out).view(*idx.shape, *buf.shape[1:])
