"""Triton projections against cuBLAS for the decode step's weight shapes at small batches (bf16).

    python benchmarks/gpu/bench_gemv.py --out DIR [--shapes 8b,1b] [--rows 1,4,16,64] [--budget 240]

For each weight shape of the Llama-3-8B / Llama-3.2-1B decode step (fused q/k/v, o, fused
gate/up, down, the output layer) and each batch (rows of ``x``), ``y = x @ W.T``: cuBLAS through
``F.linear``, the Triton kernel's default launch configuration (``kernels/triton_gemv.py``: the
``gemv`` kernel up to 8 rows, ``skinny`` above) and the best of a sweep of configurations, each
timed as the median of CUDA-graph replays over enough weight copies that a replay reads past the L2
(as a decode step does: every layer's weights are read once). Prints GB/s and % of 3.35 TB/s and
writes ``DIR/gemv_<device>_<date>.json``. The answer to: does the 8B step's 2.7 TB/s GEMM stream
leave room (75% of the step roofline needs about 3.0 TB/s)?
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import rotations, time_graph  # noqa: E402
from llmir_lang.kernels import triton_gemv as tg  # noqa: E402

SPEC_BW = 3.35e12
SHAPES = {  # name: (N, K) of W [N, K]
    "8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
           ("lm_head", 128256, 4096)],
    "1b": [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192),
           ("lm_head", 128256, 2048)],
}  # fmt: skip
GEMV_CONFIGS = [
    tg.GemvConfig(block_n, block_k, warps, stages)
    for block_n in (1, 2, 4, 8)
    for block_k in (256, 512, 1024)
    for warps in (4, 8)
    for stages in (1, 3)
]
SKINNY_CONFIGS = [
    tg.SkinnyConfig(0, block_n, block_k, warps, stages)  # block_m: the rows' power of two (16..64)
    for block_n in (16, 32, 64, 128)
    for block_k in (64, 128, 256)
    for warps in (4, 8)
    for stages in (3, 4, 5)
]


def bench_point(name: str, n: int, k: int, m: int, budget_end: float) -> dict:
    dev = torch.device("cuda")
    nbytes = n * k * 2
    copies = rotations(nbytes)
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    ys = [torch.empty(m, n, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
    want = F.linear(x.float(), ws[0].float())
    t_cublas = time_graph([lambda w=w: F.linear(x, w) for w in ws])
    row: dict = {"name": name, "N": n, "K": k, "M": m, "bytes": nbytes, "copies": copies}
    row["cublas_us"] = t_cublas * 1e6
    row["cublas_tbs"] = nbytes / t_cublas / 1e12
    if m <= tg.GEMV_MAX_ROWS:
        kind, configs, run, default = "gemv", GEMV_CONFIGS, tg.gemv, tg.default_gemv_config(n, k)
    else:
        block_m = max(16, min(64, 1 << (m - 1).bit_length()))
        configs = [c._replace(block_m=block_m) for c in SKINNY_CONFIGS]
        kind, run, default = "skinny", tg.skinny, tg.default_skinny_config(m, n, k)
    row["kernel"] = kind

    def timed(cfg) -> float | None:
        try:
            run(x, ws[0], ys[0], cfg)
            got = ys[0].float()
            if not torch.allclose(got, want, atol=2e-2, rtol=2e-2):
                print(f"  {name} {cfg}: wrong result (max err {(got - want).abs().max():.3g})")
                return None
            return time_graph([lambda w=w, y=y: run(x, w, y, cfg) for w, y in zip(ws, ys)])
        except Exception as e:  # a config the compiler refuses (registers, shared memory)
            print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:100]}")
            return None

    if default is not None and (t := timed(default)) is not None:
        row["default_us"], row["default_config"] = t * 1e6, list(default)
        row["default_speedup"] = t_cublas / t
    best: tuple[float, object] | None = None
    tried = 0
    for cfg in configs:
        if time.monotonic() > budget_end:
            break
        if k % cfg.block_k or (t := timed(cfg)) is None:
            continue
        tried += 1
        if best is None or t < best[0]:
            best = (t, cfg)
    row["configs_tried"] = tried
    if best is not None:
        row["triton_us"] = best[0] * 1e6
        row["triton_tbs"] = nbytes / best[0] / 1e12
        row["triton_config"] = list(best[1])
        row["speedup"] = t_cublas / best[0]
    print(
        f"{name:8s} {n:6d}x{k:5d} M={m:3d} cuBLAS {row['cublas_us']:7.1f} us {row['cublas_tbs']:.2f} TB/s  "
        + (f"default {row['default_us']:7.1f} us {row['default_speedup']:.2f}x  " if "default_us" in row else "")
        + (f"best {row['triton_us']:7.1f} us {row['triton_tbs']:.2f} TB/s {row['speedup']:.2f}x {best[1]}" if best else "none"),
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="8b,1b")
    ap.add_argument("--rows", default="1,4,16,64", help="rows of x (the decode batch)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the config sweeps")
    ns = ap.parse_args()
    dev_name = torch.cuda.get_device_name().replace(" ", "_")
    res: dict = {"benchmark": "gemv", "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                 "torch": torch.__version__, "rows": {}}  # fmt: skip
    rows_list = [int(r) for r in ns.rows.split(",")]
    todo = [(s, *shape, m) for m in rows_list for s in ns.shapes.split(",") for shape in SHAPES[s]]
    start = time.monotonic()
    for i, (s, name, n, k, m) in enumerate(todo):
        share = (ns.budget - (time.monotonic() - start)) / (len(todo) - i)
        res["rows"].setdefault(f"{s}_m{m}", []).append(bench_point(name, n, k, m, time.monotonic() + share))
        ns.out.mkdir(parents=True, exist_ok=True)
        (ns.out / f"gemv_{dev_name}_{res['date']}.json").write_text(json.dumps(res, indent=2))
    for key, rows in res["rows"].items():
        byts = sum(r["bytes"] for r in rows)
        tot_c = sum(r["cublas_us"] for r in rows)
        tot_d = sum(min(r.get("default_us", r["cublas_us"]), r["cublas_us"]) for r in rows)
        tot_t = sum(min(r.get("triton_us", r["cublas_us"]), r["cublas_us"]) for r in rows)
        print(f"{key}: one layer + output layer: cuBLAS {tot_c:.0f} us ({byts / tot_c / 1e6:.2f} TB/s), "
              f"default configs {tot_d:.0f} us, best {tot_t:.0f} us ({byts / tot_t / 1e6:.2f} TB/s)")  # fmt: skip

if __name__ == "__main__":
    main()
