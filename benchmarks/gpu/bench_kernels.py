"""GPU benchmarks of the attention kernels (Llama-3-8B attention shape: 32 q heads, 8 KV heads, d 128, bf16).

    python benchmarks/gpu/bench_kernels.py --out DIR [--sections ceil,readceil,decode,prefill,shared,sweep,flex]

Writes ``DIR/kernels_<device>_<date>.json`` after every section and prints a table at the end.
- ceil: measured ceilings (device-to-device copy, bf16 matmul), next to the spec 3.35 TB/s.
- readceil: what a kernel that only streams the bytes a decode reads reaches at each decode point
  (batch x context): a Triton kernel summing the same K and V bytes (contiguous, so easier than the
  paged gather), the best of a sweep of grid sizes and tiles, timed like the decode kernels: the
  ceiling any decode kernel meets at that size (launch, ramp-up and tail included). ``gather_*``:
  the decode split kernel's grid, slices and paged loads with no math (its access pattern's limit);
  ``rows_*``: the same pages read as whole token rows (all KV heads) per program.
- decode: batch 1/16/64/256 x context 1k/4k/16k; achieved GB/s over the bytes a decode must read
  (K + V + slot indices), vs torch SDPA on already-gathered contiguous K/V (gather not timed).
  Both split merges are timed at every point, in alternating order over 3 trials: ``one_launch``
  (the last split program merges) and ``two_launch`` (a merge kernel after the split kernel);
  ``triton_*`` are the default config's choice (``merge``). Where splits == 1 both run the same direct kernel, so
  their difference there is the measurement's noise. ``split_only``: the split kernel alone,
  without any merge (not a decode; the floor both merges add to).
- prefill: one causal prompt of 1k-16k tokens (and one extend over a 4k prefix): TFLOP/s vs SDPA,
  with every key read through the slot list (``triton_*``) and with the new tokens' K/V passed
  directly as strided views of a fused qkv tensor (``triton_newkv_*``).
- shared: shared-prefix decode on vs off (plain decode over prefix + suffix) at batch 64/128 with
  4k/16k prefixes, plus points at the cost rule's boundary.
- sweep: decode / extend launch configurations at a few points (to choose the defaults).
- flex: FlexAttention (torch.compile) decode at a few points, if it compiles.
Times are medians of CUDA-graph replays (FlexAttention: triton.testing.do_bench). KV slots are
16-token pages at random positions of one pool; small cases rotate over several slot sets so that
repeated runs do not read from L2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from llmir_lang.kernels import triton_decode as td
from llmir_lang.kernels import triton_extend as te
from llmir_lang.kernels import triton_shared_prefix as tsp
from llmir_lang.kernels.policy import should_use_shared_prefix
from llmir_lang.kernels.testing import indptr, slot_layout

H, HKV, D, DT = 32, 8, 128, torch.bfloat16
SCALE = D**-0.5
SPEC_BW = 3.35e12  # H100 SXM HBM3 datasheet; the yardstick
TOKEN_BYTES = HKV * D * 2 * 2 + 8  # K and V rows of one token (bf16) plus its int64 slot index
DEV = torch.device("cuda")
GEN = torch.Generator().manual_seed(0)


def time_graph(fns: list[Callable[[], object]], iters: int = 20) -> float:
    """Median seconds per call of ``fns`` (run in sequence), timed over CUDA-graph replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(fns))
    del graph
    return statistics.median(times)


def rotations(nbytes: float) -> int:
    """Slot sets to rotate over so that one graph replay reads well past the L2 (50-60 MB)."""
    return max(1, min(8, math.ceil(400e6 / nbytes)))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def gather_contiguous(buf: torch.Tensor, idx: torch.Tensor, bsz: int, length: int) -> torch.Tensor:
    return buf[idx].view(bsz, length, HKV, D).transpose(1, 2).contiguous()  # [B, Hkv, L, D]


# --- sections --------------------------------------------------------------------------------
def bench_ceilings() -> dict:
    n = 1 << 28  # 1 GiB of float32
    a = torch.randn(n, device=DEV)
    b = torch.empty_like(a)
    t = time_graph([lambda: b.copy_(a)])
    x = torch.randn(8192, 8192, device=DEV, dtype=DT)
    y = torch.randn(8192, 8192, device=DEV, dtype=DT)
    tm = time_graph([lambda: x @ y], iters=10)
    return {"copy_GBps": 2 * 4 * n / t / 1e9, "bf16_matmul_TFLOPs": 2 * 8192**3 / tm / 1e12}


def _read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read2(A, B, Out, n, per_prog, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        lo = pid.to(tl.int64) * per_prog
        hi = tl.minimum(lo + per_prog, n)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < hi
            a = tl.load(A + offs, mask=m, other=0.0).to(tl.float32)
            b = tl.load(B + offs, mask=m, other=0.0).to(tl.float32)
            acc += a + b
        tl.store(Out + pid, tl.sum(acc, 0))

    @triton.jit
    def gather_read(
        K, V, KvIndptr, KvIndices, Out, min_chunk, stride_kn, stride_kh,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        # the decode split kernel's grid, slices and loads (same slot list, one KV head's rows per
        # program), without its math: what its access pattern alone allows
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        kv_start = tl.load(KvIndptr + b).to(tl.int64)
        kv_len = (tl.load(KvIndptr + b + 1) - kv_start).to(tl.int32)
        n_splits = tl.minimum(tl.maximum(tl.cdiv(kv_len, min_chunk), 1), tl.num_programs(2))
        per_split = tl.cdiv(tl.cdiv(kv_len, n_splits), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, kv_len)
        offs_d = tl.arange(0, HEAD_DIM)
        acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)  # reduced once at the end: no per-tile math
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < hi
            slot = tl.load(KvIndices + kv_start + offs_n, mask=n_mask, other=0).to(tl.int64)
            ptr = slot[:, None] * stride_kn + kvh * stride_kh + offs_d[None, :]
            k = tl.load(K + ptr, mask=n_mask[:, None], other=0.0)
            v = tl.load(V + ptr, mask=n_mask[:, None], other=0.0)
            acc += k.to(tl.float32) + v.to(tl.float32)
        tl.store(Out + (b * tl.num_programs(1) + kvh) * tl.num_programs(2) + split, tl.sum(tl.sum(acc, 1), 0))

    @triton.jit
    def gather_rows(
        K, V, KvIndptr, KvIndices, Out, stride_kn,
        BLOCK_N: tl.constexpr, ROW: tl.constexpr,
    ):  # fmt: skip
        # the same slot lists, but each program reads whole token rows (every KV head: ROW
        # contiguous elements) of 1/num_programs(1) of the request's tokens
        b = tl.program_id(0)
        part = tl.program_id(1)
        kv_start = tl.load(KvIndptr + b).to(tl.int64)
        kv_len = (tl.load(KvIndptr + b + 1) - kv_start).to(tl.int32)
        per = tl.cdiv(tl.cdiv(kv_len, tl.num_programs(1)), BLOCK_N) * BLOCK_N
        lo = part * per
        hi = tl.minimum(lo + per, kv_len)
        offs_r = tl.arange(0, ROW)
        acc = tl.zeros([BLOCK_N, ROW], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < hi
            slot = tl.load(KvIndices + kv_start + offs_n, mask=n_mask, other=0).to(tl.int64)
            ptr = slot[:, None] * stride_kn + offs_r[None, :]
            k = tl.load(K + ptr, mask=n_mask[:, None], other=0.0)
            v = tl.load(V + ptr, mask=n_mask[:, None], other=0.0)
            acc += k.to(tl.float32) + v.to(tl.float32)
        tl.store(Out + b * tl.num_programs(1) + part, tl.sum(tl.sum(acc, 1), 0))

    return read2, gather_read, gather_rows


def bench_read_ceilings(kb, vb) -> list[dict]:
    """At each decode point: the fastest pure read of its K and V bytes (see the module doc)."""
    read2, gather_read, gather_rows = _read_kernel()
    cfg = td.default_decode_config(D, DEV)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    kf, vf = kb.view(-1), vb.view(-1)
    out = torch.empty(64 * sms, device=DEV, dtype=torch.float32)
    rows = []
    for bsz in (1, 16, 64, 256):
        for ctx in (1024, 4096, 16384):
            n = bsz * ctx * HKV * D  # elements of K (and of V)
            kv_bytes = 2 * n * 2
            reps = rotations(kv_bytes)
            best: dict = {}
            for per_sm in (1, 2, 4, 8, 16, 32):
                for block, warps in ((1024, 4), (2048, 4), (4096, 8), (8192, 8)):
                    progs = per_sm * sms
                    per_prog = math.ceil(math.ceil(n / progs) / block) * block
                    progs = math.ceil(n / per_prog)
                    launch = read2[(progs,)]
                    calls = [
                        functools.partial(
                            launch, kf[r * n :], vf[r * n :], out, n, per_prog, BLOCK=block, num_warps=warps
                        )
                        for r in range(reps)
                    ]
                    t = time_graph(calls)
                    if not best or t < best["t"]:
                        best = {"t": t, "programs": progs, "block": block, "warps": warps}
            t = best.pop("t")
            # the decode kernel's access pattern: its grid and 16-token pages at random positions
            lengths = [ctx] * bsz
            ip = indptr(lengths, DEV)
            cap = td.split_cap(bsz, HKV, cfg, DEV)
            g_out = torch.empty(bsz * HKV * cap, device=DEV, dtype=torch.float32)
            gather = {}
            for stages in (2, 3, 4):
                launch = gather_read[(bsz, HKV, cap)]
                calls = [
                    functools.partial(
                        launch, kb, vb, ip, slot_layout(lengths, kb.shape[0], "paged", GEN, device=DEV), g_out,
                        cfg.min_chunk, kb.stride(0), kb.stride(1), BLOCK_N=cfg.block_n, HEAD_DIM=D,
                        num_warps=cfg.num_warps, num_stages=stages,
                    )  # fmt: skip
                    for _ in range(reps)
                ]
                gather[stages] = time_graph(calls)
            g_stages = min(gather, key=gather.__getitem__)
            t_g = gather[g_stages]
            rows_t = {}
            for block_n, stages in ((8, 3), (8, 4), (16, 2), (16, 3)):
                launch = gather_rows[(bsz, cap * HKV)]
                calls = [
                    functools.partial(
                        launch, kb, vb, ip, slot_layout(lengths, kb.shape[0], "paged", GEN, device=DEV), g_out,
                        kb.stride(0), BLOCK_N=block_n, ROW=HKV * D, num_warps=8, num_stages=stages,
                    )  # fmt: skip
                    for _ in range(reps)
                ]
                rows_t[(block_n, stages)] = time_graph(calls)
            r_cfg = min(rows_t, key=rows_t.__getitem__)
            t_r = rows_t[r_cfg]
            rows.append(
                {
                    "batch": bsz,
                    "ctx": ctx,
                    "kv_bytes": kv_bytes,
                    "read_us": t * 1e6,
                    "read_GBps": kv_bytes / t / 1e9,
                    "read_pct": 100 * kv_bytes / t / SPEC_BW,
                    **best,
                    "gather_us": t_g * 1e6,
                    "gather_pct": 100 * kv_bytes / t_g / SPEC_BW,
                    "gather_stages": g_stages,
                    "gather_splits": cap,
                    "rows_us": t_r * 1e6,
                    "rows_pct": 100 * kv_bytes / t_r / SPEC_BW,
                    "rows_block_n_stages": list(r_cfg),
                }
            )
            print("readceil", rows[-1], flush=True)
    return rows


def bench_decode_point(
    kb, vb, bsz: int, ctx: int, cfg: td.DecodeConfig, with_sdpa: bool = True, compare_merge: bool = False
) -> dict:
    """One decode shape. ``compare_merge``: time both split merges (3 trials, alternating order,
    median of each) on the same inputs; ``triton_*`` are then ``cfg``'s variant."""
    lengths = [ctx] * bsz
    nbytes = bsz * ctx * TOKEN_BYTES
    reps = rotations(nbytes)
    ip = indptr(lengths, DEV)
    q = torch.randn(bsz, H, D, device=DEV, dtype=DT)
    cap = td.split_cap(bsz, HKV, cfg, DEV)
    ws = td.alloc_partials(bsz, H, cap, D, DEV)
    out = torch.empty_like(q)
    sets = [slot_layout(lengths, kb.shape[0], "paged", GEN, device=DEV) for _ in range(reps)]

    def calls(c: td.DecodeConfig) -> list[Callable[[], object]]:
        return [
            (lambda idx=idx: td.decode_attention(q, kb, vb, ip, idx, SCALE, workspace=ws, out=out, config=c))
            for idx in sets
        ]

    def split_only(c: td.DecodeConfig) -> list[Callable[[], object]]:
        # The two-launch path's first kernel alone (no merge): not a decode, a floor for both.
        return [
            (lambda idx=idx: td.launch_decode_partial(q, kb, vb, ip, idx, cap, ws[0], ws[1], 0, SCALE, c))
            for idx in sets
        ]

    row: dict = {"batch": bsz, "ctx": ctx, "splits": cap}
    if compare_merge:
        variants = {
            "one_launch": dataclasses.replace(cfg, one_launch=True),
            "two_launch": dataclasses.replace(cfg, one_launch=False),
        }
        runs = {name: calls(c) for name, c in variants.items()}
        if cap > 1:
            runs["split_only"] = split_only(variants["two_launch"])
        trials: dict[str, list[float]] = {name: [] for name in runs}
        for trial in range(3):
            names = list(runs) if trial % 2 == 0 else list(runs)[::-1]
            for name in names:
                trials[name].append(time_graph(runs[name]))
        for name, ts in trials.items():
            t_v = statistics.median(ts)
            row[f"{name}_us"] = t_v * 1e6
            row[f"{name}_us_trials"] = [x * 1e6 for x in ts]
            row[f"{name}_GBps"] = nbytes / t_v / 1e9
            row[f"{name}_pct"] = 100 * nbytes / t_v / SPEC_BW
        default = "one_launch" if td.merge_in_split_kernel(cfg, cap) else "two_launch"
        row["merge"] = default if cap > 1 else "direct"  # one split: both run the direct kernel
        row["two_over_one"] = row["two_launch_us"] / row["one_launch_us"]
        t = row[f"{default}_us"] / 1e6
    else:
        t = time_graph(calls(cfg))
    row.update(triton_us=t * 1e6, triton_GBps=nbytes / t / 1e9)
    row["pct_of_3.35TBps"] = 100 * nbytes / t / SPEC_BW
    if with_sdpa:
        qs = q.view(bsz, H, 1, D)
        kvs = [(gather_contiguous(kb, i, bsz, ctx), gather_contiguous(vb, i, bsz, ctx)) for i in sets]
        del sets
        t_s = time_graph([(lambda k=k, v=v: sdpa(qs, k, v, False)) for k, v in kvs])
        kv_bytes = bsz * ctx * HKV * D * 2 * 2
        row.update(sdpa_us=t_s * 1e6, sdpa_GBps=kv_bytes / t_s / 1e9)
        del kvs
    torch.cuda.empty_cache()
    return row


def bench_decode(kb, vb) -> list[dict]:
    cfg = td.default_decode_config(D, DEV)
    rows = []
    for bsz in (1, 16, 64, 256):
        for ctx in (1024, 4096, 16384):
            rows.append(bench_decode_point(kb, vb, bsz, ctx, cfg, compare_merge=True))
            print("decode", rows[-1], flush=True)
    rows.append({"compiled_split_kernels": compiled_kernel_resources(td._decode_partial_kernel)})
    return rows


def compiled_kernel_resources(kernel) -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of a Triton kernel (the
    constexprs that tell them apart), from the JIT cache; empty where this Triton hides them."""
    out = []
    try:
        for cache in kernel.device_caches.values():
            for compiled in cache[0].values():
                meta = compiled.metadata
                consts = getattr(compiled.src, "constants", None) or {}
                names = {
                    (kernel.arg_names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k)): repr(v)
                    for k, v in consts.items()
                }
                out.append(
                    {
                        "constexprs": names,
                        "n_regs": compiled.n_regs,
                        "n_spills": compiled.n_spills,
                        "shared": meta.shared,
                        "num_warps": meta.num_warps,
                        "num_stages": meta.num_stages,
                    }
                )
    except Exception as exc:  # a reporting aid only: never fail the benchmark over it
        out.append({"error": repr(exc)[:200]})
    return out


def causal_pairs(q_len: int, prefix: int) -> int:
    return q_len * prefix + q_len * (q_len + 1) // 2


def new_kv_views(kb, vb, idx: torch.Tensor, q_len: int, prefix: int, nreq: int):
    """The new tokens' K/V (the last ``q_len`` slots of each request) as the model hands them to
    the backend: strided views into a fused ``[T, (H + 2 Hkv) * D]`` projection output."""
    per_req = torch.arange(q_len, device=DEV) + prefix
    new_slots = idx[(torch.arange(nreq, device=DEV) * (q_len + prefix)).unsqueeze(1) + per_req].reshape(-1)
    qkv = torch.empty(q_len * nreq, (H + 2 * HKV) * D, device=DEV, dtype=DT)
    k_new = qkv[:, H * D : (H + HKV) * D].view(-1, HKV, D)
    v_new = qkv[:, (H + HKV) * D :].view(-1, HKV, D)
    k_new.copy_(kb[new_slots])
    v_new.copy_(vb[new_slots])
    return k_new, v_new


def bench_extend_point(
    kb,
    vb,
    q_len: int,
    prefix: int,
    cfg: te.ExtendConfig,
    nreq: int = 1,
    with_sdpa=True,
    gathered: bool = True,
    new_kv: bool = True,
    new_cfg: te.ExtendConfig | None = None,
) -> dict:
    """One extend launch, timed through the slot list (``triton_*``, every key gathered) and with
    the new tokens' K/V passed directly (``triton_newkv_*``: ``cfg.new_kv_loads`` and the
    ``cfg.new_kv_*`` launch shape; or ``new_cfg``, planned on its own, as the backend does)."""
    qo_lens, kv_lens = [q_len] * nreq, [q_len + prefix] * nreq
    idx = slot_layout(kv_lens, kb.shape[0], "paged", GEN, device=DEV)
    qo_ip, kv_ip = indptr(qo_lens, DEV), indptr(kv_lens, DEV)
    q = torch.randn(q_len * nreq, H, D, device=DEV, dtype=DT)
    plan = te.plan_extend(qo_ip, kv_ip, cfg.block_m)
    out = torch.empty_like(q)
    flops = 4 * D * H * causal_pairs(q_len, prefix) * nreq
    row: dict = {"requests": nreq, "new_tokens": q_len, "prefix": prefix}
    if gathered:
        t = time_graph(
            [
                lambda: te.extend_attention(
                    q, kb, vb, qo_ip, kv_ip, idx, SCALE, plan=plan, out=out, config=cfg
                )
            ],
            iters=10,
        )
        row.update(triton_ms=t * 1e3, triton_TFLOPs=flops / t / 1e12)
    if new_kv:
        k_new, v_new = new_kv_views(kb, vb, idx, q_len, prefix, nreq)
        out_new = torch.empty_like(q)
        ncfg = new_cfg or cfg
        nplan = plan if ncfg.block_m == cfg.block_m else te.plan_extend(qo_ip, kv_ip, ncfg.block_m)

        def run_new() -> None:
            te.extend_attention(
                q,
                kb,
                vb,
                qo_ip,
                kv_ip,
                idx,
                SCALE,
                plan=nplan,
                out=out_new,
                config=ncfg,
                k_new=k_new,
                v_new=v_new,
            )

        t_n = time_graph([run_new], iters=10)
        row.update(triton_newkv_ms=t_n * 1e3, triton_newkv_TFLOPs=flops / t_n / 1e12)
        if gathered:  # same keys, same tiles up to the prefix/new split: a sanity check, not a test
            row["newkv_max_abs_diff"] = float((out_new.float() - out.float()).abs().max())
    if with_sdpa and prefix == 0 and nreq == 1:
        k = gather_contiguous(kb, idx, 1, q_len)
        v = gather_contiguous(vb, idx, 1, q_len)
        qs = q.view(1, q_len, H, D).transpose(1, 2).contiguous()
        t_s = time_graph([lambda: sdpa(qs, k, v, True)], iters=10)
        row.update(sdpa_ms=t_s * 1e3, sdpa_TFLOPs=flops / t_s / 1e12)
    return row


def bench_prefill(kb, vb) -> list[dict]:
    # gathered: the default config; k_new: the config the attention backend picks for the batch
    cfg = te.default_extend_config(D, DEV)
    rows = [
        bench_extend_point(kb, vb, n, 0, cfg, new_cfg=te.extend_config_for(cfg, DEV, n, 0))
        for n in (1024, 2048, 4096, 8192, 16384)
    ]
    rows.append(
        bench_extend_point(
            kb, vb, 1024, 4096, cfg, nreq=4, new_cfg=te.extend_config_for(cfg, DEV, 4096, 16384)
        )
    )
    for r in rows:
        print("prefill", r, flush=True)
    return rows


def bench_shared_point(kb, vb, bsz: int, prefix: int, max_suffix: int = 256, config=None) -> dict:
    gen = torch.Generator().manual_seed(bsz * 7 + prefix)
    suffix_lens = torch.randint(1, max_suffix + 1, (bsz,), generator=gen).tolist()
    nbytes_off = (bsz * prefix + sum(suffix_lens)) * TOKEN_BYTES
    nbytes_on = (prefix + sum(suffix_lens)) * TOKEN_BYTES
    reps = rotations(nbytes_on)
    q = torch.randn(bsz, H, D, device=DEV, dtype=DT)
    sp = indptr(suffix_lens, DEV)
    full_ip = indptr([prefix + s for s in suffix_lens], DEV)
    cfg = td.default_decode_config(D, DEV)
    on_fns, off_fns = [], []
    for _ in range(reps):
        slots = slot_layout([prefix, *suffix_lens], kb.shape[0], "paged", GEN, device=DEV)
        pre, suf = slots[:prefix], slots[prefix:]
        full = torch.cat([torch.cat([pre, suf[sp[b] : sp[b + 1]]]) for b in range(bsz)])
        on_fns.append(
            lambda pre=pre, suf=suf: tsp.shared_prefix_decode(q, kb, vb, pre, sp, suf, SCALE, config=config)
        )
        off_fns.append(lambda full=full: td.decode_attention(q, kb, vb, full_ip, full, SCALE, config=cfg))
    t_on, t_off = time_graph(on_fns), time_graph(off_fns)
    return {
        "batch": bsz,
        "prefix": prefix,
        "mean_suffix": sum(suffix_lens) / bsz,
        "rule_says_use": should_use_shared_prefix(prefix, bsz),
        "on_us": t_on * 1e6,
        "off_us": t_off * 1e6,
        "speedup": t_off / t_on,
        "off_GBps": nbytes_off / t_off / 1e9,
    }


def bench_shared(kb, vb) -> list[dict]:
    points = [(64, 4096), (64, 16384), (128, 4096), (128, 16384)]
    boundary = [(b, p) for b in (4, 8, 16, 32, 64) for p in (256, 512, 1024, 2048, 4096)]
    boundary += [(2, 16384), (4, 16384), (8, 8192)]
    rows = []
    for bsz, prefix in points + [x for x in boundary if x not in points]:
        rows.append(bench_shared_point(kb, vb, bsz, prefix) | {"boundary": (bsz, prefix) not in points})
        print("shared", rows[-1], flush=True)
    return rows


def bench_sweep(kb, vb) -> dict:
    dec = []
    for bn, nw, st in [(128, 4, 2), (128, 4, 3), (64, 4, 3), (256, 4, 2), (256, 8, 2), (128, 8, 3)]:
        cfg = td.DecodeConfig(block_n=bn, num_warps=nw, num_stages=st)
        for bsz, ctx in ((1, 16384), (16, 1024), (16, 4096), (64, 4096), (256, 4096)):
            try:
                r = bench_decode_point(kb, vb, bsz, ctx, cfg, with_sdpa=False)
            except Exception as exc:
                r = {"batch": bsz, "ctx": ctx, "error": repr(exc)[:200]}
            dec.append({"block_n": bn, "warps": nw, "stages": st} | r)
            print("sweep decode", dec[-1], flush=True)
    ext = []
    for bm, bn, nw, st in [
        (128, 64, 4, 3),
        (128, 64, 4, 2),
        (128, 64, 4, 4),
        (128, 128, 4, 2),
        (128, 128, 8, 2),
        (256, 64, 8, 3),
        (128, 32, 4, 3),
        (64, 128, 4, 3),
    ]:
        cfg = te.ExtendConfig(block_m=bm, block_n=bn, num_warps=nw, num_stages=st)
        try:
            r = bench_extend_point(kb, vb, 8192, 0, cfg, with_sdpa=False)
        except Exception as exc:  # a config the compiler rejects (shared memory) is a result too
            r = {"error": repr(exc)[:200]}
        ext.append({"block_m": bm, "block_n": bn, "warps": nw, "stages": st} | r)
        print("sweep extend", ext[-1], flush=True)
    shared = []
    for bm, bn, nw, st, chunk in [
        (128, 64, 8, 3, 256),
        (128, 64, 8, 3, 512),
        (128, 64, 8, 3, 1024),
        (128, 64, 4, 3, 512),
        (64, 64, 4, 3, 512),
        (128, 128, 8, 2, 512),
    ]:
        cfg = tsp.SharedPrefixConfig(block_m=bm, block_n=bn, num_warps=nw, num_stages=st, min_chunk=chunk)
        for bsz, prefix in ((64, 4096), (128, 16384), (16, 1024)):
            try:
                r = bench_shared_point(kb, vb, bsz, prefix, config=cfg)
            except Exception as exc:
                r = {"batch": bsz, "prefix": prefix, "error": repr(exc)[:200]}
            shared.append({"block_m": bm, "block_n": bn, "warps": nw, "stages": st, "min_chunk": chunk} | r)
            print("sweep shared", shared[-1], flush=True)
    return {"decode": dec, "extend": ext, "shared": shared}


def bench_flex(kb, vb, budget_s: float = 120.0) -> list[dict]:
    import triton.testing
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    rows, t0 = [], time.time()
    for bsz, ctx in ((16, 4096), (64, 4096), (1, 16384), (256, 1024)):
        if time.time() - t0 > budget_s:
            rows.append({"batch": bsz, "ctx": ctx, "skipped": "time budget"})
            continue
        idx = slot_layout([ctx] * bsz, kb.shape[0], "paged", GEN, device=DEV)
        k, v = gather_contiguous(kb, idx, bsz, ctx), gather_contiguous(vb, idx, bsz, ctx)
        q = torch.randn(bsz, H, 1, D, device=DEV, dtype=DT)
        try:
            t = (
                triton.testing.do_bench(
                    lambda q=q, k=k, v=v: flex(q, k, v, enable_gqa=True), return_mode="median"
                )
                / 1e3
            )
            rows.append(
                {"batch": bsz, "ctx": ctx, "flex_us": t * 1e6, "flex_GBps": bsz * ctx * HKV * D * 4 / t / 1e9}
            )
        except Exception as exc:
            rows.append({"batch": bsz, "ctx": ctx, "error": repr(exc)[:300]})
        print("flex", rows[-1], flush=True)
    return rows


def print_tables(res: dict) -> None:
    if "ceilings" in res:
        print(f"\nceilings: {res['ceilings']}")
    if "read_ceilings" in res:
        print(
            "\nread ceiling (K + V bytes of a decode)  batch  ctx    read_us  GB/s   %3.35TB/s"
            "  gather_us  %3.35TB/s  rows_us  %3.35TB/s"
        )
        for r in res["read_ceilings"]:
            print(
                f"{'':39}{r['batch']:5d} {r['ctx']:6d} {r['read_us']:8.1f} {r['read_GBps']:6.0f}"
                f" {r['read_pct']:7.1f}%  {r['gather_us']:9.1f} {r['gather_pct']:7.1f}%"
                f"  {r['rows_us']:9.1f} {r['rows_pct']:7.1f}%"
            )
    if "decode" in res:
        print(
            "\ndecode (bf16, 32q/8kv heads, d128)  batch  ctx    splits  triton_us  GB/s   %3.35TB/s  sdpa_us  sdpa_GB/s"
        )
        for r in (r for r in res["decode"] if "batch" in r):
            print(
                f"{'':36}{r['batch']:5d} {r['ctx']:6d} {r['splits']:5d} {r['triton_us']:10.1f} {r['triton_GBps']:6.0f}"
                f" {r['pct_of_3.35TBps']:7.1f}%  {r.get('sdpa_us', float('nan')):8.1f} {r.get('sdpa_GBps', float('nan')):6.0f}"
            )
        if any("one_launch_us" in r for r in res["decode"]):
            print(
                "\ndecode merge  batch  ctx    splits  one_launch_us  %3.35TB/s  two_launch_us  %3.35TB/s  two/one"
                "  split_only_us"
            )
            for r in res["decode"]:
                if "one_launch_us" in r:  # (the last row lists compiled kernels)
                    print(
                        f"{'':13}{r['batch']:5d} {r['ctx']:6d} {r['splits']:5d} {r['one_launch_us']:14.1f}"
                        f" {r['one_launch_pct']:8.1f}% {r['two_launch_us']:14.1f} {r['two_launch_pct']:8.1f}%"
                        f" {r['two_over_one']:7.3f} {r.get('split_only_us', float('nan')):14.1f}"
                    )
    if "prefill" in res:
        print(
            "\nprefill/extend  reqs  new  prefix  triton_ms  TFLOP/s  newkv_ms  newkv_TFLOP/s  sdpa_ms  sdpa_TFLOP/s"
        )
        for r in res["prefill"]:
            print(
                f"{'':16}{r['requests']:3d} {r['new_tokens']:6d} {r['prefix']:6d} {r['triton_ms']:9.3f} {r['triton_TFLOPs']:7.0f}"
                f"  {r.get('triton_newkv_ms', float('nan')):8.3f} {r.get('triton_newkv_TFLOPs', float('nan')):7.0f}"
                f"  {r.get('sdpa_ms', float('nan')):7.3f} {r.get('sdpa_TFLOPs', float('nan')):7.0f}"
            )
    if "shared" in res:
        bad = [(r["batch"], r["prefix"]) for r in res["shared"] if r["rule_says_use"] and r["speedup"] < 1.0]
        print(f"\nshared prefix: points where the cost rule picks the slower path: {bad or 'none'}")
        print("shared prefix  batch  prefix  rule  on_us    off_us   speedup")
        for r in res["shared"]:
            print(
                f"{'':14}{r['batch']:5d} {r['prefix']:7d}  {'yes' if r['rule_says_use'] else 'no ':4} {r['on_us']:8.1f}"
                f" {r['off_us']:8.1f} {r['speedup']:7.2f}x{'  (boundary)' if r['boundary'] else ''}"
            )
    if "flex" in res:
        print("\nflex:", res["flex"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON results")
    ap.add_argument("--sections", default="ceil,readceil,decode,prefill,shared,sweep,flex")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    device = props.name.replace(" ", "_")
    date = datetime.date.today().isoformat()
    import triton

    res: dict = {
        "device": props.name,
        "date": date,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {"q_heads": H, "kv_heads": HKV, "head_dim": D, "dtype": "bf16"},
        "spec_bandwidth_Bps": SPEC_BW,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernels_{device}_{date}.json"
    # One pool for everything: 4.2M slots (17 GB of K+V), enough for batch 256 x 16k.
    slots = 256 * 16384 + 65536
    kb = torch.randn(slots, HKV, D, device=DEV, dtype=DT)
    vb = torch.randn(slots, HKV, D, device=DEV, dtype=DT)
    sections = {
        "ceil": ("ceilings", lambda: bench_ceilings()),
        "readceil": ("read_ceilings", lambda: bench_read_ceilings(kb, vb)),
        "decode": ("decode", lambda: bench_decode(kb, vb)),
        "prefill": ("prefill", lambda: bench_prefill(kb, vb)),
        "shared": ("shared", lambda: bench_shared(kb, vb)),
        "sweep": ("sweep", lambda: bench_sweep(kb, vb)),
        "flex": ("flex", lambda: bench_flex(kb, vb)),
    }
    for name in args.sections.split(","):
        key, fn = sections[name]
        t0 = time.time()
        try:
            res[key] = fn()
        except Exception as exc:  # keep what the other sections measured
            res[key + "_error"] = repr(exc)[:500]
            print(f"section {name} failed: {exc!r}", flush=True)
        print(f"section {name}: {time.time() - t0:.0f} s", flush=True)
        path.write_text(json.dumps(res, indent=1))
    print_tables(res)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
