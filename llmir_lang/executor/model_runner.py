"""Turns a ScheduledBatch into a ForwardBatch, runs the model, and says which logits row is whose.

Extend steps build their inputs from the requests' slot lists (``batch_builder``). Decode steps, the hot path, go
through ``cuda_graph``: a device slot table (one new slot uploaded per request and step), static
input buffers, and on CUDA with the Triton backend a captured graph per batch bucket. When every
request of a decode batch shares a long cached prefix (one radix-tree node) and the kernels' cost
rule says it pays, the step uses the backend's shared-prefix decode, graphed per prefix length.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmir_lang.executor.attention import AttentionBackend, ForwardBatch, ForwardMode
from llmir_lang.executor.batch_builder import build_extend_batch
from llmir_lang.executor.cuda_graph import (
    META_IDS,
    META_LOC,
    META_POS,
    DecodeBuffers,
    GraphCache,
    SlotTable,
    batch_buckets,
    bucket_for,
    build_decode_lists_torch,
    build_decode_lists_triton,
    int64_tensor,
)
from llmir_lang.executor.model import CausalLM
from llmir_lang.executor.radix_cache import common_cached_prefix
from llmir_lang.executor.scheduler import ScheduledBatch
from llmir_lang.kernels import policy

log = logging.getLogger("llmir_lang.engine")

# With compiled elementwise ops on CUDA, extends of at most this many elements of hidden state
# (tokens x hidden size: 2,048 tokens of a 2,048-wide model) keep the plain ops (``CausalLM.
# plain_extend_tokens``): on an H100 host a 1,088-token extend of the 1B model is bound by host
# time, where the plain ops cost 48-140 us a call against the compiled ones' 81-216 us; at 4,032
# tokens the GPU is the limit and the compiled (fused) ops are faster (probe_host_calls.py).
PLAIN_EXTEND_ELEMENTS = 2048 * 2048


@dataclass(slots=True)
class StepLogits:
    logits: torch.Tensor  # [rows, vocab] fp32
    sample_rows: list[int]  # per request in the batch: its sampling row, or -1
    prompt_rows: list[
        tuple[int, int, int]
    ]  # per request: (first row, first position, count) of prompt logprobs


class _PrefixOffer(AttentionBackend):
    """The backend the model sees: prepares the real one, then offers this step's shared prefix.

    ``CausalLM.forward`` calls ``prepare`` itself, so this is where ``use_shared_prefix`` can be
    called between the two without touching the model.
    """

    def __init__(self, inner: AttentionBackend):
        super().__init__(inner.k_buffers, inner.v_buffers, inner.sm_scale)
        self.inner = inner
        self.shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def prepare(self, batch: ForwardBatch) -> None:
        self.batch = batch
        self.inner.prepare(batch)
        self.numpy_plan = self.inner.numpy_plan  # the CPU forward calls it with arrays directly
        if self.shared is not None:
            self.inner.use_shared_prefix(*self.shared, force=True)  # type: ignore[attr-defined]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        return self.inner.forward(q, k, v, layer_id)

    def rotary_forward(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, layer_id: int
    ) -> torch.Tensor | None:
        return self.inner.rotary_forward(qkv, cos, sin, num_heads, layer_id)


class ModelRunner:
    """Runs scheduled batches through the model.

    ``cuda_graphs``: replay decode steps as CUDA graphs (only on CUDA with the Triton backend over a
    fp16/bf16 pool; elsewhere it is ignored). ``shared_prefix``: let decode steps use the backend's
    shared-prefix path when the cost rule says so. Both may be flipped between steps.
    ``compile_model``: see ``set_compile``; None turns it on exactly when decode steps are graphed
    (CUDA, Triton backend, fp16/bf16 pool), where it pays.
    """

    def __init__(
        self,
        model: CausalLM,
        backend: AttentionBackend,
        device: torch.device,
        *,
        cuda_graphs: bool = True,
        shared_prefix: bool = True,
        compile_model: bool | None = None,
        max_batch_size: int | None = None,
    ):
        self.model, self.backend, self.device = model, backend, device
        kb = backend.k_buffers[0]
        self.pad_slot = int(kb.shape[0]) - 1  # KVPool: capacity + 1 rows, the last is the pad slot
        self.kv_bytes_per_token = 2 * int(kb.shape[1]) * int(kb.shape[2]) * kb.element_size()
        self.buckets = batch_buckets(max_batch_size or getattr(backend, "max_batch_size", 256))
        max_width = min(model.config.context_len, self.pad_slot) + 1
        self.table = SlotTable(device, max_width)
        self.buffers = DecodeBuffers(device, self.buckets[-1])
        self.graphs = GraphCache(device) if device.type == "cuda" else None
        self._graphs_ok = self._graphs_supported()
        self.cuda_graphs = cuda_graphs
        self.shared_prefix = shared_prefix
        self.pad_to_bucket = False  # pad eager decode steps too (tests of the padding on the CPU)
        # build the decode lists on the device in one kernel (inside the graph) rather than with
        # ~15 torch ops before each replay; checked against the torch ops on first use
        self.use_triton_lists = self._graphs_ok
        self._lists_checked = False
        self._table_generation = self.table.generation
        self._offer = _PrefixOffer(backend)
        self._can_share = hasattr(backend, "use_shared_prefix")
        self._prefix_key: tuple[int, ...] = ()
        self._prefix_lists: list[list[int]] = []
        self._prefix_len = 0
        self._prefix_version = 0  # bumped whenever the batch's shared prefix is recomputed
        self._prefix_copied: tuple[int, int, int] = (-1, 0, 0)  # what prefix_indices holds
        self.num_forward_calls = 0
        self.num_tokens_computed = 0
        self.num_graph_replays = 0
        self.num_shared_prefix_steps = 0
        self.num_row_extends = 0  # extend steps run as decode rows (_extend_as_rows)
        # extends of at most this many tokens per request run as decode rows (0: never); on CUDA
        # that puts jump-forward and speculative steps into the decode graphs
        self.max_row_extend = 8 if device.type == "cuda" else 0
        self.last_host_s = 0.0  # host time the last decode step spent before launching the model
        self.triton_linear = False
        self.set_triton_linear(self._graphs_ok)
        self.compiled = False
        if compile_model or (compile_model is None and self._graphs_ok):
            self.set_compile(True)

    # ---- entry point ----------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, sb: ScheduledBatch, ahead_ids: torch.Tensor | None = None) -> StepLogits:
        """``ahead_ids``: a decode step's input ids on the device (the step before it has sampled
        them but the host has not read them: ``run_ahead``); otherwise they come from the requests."""
        if sb.mode is ForwardMode.DECODE:
            logits = self._decode(sb.reqs, [p + 1 for p in sb.prefix_lens], ahead_ids)
            n = len(sb.reqs)
            self.num_forward_calls += 1
            self.num_tokens_computed += n
            return StepLogits(logits, list(range(n)), [(0, -1, 0)] * n)
        # extend steps change slot lists in place; a mixed step's decode rows only append, which
        # the table notices by itself
        for req in sb.reqs[: len(sb.reqs) - sb.num_decode]:
            self.table.forget(req)
        if self._as_rows(sb):
            return self._extend_as_rows(sb)
        fb, sample_rows, prompt_rows = build_extend_batch(sb, self.device)
        self._offer.shared = None
        logits = self.model(fb, self.backend)
        self.num_forward_calls += 1
        self.num_tokens_computed += int(fb.input_ids.shape[0])
        return StepLogits(logits, sample_rows, prompt_rows)

    # ---- short extends as decode rows ----------------------------------------------------
    def _as_rows(self, sb: ScheduledBatch) -> bool:
        """Whether this extend step runs as a decode step with one row per new token: every
        request computes at most ``max_row_extend`` tokens (jump-forward's forced text, a
        speculative draft, mixed decode rows), reads no prompt logprobs, and the rows fit the
        largest graph bucket. Row ``i`` of a request attends to its KV up to its own token, which
        the step stores before attention reads it: the causal extend, computed by the decode path,
        which is graphed on CUDA where an eager extend pays its host overhead per op."""
        if not self.max_row_extend or max(sb.extend_lens) > self.max_row_extend:
            return False
        if sum(sb.extend_lens) > self.buckets[-1]:
            return False
        return all(r.logprob_start_len < 0 for r in sb.reqs)

    def _extend_as_rows(self, sb: ScheduledBatch) -> StepLogits:
        reqs: list[Any] = []
        kv_lens: list[int] = []
        sample_rows: list[int] = []
        drafts = sb.draft_lens or [0] * len(sb.reqs)
        for req, prefix, n, sample, d in zip(sb.reqs, sb.prefix_lens, sb.extend_lens, sb.sample, drafts):
            # a speculative request samples at its last token and after each draft token
            sample_rows.append(len(reqs) + n - 1 - d if sample else -1)
            reqs.extend([req] * n)
            kv_lens.extend(range(prefix + 1, prefix + n + 1))
        logits = self._decode(reqs, kv_lens)
        self.num_forward_calls += 1
        self.num_tokens_computed += len(reqs)
        self.num_row_extends += 1
        return StepLogits(logits, sample_rows, [(0, -1, 0)] * len(sb.reqs))

    # ---- decode ---------------------------------------------------------------------------
    def _decode(
        self, reqs: Sequence[Any], kv_lens: list[int], ahead_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B, vocab]`` of one decode step; request b's KV is ``kv_slots[:kv_lens[b]]``."""
        t0 = time.perf_counter()
        n = len(reqs)
        fits = n <= self.buckets[-1]
        graphed = self.cuda_graphs and self._graphs_ok and fits
        bsz = bucket_for(n, self.buckets) if fits and (graphed or self.pad_to_bucket) else n
        plen = self._shared_prefix_len(reqs, kv_lens) if self.shared_prefix and self._can_share else 0
        total = sum(kv_lens)
        suffix_total = total - plen * n if plen else 0
        buf = self.buffers
        if buf.ensure(bsz, total, suffix_total, plen) and self.graphs is not None:
            self.graphs.clear()  # the graphs read the old buffers
        rows = self.table.rows_for(reqs, kv_lens)
        pad = bsz - n
        ids, pos, loc = [], [], []
        for req, kv_len in zip(reqs, kv_lens):
            p = kv_len - 1
            np_ = len(req.prompt_ids)
            if ahead_ids is not None:
                ids.append(0)  # written on the device below
            elif p < np_:
                ids.append(req.prompt_ids[p])
            elif p - np_ < len(req.output_ids):
                ids.append(req.output_ids[p - np_])
            else:  # a speculative row: the draft follows the output
                ids.append(req.draft[p - np_ - len(req.output_ids)])
            pos.append(p)
            loc.append(req.kv_slots[p])
        zeros = [0] * pad
        host = ids + zeros + pos + zeros + loc + [self.pad_slot] * pad + rows + zeros + kv_lens + zeros
        host += [k - plen for k in kv_lens] if plen else kv_lens
        host += zeros
        buf.meta[:, :bsz].copy_(int64_tensor(host).view(6, bsz), non_blocking=True)
        if ahead_ids is not None:
            buf.meta[META_IDS, :n].copy_(ahead_ids, non_blocking=True)
        if self.table.generation != self._table_generation and self.graphs is not None:
            self.graphs.clear()  # the graphs read the old table
        self._table_generation = self.table.generation
        table = self.table.table
        in_kernel = self.use_triton_lists and self._lists_kernel_ok(
            bsz, n, rows[0], total, plen, suffix_total
        )
        if not in_kernel:
            build_decode_lists_torch(buf, table, n, bsz, rows[0], total, plen, suffix_total)
        self.table.mark_synced(reqs, kv_lens)
        if plen:
            # the prefix's slots change only with the batch's prefix (version) or its length
            sig = (self._prefix_version, plen, buf.prefix_indices.data_ptr())
            if sig != self._prefix_copied:
                buf.prefix_indices[:plen].copy_(table[rows[0], :plen])  # columns < kv_len - 1: synced
                self._prefix_copied = sig
            self._offer.shared = (
                buf.prefix_indices[:plen],
                buf.suffix_indptr[: bsz + 1],
                buf.suffix_indices[:suffix_total],
            )
            self.num_shared_prefix_steps += 1
        else:
            self._offer.shared = None

        def forward() -> torch.Tensor:  # not called when a captured graph is replayed
            if in_kernel:  # inside the graph: the lists are rebuilt on the device at each replay
                build_decode_lists_triton(buf, table, bsz, plen)
            fb = ForwardBatch(
                mode=ForwardMode.DECODE,
                input_ids=buf.meta[META_IDS, :bsz],
                positions=buf.meta[META_POS, :bsz],
                out_cache_loc=buf.meta[META_LOC, :bsz],
                qo_indptr=buf.qo_indptr[: bsz + 1],
                kv_indptr=buf.kv_indptr[: bsz + 1],
                kv_indices=buf.kv_indices[:total],
                batch_size=bsz,
            )
            return self.model(fb, self._offer)

        self.last_host_s = time.perf_counter() - t0
        if not graphed:
            return forward()[:n]
        assert self.graphs is not None
        try:
            out = self.graphs.run((bsz, plen, in_kernel), forward)
        except Exception as e:  # a capture that fails must not take decoding down with it
            warnings.warn(
                f"CUDA graph capture of a decode step failed ({type(e).__name__}: {e}); decoding "
                "eagerly from now on",
                RuntimeWarning,
                stacklevel=2,
            )
            self._graphs_ok = False
            self.graphs.clear()
            return forward()[:n]
        self.num_graph_replays += 1
        return out[:n]

    def _shared_prefix_len(self, reqs: Sequence[Any], kv_lens: list[int]) -> int:
        """Length of the cached KV prefix all ``reqs`` share, if the cost rule says to use it, else 0.

        Recomputed only when the batch's requests or their slot lists changed (decode steps only
        append to the lists, which leaves a shared prefix as it was).
        """
        n = len(reqs)
        if n < policy.MIN_SHARING_REQUESTS:
            return 0
        key = tuple(r.rid for r in reqs)
        lists = self._prefix_lists
        if key != self._prefix_key or any(a is not r.kv_slots for a, r in zip(lists, reqs)):
            self._prefix_key = key
            self._prefix_lists = [r.kv_slots for r in reqs]
            self._prefix_len = common_cached_prefix(reqs)
            self._prefix_version += 1
        plen = min(self._prefix_len, min(kv_lens) - 1)
        if plen <= 0 or not policy.should_use_shared_prefix(plen, n, self.kv_bytes_per_token):
            return 0
        return plen

    def _lists_kernel_ok(self, bsz: int, n: int, row0: int, total: int, plen: int, suffix_total: int) -> bool:
        """Whether to build the decode lists with the Triton kernel. The first time, build them both
        ways and compare (the table gets the same slot written twice); any difference or error
        turns the kernel off for good, with a warning, and the torch ops are used."""
        if self._lists_checked:
            return True
        buf, table = self.buffers, self.table.table
        build_decode_lists_torch(buf, table, n, bsz, row0, total, plen, suffix_total)
        want = [buf.kv_indptr[: bsz + 1].clone(), buf.kv_indices[:total].clone()]
        if plen:
            want += [buf.suffix_indptr[: bsz + 1].clone(), buf.suffix_indices[:suffix_total].clone()]
        for t in (buf.kv_indptr, buf.kv_indices, buf.suffix_indptr, buf.suffix_indices):
            t.fill_(-1)
        try:
            build_decode_lists_triton(buf, table, bsz, plen)
            got = [buf.kv_indptr[: bsz + 1], buf.kv_indices[:total]]
            if plen:
                got += [buf.suffix_indptr[: bsz + 1], buf.suffix_indices[:suffix_total]]
            same = all(torch.equal(a, b) for a, b in zip(got, want))
            why = "its lists differ from the torch ops'"
        except Exception as e:
            same, why = False, f"{type(e).__name__}: {e}"
        if not same:
            warnings.warn(
                f"the Triton decode-list kernel is off ({why}); building decode lists with torch ops",
                RuntimeWarning,
                stacklevel=3,
            )
            self.use_triton_lists = False
            build_decode_lists_torch(buf, table, n, bsz, row0, total, plen, suffix_total)
            return False
        self._lists_checked = True
        return True

    # ---- setup ----------------------------------------------------------------------------
    def set_triton_linear(self, on: bool) -> bool:
        """Run the model's projections through ``kernels.linear`` (on: a decode step's one-row
        projections, and its output layer at 9-128 rows, stream the weights with Triton kernels,
        faster than cuBLAS there) or ``F.linear`` (off). On by default where decode steps are
        graphed (CUDA, Triton backend, fp16/bf16); ignored elsewhere. Captured graphs are dropped.
        Returns whether it is on."""
        from llmir_lang import kernels

        on = bool(on) and self.device.type == "cuda"
        if on != self.triton_linear:
            self.model.linear = kernels.linear if on else F.linear
            self.triton_linear = on
            if self.graphs is not None:
                self.graphs.clear()
        return on

    def set_compile(self, on: bool) -> bool:
        """Fuse the model's elementwise work with ``torch.compile`` (on) or run it plainly (off).

        Swaps the model's ``FusedOps``: RMSNorm (with the residual add before it), the q/k split with
        rotary (and Qwen3's q/k norms), and SwiGLU's ``silu(gate) * up`` each become one generated
        kernel; projections and attention stay as they are. Turning it on compiles right away, for
        one token and for several (the two shapes a dynamic compile distinguishes), so no request
        waits on the compiler later; if compiling fails the model keeps its plain ops, with a
        warning. Returns whether compiled ops are in use. Captured graphs are dropped, since they
        hold the other variant's kernels.
        """
        from llmir_lang.executor.model import PLAIN_OPS, compiled_ops

        if on == self.compiled:
            return on
        if on:
            ops = compiled_ops()
            t0 = time.perf_counter()
            log.info("compiling the model's elementwise ops with torch.compile (once per process)")
            try:
                self._warm_up(ops)
            except Exception as e:  # no compiler, an unsupported device or dtype: run uncompiled
                warnings.warn(
                    f"torch.compile of the model's elementwise ops failed ({type(e).__name__}: {e}); "
                    "running them uncompiled",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return False
            self.model.ops = ops
            if self.device.type == "cuda":
                self.model.plain_extend_tokens = PLAIN_EXTEND_ELEMENTS // self.model.config.hidden_size
            log.info("compiled in %.1f s", time.perf_counter() - t0)
        else:
            self.model.ops = PLAIN_OPS
            self.model.plain_extend_tokens = 0
        self.compiled = on
        if self.graphs is not None:
            self.graphs.clear()
        return on

    @torch.inference_mode()
    def _warm_up(self, ops: Any) -> None:
        """Call every op of ``ops`` on inputs of this model's shapes, for 1 and for 3 tokens."""
        cfg, model = self.model.config, self.model
        w = model.model.norm.weight
        attn = model.model.layers[0].self_attn
        qn, kn = (attn.q_norm.weight, attn.k_norm.weight) if cfg.qk_norm else (None, None)
        width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        for t in (1, 3):
            x = torch.randn(t, cfg.hidden_size, dtype=w.dtype, device=w.device)
            ops.norm(x, w, cfg.rms_norm_eps)
            # two distinct tensors: dynamo compiles aliased arguments separately
            ops.add_norm(x, torch.randn_like(x), w, cfg.rms_norm_eps)
            cos, sin = model.rotary.tables(torch.arange(t, device=w.device), w.dtype)
            qkv = torch.randn(t, width, dtype=w.dtype, device=w.device)
            ops.rope(qkv, cos, sin, cfg.num_heads, cfg.num_kv_heads, qn, kn, cfg.rms_norm_eps)
            ops.act(torch.randn(t, 2 * cfg.intermediate_size, dtype=w.dtype, device=w.device))

    def _graphs_supported(self) -> bool:
        if self.device.type != "cuda":
            return False
        from llmir_lang.executor.triton_backend import TritonAttentionBackend
        from llmir_lang.kernels import support

        be = self.backend
        if not isinstance(be, TritonAttentionBackend) or self.buckets[-1] > be.max_batch_size:
            return False
        kb, vb = be.k_buffers[0], be.v_buffers[0]
        q = torch.empty(1, self.model.config.num_heads, kb.shape[-1], dtype=kb.dtype, device=kb.device)
        return support.attention_ok("ModelRunner (CUDA graphs)", q, kb, vb)
