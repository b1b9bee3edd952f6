"""Prefill (extend) launch-config sweep on the GPU: tile sizes, warps and stages of the Triton
extend kernel at 4k / 8k / 16k new tokens (head dim 128, bf16), next to torch SDPA. Prints one JSON
row per point and writes ``$OUT/extend_sweep.json`` (the current directory without ``$OUT``).

    python3 benchmarks/gpu/sweep_extend_configs.py
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402
from llmir_lang.kernels import triton_extend as te  # noqa: E402

CONFIGS = [
    (bm, bn, w, s)
    for bm, bn, w, s in itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4))
    if not (bm == 256 and w == 4) and not (bm == 64 and w == 8)
]


def main() -> None:
    kb = torch.randn(16384 + 4096, bk.HKV, bk.D, device=bk.DEV, dtype=bk.DT)
    vb = torch.randn_like(kb)
    rows = []
    for n in (4096, 8192, 16384):
        for i, (bm, bn, w, s) in enumerate(CONFIGS):
            cfg = te.ExtendConfig(block_m=bm, block_n=bn, num_warps=w, num_stages=s)
            try:
                r = bk.bench_extend_point(kb, vb, n, 0, cfg, with_sdpa=i == 0)
            except Exception as e:  # e.g. out of shared memory for a big tile
                r = {"new_tokens": n, "error": f"{type(e).__name__}: {str(e)[:120]}"}
            r.update(block_m=bm, block_n=bn, warps=w, stages=s)
            rows.append(r)
            print(
                json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}), flush=True
            )
    with open(os.path.join(os.environ.get("OUT", "."), "extend_sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
