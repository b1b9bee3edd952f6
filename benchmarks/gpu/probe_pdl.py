"""Programmatic dependent launch (PDL) for a decode step's one-row projections (CUDA, sm90+).

A batch-1 decode step is a chain of weight-streaming kernels, each a few microseconds at the
Llama-3.2-1B shape; between two of them the GPU drains the last wave of one and ramps up the next.
With PDL (``triton_common.PDL``) a projection's programs start during the previous kernel's last wave
and load their first weight slice before they wait for its output. This times the chain of a
step's projections (``add_norm_linear`` qkv, a torch elementwise kernel standing for the rotary,
``linear`` o, ``add_norm_linear`` gate/up, ``silu_mul_linear`` down, per layer, then the output
layer) replayed in one CUDA graph, with PDL and without, in alternating rounds, and reports the
time a step's weights take against the 3.35 TB/s roofline. ``--no-elementwise`` leaves the torch
kernel out (projections only). Writes ``$OUT/pdl_probe.json``.

    python3 benchmarks/gpu/probe_pdl.py [--shapes 1b,8b] [--rounds 5] [--replays 50]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics

import llmir_lang.kernels as K
import torch
from llmir_lang.kernels import triton_common

SHAPES = {  # name -> (hidden, intermediate, layers, vocab, q + kv heads x head dim)
    "1b": (2048, 8192, 16, 128256, 3072),
    "8b": (4096, 14336, 32, 128256, 6144),
}
PEAK_TBS = 3.35


def build(shape: str) -> tuple[list, torch.Tensor, torch.Tensor, int]:
    h, i, n_layers, vocab, qkv_n = SHAPES[shape]
    dt, dev = torch.bfloat16, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def w(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, device=dev, dtype=dt, generator=g) * k**-0.5

    def norm() -> torch.Tensor:
        return 1 + 0.1 * torch.randn(h, device=dev, dtype=dt, generator=g)

    layers = [(norm(), w(qkv_n, h), w(h, h), norm(), w(2 * i, h), w(h, i)) for _ in range(n_layers)]
    head = w(vocab, h)
    nbytes = sum(t.numel() * t.element_size() for layer in layers for t in layer) + head.numel() * 2
    return layers, head, norm(), nbytes


def step(x: torch.Tensor, layers: list, head: torch.Tensor, final_norm: torch.Tensor, elementwise: bool):
    residual = None
    for norm1, qkv_w, o_w, norm2, gu_w, down_w in layers:
        qkv, residual = K.add_norm_linear(x, residual, norm1, 1e-5, qkv_w)
        a = qkv[:, : o_w.shape[1]]
        a = (a * 1.5).contiguous() if elementwise else a.contiguous()
        o = K.linear(a, o_w)
        gate_up, residual = K.add_norm_linear(o, residual, norm2, 1e-5, gu_w)
        x = K.silu_mul_linear(gate_up, down_w)
    return K.add_norm_linear(x, residual, final_norm, 1e-5, head)[0]


def time_graph(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Median microseconds of one replay."""
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--no-elementwise", action="store_true")
    a = ap.parse_args()
    dev_name = torch.cuda.get_device_name()
    out = {
        "device": dev_name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "elementwise": not a.no_elementwise,
        "rows": [],
    }
    for shape in a.shapes.split(","):
        layers, head, final_norm, nbytes = build(shape)
        x = torch.randn(1, SHAPES[shape][0], device="cuda", dtype=torch.bfloat16)
        assert triton_common.pdl_ok(x), "PDL needs a CUDA device of compute capability 9.0 and Triton 3.3+"
        graphs, results = {}, {}
        for pdl in (False, True):
            triton_common.PDL = pdl
            step(x, layers, head, final_norm, not a.no_elementwise)  # compile outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y = step(x, layers, head, final_norm, not a.no_elementwise)
            g.replay()
            torch.cuda.synchronize()
            graphs[pdl], results[pdl] = g, y.clone()
        same = torch.equal(results[False], results[True])
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(a.rounds):
            for pdl in (False, True):
                times[pdl].append(time_graph(graphs[pdl], a.replays))
        roofline_us = nbytes / (PEAK_TBS * 1e12) * 1e6
        row = {"shape": shape, "weight_bytes": nbytes, "roofline_us": roofline_us, "same_output": same}
        for pdl in (False, True):
            t = statistics.median(times[pdl])
            key = "pdl" if pdl else "plain"
            row[f"{key}_us"] = t
            row[f"{key}_rounds_us"] = times[pdl]
            row[f"{key}_pct_of_roofline"] = 100 * roofline_us / t
        row["speedup"] = row["plain_us"] / row["pdl_us"]
        out["rows"].append(row)
        print(
            f"{shape}: plain {row['plain_us']:.0f} us ({row['plain_pct_of_roofline']:.1f}%), "
            f"PDL {row['pdl_us']:.0f} us ({row['pdl_pct_of_roofline']:.1f}%), {row['speedup']:.3f}x, "
            f"roofline {roofline_us:.0f} us, same output: {same}",
            flush=True,
        )
        del graphs, layers, head
        torch.cuda.empty_cache()
    triton_common.PDL = True
    path = os.path.join(os.environ.get("OUT", "."), "pdl_probe.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
