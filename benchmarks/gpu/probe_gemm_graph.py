"""What a cuBLAS projection costs inside a CUDA graph at decode batch sizes (CUDA only).

The kernel profile of a 1B decode step at batch 64 (``profile_kernels.py``) shows one
``Memcpy HtoD (Pageable -> Device)`` per cuBLAS GEMM. This records one graph replay of each of a
layer's four projections (``F.linear``, as the model calls it) with ``torch.profiler`` and lists the
GPU events the replay holds, then times each projection in a graph through cuBLAS and through the
Triton skinny kernel (``triton_gemv.skinny``) at a few launch shapes, and the greedy argmax over a
vocabulary-wide logits row block. Writes ``$OUT/gemm_graph_probe.json``.

    python3 benchmarks/gpu/probe_gemm_graph.py [--rows 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402
from llmir_lang.kernels import triton_gemv  # noqa: E402

SHAPES = {  # name -> (out features, in features)
    "1b.qkv": (3072, 2048),
    "1b.o": (2048, 2048),
    "1b.gate_up": (16384, 2048),
    "1b.down": (2048, 8192),
    "8b.qkv": (6144, 4096),
    "8b.o": (4096, 4096),
    "8b.gate_up": (28672, 4096),
    "8b.down": (4096, 14336),
}


def graph_events(fn) -> Counter:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    c: Counter = Counter()
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            c[ev.name[:70]] += 1
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="64")
    a = ap.parse_args()
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": []}
    for m in (int(x) for x in a.rows.split(",")):
        for name, (n, k) in SHAPES.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ws = [
                torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(bk.rotations(n * k * 2))
            ]
            ev = graph_events(lambda x=x, w=ws[0]: F.linear(x, w))
            t_cublas = bk.time_graph([lambda x=x, w=w: F.linear(x, w) for w in ws])
            row = {
                "rows": m,
                "shape": name,
                "MB": n * k * 2 / 1e6,
                "graph_events": dict(ev),
                "cublas_us": t_cublas * 1e6,
                "cublas_TBps": n * k * 2 / t_cublas / 1e12,
            }
            o = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, ws[0]).float()
            best = None
            every: list = []
            bm = 16 if m <= 16 else 32 if m <= 32 else 64
            for bn in (16, 32, 64):
                for bkk in (128, 256, 512):
                    for nw, st in ((2, 4), (4, 3), (4, 4), (4, 5), (8, 4)):
                        if k % bkk:
                            continue
                        cfg = triton_gemv.SkinnyConfig(bm, bn, bkk, nw, st)
                        try:
                            triton_gemv.skinny(x, ws[0], o, cfg)
                            err = (o.float() - ref).abs().max().item()
                            t = bk.time_graph(
                                [lambda x=x, w=w, o=o, cfg=cfg: triton_gemv.skinny(x, w, o, cfg) for w in ws]
                            )
                        except Exception:  # shared memory over the limit, say
                            continue
                        every.append([*cfg, round(t * 1e6, 2)])
                        if best is None or t < best[0]:
                            best = (t, cfg, err)
            if best is not None:
                row |= {
                    "skinny_us": best[0] * 1e6,
                    "skinny_TBps": n * k * 2 / best[0] / 1e12,
                    "skinny_config": list(best[1]),
                    "skinny_max_err": best[2],
                    "skinny_vs_cublas": t_cublas / best[0],
                    "skinny_all_us": every,
                }
            out["rows"].append(row)
            print(
                json.dumps(
                    {
                        kk: round(v, 3) if isinstance(v, float) else v
                        for kk, v in row.items()
                        if kk != "skinny_all_us"
                    }
                ),
                flush=True,
            )
    for m in (int(x) for x in a.rows.split(",")):
        logits = torch.randn(m, 128256, device="cuda", dtype=torch.float32)
        t = bk.time_graph([lambda lg=logits: torch.argmax(lg, dim=-1)])
        out.setdefault("argmax", []).append({"rows": m, "us": t * 1e6})
        print("argmax", m, round(t * 1e6, 1), "us", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "gemm_graph_probe.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
