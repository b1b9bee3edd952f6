"""The torch attention backend's attention of one layer: decode rows, padded extends, long
prompts, the shared prefix merged by log-sum-exp, gathers from the pool into reused workspaces.

``TorchAttentionBackend`` (``attention.py``) inherits this; its ``forward`` calls it for every layer
with the step's plans (``torch_attention_plan.py``). Needs of the backend: ``sm_scale``,
``cpu_decode_chunk``, ``max_workspace_bytes``, ``_cpu``, ``_flash`` and ``_workspace``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from llmir_lang.executor.torch_attention_plan import _DecodePlan, _ExtendPlan

# torch's CPU flash attention with its log-sum-exp (a private op; where it is missing the shared
# prefix is attended with two matmuls and an explicit softmax)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class TorchLayerAttention:
    sm_scale: float
    cpu_decode_chunk: int
    max_workspace_bytes: int
    _cpu: bool
    _flash: bool
    _workspace: dict[str, torch.Tensor]

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
