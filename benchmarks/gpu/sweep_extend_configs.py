"""Prefill (extend) launch-config sweep on the GPU: tile sizes, warps and stages of the Triton
extend kernel at 4k / 8k / 16k new tokens and at 4 x 1k new over 4k prefixes (head dim 128, bf16),
with every key read through the slot list (``triton_*``) and with the new tokens' K/V passed
directly (``triton_newkv_*``) under each ``ExtendConfig.new_kv_loads`` variant, next to torch
SDPA. Prints one JSON row per point, a best-per-point summary at the end, and writes
``$OUT/extend_sweep.json`` (the current directory without ``$OUT``).

    python3 benchmarks/gpu/sweep_extend_configs.py [--quick]

``--quick``: only ``default_extend_config`` (its own tiles for each path), every load variant.
The full sweep (about 1 minute on an H100) keeps the configurations that came within ~25% of the
best gathered one on 2026-11-23 (block_n 32 and 8 warps with 128x32 tiles lost badly) plus the
8-warp and 64-row tiles that suit the k_new path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402
from llmir_lang.kernels import triton_extend as te  # noqa: E402

# (block_m, block_n, warps, stages)
CONFIGS = [
    (128, 64, 4, 3),
    (128, 64, 4, 4),
    (128, 64, 8, 3),
    (256, 64, 8, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (64, 64, 4, 3),
    (64, 64, 4, 4),
    (64, 128, 4, 3),
    (64, 64, 8, 3),
]
# (new tokens, cached prefix, requests): three prompts, and 4 x 1k new tokens over 4k prefixes.
POINTS = [(4096, 0, 1), (8192, 0, 1), (16384, 0, 1), (1024, 4096, 4)]


def _short(r: dict) -> str:
    return json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()})


def main() -> None:
    if "--quick" in sys.argv[1:]:
        configs = [te.default_extend_config(bk.D, bk.DEV)]
    else:  # the same tiles for both paths
        configs = [
            te.ExtendConfig(block_m=bm, block_n=bn, num_warps=w, num_stages=s) for bm, bn, w, s in CONFIGS
        ]
    kb = torch.randn(32768, bk.HKV, bk.D, device=bk.DEV, dtype=bk.DT)
    vb = torch.randn_like(kb)
    rows = []
    for n, prefix, nreq in POINTS:
        for i, base in enumerate(configs):
            for j, loads in enumerate(te.NEW_KV_LOADS):
                cfg = dataclasses.replace(base, new_kv_loads=loads)
                try:
                    # The gathered path does not depend on new_kv_loads: time it once per config.
                    first = i == j == 0
                    r = bk.bench_extend_point(kb, vb, n, prefix, cfg, nreq, with_sdpa=first, gathered=j == 0)
                except Exception as e:  # e.g. out of shared memory for a big tile
                    r = {"new_tokens": n, "prefix": prefix, "error": f"{type(e).__name__}: {str(e)[:160]}"}
                r.update(
                    block_m=cfg.block_m,
                    block_n=cfg.block_n,
                    warps=cfg.num_warps,
                    stages=cfg.num_stages,
                    new_kv_loads=loads,
                    newkv_block_n=cfg.new_kv_block_n or cfg.block_n,
                    newkv_warps=cfg.new_kv_num_warps or cfg.num_warps,
                    newkv_stages=cfg.new_kv_num_stages or cfg.num_stages,
                )
                rows.append(r)
                print(_short(r), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "extend_sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\nbest per point (TFLOP/s, config block_m x block_n / warps / stages):")
    for n, prefix, nreq in POINTS:
        at_n = [r for r in rows if r.get("new_tokens") == n and r.get("prefix") == prefix]
        sdpa = next((r["sdpa_TFLOPs"] for r in at_n if "sdpa_TFLOPs" in r), float("nan"))
        line = [f"{nreq} x {n:5d} new over {prefix:4d}  sdpa {sdpa:5.0f}"]
        for label, key, loads in [("gathered", "triton_TFLOPs", None)] + [
            (v, "triton_newkv_TFLOPs", v) for v in te.NEW_KV_LOADS
        ]:
            cand = [r for r in at_n if key in r and (loads is None or r["new_kv_loads"] == loads)]
            if cand:
                b = max(cand, key=lambda r: r[key])
                p = "" if loads is None else "newkv_"
                shape = f"{b['block_m']}x{b[p + 'block_n']}/{b[p + 'warps']}/{b[p + 'stages']}"
                line.append(f"{label} {b[key]:5.0f} ({shape})")
        print("  ".join(line))


if __name__ == "__main__":
    main()
