"""Host time of one call of each thing an extend forward does per layer (CUDA only).

An extend of the shared-prefix batch is bound by host work (``profile_prefill.py --host-split``).
This times, without synchronizing, ``--calls`` back-to-back calls of each piece at the 1B shape
with 1,088 new tokens: the compiled and plain elementwise ops, a cuBLAS projection, ``store_kv``,
and the extend attention through each way of loading the new tokens' K/V; then the GPU time of the
same calls (synchronized), so each row says whether the host or the GPU is the limit.

    python3 benchmarks/gpu/probe_host_calls.py [--tokens 1088 --calls 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F
from llmir_lang.kernels import triton_extend as te
from llmir_lang.kernels import triton_misc

from llmir_lang.executor.model import PLAIN_OPS, compiled_ops


def host_and_gpu(fn, calls: int) -> tuple[float, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / calls
    return host, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1088)
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    dev, dt, t = torch.device("cuda"), torch.bfloat16, a.tokens
    hidden, heads, kv_heads, hd, inter = 2048, 32, 8, 64, 8192
    x = torch.randn(t, hidden, device=dev, dtype=dt)
    r = torch.randn_like(x)
    w = torch.ones(hidden, device=dev, dtype=dt)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * hd, device=dev, dtype=dt)
    cos = torch.randn(t, 1, hd, device=dev, dtype=dt)
    sin = torch.randn(t, 1, hd, device=dev, dtype=dt)
    gu = torch.randn(t, 2 * inter, device=dev, dtype=dt)
    wq = torch.randn(qkv.shape[1], hidden, device=dev, dtype=dt)
    slots = 1 << 16
    kb = torch.randn(slots, kv_heads, hd, device=dev, dtype=dt)
    vb = torch.randn_like(kb)
    loc = torch.arange(t, device=dev)
    q = torch.randn(t, heads, hd, device=dev, dtype=dt)
    k = qkv[:, heads * hd : (heads + kv_heads) * hd].view(t, kv_heads, hd)
    v = qkv[:, (heads + kv_heads) * hd :].view(t, kv_heads, hd)
    qo = torch.tensor([0, t], device=dev)
    kvp = torch.tensor([0, t], device=dev)
    base = te.extend_config_for(te.default_extend_config(hd, dev), dev, t, 0)
    plan = te.plan_extend(qo, kvp, base.block_m)
    rows = []
    comp = compiled_ops()
    for name, ops in (("compiled", comp), ("plain", PLAIN_OPS)):
        rows.append((f"{name} add_norm", lambda ops=ops: ops.add_norm(x, r, w, 1e-5)))
        rows.append(
            (f"{name} rope", lambda ops=ops: ops.rope(qkv, cos, sin, heads, kv_heads, None, None, 1e-5))
        )
        rows.append((f"{name} act", lambda ops=ops: ops.act(gu)))
    rows.append(("F.linear qkv (cuBLAS)", lambda: F.linear(x, wq)))
    rows.append(("store_kv (Triton)", lambda: triton_misc.store_kv(kb, vb, loc, k, v)))
    for loads in te.NEW_KV_LOADS:
        cfg = dataclasses.replace(base, new_kv_loads=loads)
        rows.append(
            (
                f"extend attention, new K/V by {loads}",
                lambda cfg=cfg: te.extend_attention(
                    q, kb, vb, qo, kvp, loc, 0.125, plan=plan, config=cfg, k_new=k, v_new=v
                ),
            )
        )
    rows.append(
        (
            "extend attention, all K/V by slot",
            lambda: te.extend_attention(q, kb, vb, qo, kvp, loc, 0.125, plan=plan, config=base),
        )
    )
    print(f"{t} tokens, {a.calls} calls each: host us / call (no sync), wall us / call (with the GPU)")
    for name, fn in rows:
        host, wall = host_and_gpu(fn, a.calls)
        print(f"  {name:40s} host {host * 1e6:7.1f}  wall {wall * 1e6:7.1f}", flush=True)


if __name__ == "__main__":
    main()
