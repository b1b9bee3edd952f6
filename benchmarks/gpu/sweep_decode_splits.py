"""Decode split rule sweep on the GPU: programs per SM, shortest split, key tile, at the decode
points that miss 85% of 3.35 TB/s. Prints one JSON row per point and writes
``$OUT/decode_sweep.json`` (the current directory without ``$OUT``).

    python3 benchmarks/gpu/sweep_decode_splits.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402
from llmir_lang.kernels import triton_decode as td  # noqa: E402

POINTS = [(16, 1024), (16, 4096), (16, 16384), (64, 1024), (1, 16384), (64, 4096)]


def main() -> None:
    pool = 64 * 16384 + 4096
    kb = torch.randn(pool, bk.HKV, bk.D, device=bk.DEV, dtype=bk.DT)
    vb = torch.randn_like(kb)
    base = td.default_decode_config(bk.D, bk.DEV)
    rows = []
    for bsz, ctx in POINTS:
        for pps in (4, 8, 16, 32):
            for mc in (128, 256):
                for bn in (64, 128):
                    cfg = dataclasses.replace(base, programs_per_sm=pps, min_chunk=mc, block_n=bn)
                    sdpa = pps == 4 and mc == 256 and bn == 128  # once per point
                    r = bk.bench_decode_point(kb, vb, bsz, ctx, cfg, with_sdpa=sdpa)
                    r.update(pps=pps, min_chunk=mc, block_n=bn)
                    rows.append(r)
                    print(
                        json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}),
                        flush=True,
                    )
    with open(os.path.join(os.environ.get("OUT", "."), "decode_sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
