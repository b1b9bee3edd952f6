"""Shared-prefix decode launch shapes on the GPU, at the engine's own attention shapes.

The kernel benchmark's shared-prefix points are Llama-3-8B's attention (head dim 128) with 4k / 16k
prefixes. The engine's shared-prefix batch (issue 5) runs Llama-3.2-1B (head dim 64) with a 1,024-token
prefix and 64-192 own tokens a request, where the prefix kernel's grid is small (2 row blocks x 8 KV
heads x 2 splits on 132 SMs). This sweeps the prefix kernel's tile, warps, stages, shortest split and
programs per SM, plus the suffix kernel's key tile, at both head dims, against plain decode over
prefix + suffix. Prints one JSON row per point and writes ``$OUT/shared_prefix_sweep.json``.

    python3 benchmarks/gpu/sweep_shared_prefix.py [--quick]
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
from llmir_lang.kernels import triton_shared_prefix as tsp  # noqa: E402
from llmir_lang.kernels.testing import indptr, slot_layout  # noqa: E402

H, HKV = 32, 8
# (head dim, batch, prefix, smallest own length, largest own length)
POINTS = [
    (64, 64, 1024, 64, 192),  # the engine's shared-prefix batch (1B)
    (64, 128, 1024, 64, 192),
    (64, 64, 4096, 16, 64),
    (128, 64, 1024, 64, 192),  # the same batch at 8B's attention shape
    (128, 64, 4096, 1, 256),  # the kernel points
    (128, 128, 4096, 1, 256),
    (128, 64, 16384, 1, 256),
    (128, 128, 16384, 1, 256),
]


def time_point(kb, vb, d: int, bsz: int, prefix: int, lo: int, hi: int, configs: list) -> list[dict]:
    gen = torch.Generator().manual_seed(bsz * 7 + prefix + d)
    suffix_lens = torch.randint(lo, hi + 1, (bsz,), generator=gen).tolist()
    token_bytes = HKV * d * 2 * 2
    reps = bk.rotations((prefix + sum(suffix_lens)) * token_bytes)
    q = torch.randn(bsz, H, d, device=bk.DEV, dtype=bk.DT)
    sp = indptr(suffix_lens, bk.DEV)
    full_ip = indptr([prefix + s for s in suffix_lens], bk.DEV)
    layouts = []
    for _ in range(reps):
        slots = slot_layout([prefix, *suffix_lens], kb.shape[0], "paged", bk.GEN, device=bk.DEV)
        pre, suf = slots[:prefix], slots[prefix:]
        full = torch.cat([torch.cat([pre, suf[sp[b] : sp[b + 1]]]) for b in range(bsz)])
        layouts.append((pre, suf, full))
    scale = d**-0.5
    dcfg = td.default_decode_config(d, bk.DEV)
    t_off = bk.time_graph(
        [
            lambda full=full: td.decode_attention(q, kb, vb, full_ip, full, scale, config=dcfg)
            for _, _, full in layouts
        ]
    )
    ref = td.decode_attention(q, kb, vb, full_ip, layouts[0][2], scale, config=dcfg).float()
    rows = []
    configs = [("default", tsp.default_shared_prefix_config(d, bk.DEV, prefix)), *configs]
    for name, cfg in configs:
        try:
            got = tsp.shared_prefix_decode(
                q, kb, vb, layouts[0][0], sp, layouts[0][1], scale, config=cfg
            ).float()
            err = (got - ref).abs().max().item()
            t_on = bk.time_graph(
                [
                    lambda pre=pre, suf=suf, cfg=cfg: tsp.shared_prefix_decode(
                        q, kb, vb, pre, sp, suf, scale, config=cfg
                    )
                    for pre, suf, _ in layouts
                ]
            )
            r = {"on_us": t_on * 1e6, "speedup": t_off / t_on, "max_err": err}
        except Exception as exc:  # a shape the compiler rejects (shared memory) is a result too
            r = {"error": repr(exc)[:160]}
        rows.append(
            {"head_dim": d, "batch": bsz, "prefix": prefix, "config": name, "off_us": t_off * 1e6} | r
        )
        print(
            json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}),
            flush=True,
        )
    return rows


def configs_for(d: int, quick: bool) -> list[tuple[str, tsp.SharedPrefixConfig]]:
    base = tsp.default_shared_prefix_config(d, bk.DEV, 1 << 20)  # the long-prefix shape, varied below
    out = []
    tiles = [
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (64, 64, 4, 3),
        (64, 128, 4, 2),
        (128, 128, 8, 2),
        (64, 32, 4, 3),
    ]
    chunks = [64, 128, 256, 512]
    if quick:
        tiles, chunks = tiles[:3], [128, 512]
    for bm, bn, nw, st in tiles:
        for mc in chunks:
            for pps in (2, 4):
                cfg = dataclasses.replace(
                    base,
                    block_m=bm,
                    block_n=bn,
                    num_warps=nw,
                    num_stages=st,
                    min_chunk=mc,
                    programs_per_sm=pps,
                )
                out.append((f"m{bm}n{bn}w{nw}s{st}c{mc}p{pps}", cfg))
    for sbn in (32, 64):  # the suffix kernel's key tile (own lengths are short here)
        out.append(
            (
                f"suffix_n{sbn}",
                dataclasses.replace(base, suffix=dataclasses.replace(base.suffix, block_n=sbn)),
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    rows = []
    for d in (64, 128):
        pool = 128 * 16384 + 8 * 65536
        kb = torch.randn(pool, HKV, d, device=bk.DEV, dtype=bk.DT)
        vb = torch.randn_like(kb)
        cfgs = configs_for(d, a.quick)
        for hd, bsz, prefix, lo, hi in POINTS:
            if hd == d:
                rows += time_point(kb, vb, d, bsz, prefix, lo, hi, cfgs)
        del kb, vb
        torch.cuda.empty_cache()
    best: dict = {}
    for r in rows:
        if "on_us" in r:
            key = (r["head_dim"], r["batch"], r["prefix"])
            if key not in best or r["on_us"] < best[key]["on_us"]:
                best[key] = r
    print("\nbest per point (head dim, batch, prefix): config, on us, off us, speedup; default on us")
    for key, r in best.items():
        dflt = next(
            x for x in rows if (x["head_dim"], x["batch"], x["prefix"]) == key and x["config"] == "default"
        )
        print(
            key,
            r["config"],
            round(r["on_us"], 1),
            round(r["off_us"], 1),
            round(r["speedup"], 2),
            round(dflt.get("on_us", -1), 1),
        )
    with open(os.path.join(os.environ.get("OUT", "."), "shared_prefix_sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
