"""Decode attention at small batches (1 and 4 requests), where a call is a chain of dependent
memory round trips rather than a stream of KV bytes: shortest split, key tile and pipeline depth
against the default launch shape, at head dims 64 (Llama-3.2-1B) and 128 (Llama-3-8B).

Each point times 64 calls on 64 different slot sets of one large pool (every call reads KV that
the L2 does not hold, as in a decode step, where each layer's KV comes after megabytes of
weights), captured in one CUDA graph, PDL off (a call's own latency). Prints one JSON row per
point and writes ``$OUT/decode_small_probe.json``.

    python3 benchmarks/gpu/probe_decode_small.py [--ctx 1024,4096,16384] [--batches 1,4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402
from llmir_lang.kernels import triton_decode as td  # noqa: E402
from llmir_lang.kernels.testing import indptr, slot_layout  # noqa: E402

SETS = 64


def point(d: int, bsz: int, ctx: int, configs: dict[str, td.DecodeConfig]) -> dict:
    h, hkv = 32, 8
    slots = SETS * bsz * ctx + 64
    kb = torch.randn(slots, hkv, d, device=bk.DEV, dtype=bk.DT)
    vb = torch.randn_like(kb)
    q = torch.randn(bsz, h, d, device=bk.DEV, dtype=bk.DT)
    ip = indptr([ctx] * bsz, bk.DEV)
    perm = slot_layout([ctx] * bsz * SETS, slots, "paged", bk.GEN, device=bk.DEV)
    sets = perm.view(SETS, bsz * ctx)
    want = None
    row: dict = {"head_dim": d, "batch": bsz, "ctx": ctx}
    for name, cfg in configs.items():
        cap = td.split_cap(bsz, hkv, cfg, bk.DEV)
        ws = td.alloc_partials(bsz, h, cap, d, bk.DEV, with_counters=True)
        out = torch.empty_like(q)
        args = (q, kb, vb, ip)
        fns = [
            (
                lambda idx=idx, c=cfg, ws=ws, out=out, args=args: td.decode_attention(
                    *args, idx, d**-0.5, workspace=ws, out=out, config=c
                )
            )
            for idx in sets
        ]
        fns[0]()
        if want is None:
            want = out.clone()
        else:
            assert torch.allclose(out.float(), want.float(), atol=2e-2, rtol=2e-2), name
        row[name] = bk.time_graph(fns, iters=10) * 1e6  # us per call
    del kb, vb, args, fns
    torch.cuda.empty_cache()
    base = row["default"]
    nbytes = bsz * ctx * (hkv * d * 2 * 2 + 8)
    row["default_gbps"] = nbytes / base / 1e3
    best = min((k for k in configs), key=lambda k: row[k])
    row["best"], row["best_us"], row["best_speedup"] = best, row[best], base / row[best]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", default="1024,4096,16384")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--dims", default="64,128")
    a = ap.parse_args()
    td.PDL = False
    rows = []
    for d in (int(x) for x in a.dims.split(",")):
        base = td.default_decode_config(d, bk.DEV)
        configs = {"default": base}
        for mc in (64, 128, 256):
            for bn in (32, 64, 128):
                if bn > mc:
                    continue
                for st in (2, 3):
                    configs[f"mc{mc}_bn{bn}_st{st}"] = dataclasses.replace(
                        base, min_chunk=mc, block_n=bn, num_stages=st
                    )
        for bsz in (int(x) for x in a.batches.split(",")):
            for ctx in (int(x) for x in a.ctx.split(",")):
                r = point(d, bsz, ctx, configs)
                rows.append(r)
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    out = {"device": torch.cuda.get_device_name(), "rows": rows}
    with open(os.path.join(os.environ.get("OUT", "."), "decode_small_probe.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
