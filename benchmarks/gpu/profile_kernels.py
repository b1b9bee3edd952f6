"""Where the GPU time of one decode step goes, kernel by kernel (CUDA only).

For each shape and batch: a random bf16 Llama, distinct ``--ctx``-token prompts, decode steps run by
the engine as usual (CUDA graphs, compile on), then ``torch.profiler`` records the GPU kernels of
``--steps`` more decode steps. Prints, per kernel name, the time per step, the bytes it should
read when it is a weight GEMM (from its shape) and the bandwidth that implies, and sums the step
into GEMMs, attention and everything else. Writes ``$OUT/profile_kernels.json`` (or ``--out``).

    python3 benchmarks/gpu/profile_kernels.py [--shapes llama-3.2-1b,llama-3-8b] [--batches 1,64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import random_checkpoint  # noqa: E402

from llmir_lang.executor.engine import Engine  # noqa: E402

HBM = 3.35e12


def category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul", "splitk")):
        return "gemm"
    if any(k in n for k in ("_decode", "attention", "extend", "shared_prefix", "merge")):
        return "attention"
    if "store_kv" in n:
        return "store_kv"
    if "triton" in n or "fused" in n:
        return "fused elementwise"
    return "other"


def profile_case(
    eng: Engine, batch: int, ctx: int, steps: int, shared: int = 0, origins: bool = False
) -> dict:
    """``shared`` > 0: every prompt is one ``shared``-token prefix plus ``ctx`` tokens of its own
    (the issue's shared-prefix batch is ``shared=1024, ctx=64``)."""
    vocab = eng.config.vocab_size
    rng = random.Random(batch)
    head = [rng.randrange(10, vocab) for _ in range(shared)]
    prompts = [head + [rng.randrange(10, vocab) for _ in range(ctx)] for _ in range(batch)]
    warm = {"max_new_tokens": 4, "ignore_eos": True}
    eng.generate(prompts, warm)  # capture graphs, compile
    eng.flush_cache()
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if origins else [])
    prof = profile(activities=acts, with_stack=origins)
    seen = [0]
    orig = eng.runner.run

    def run(sb, **kw):  # profile decode steps 3 .. 3 + steps (after the prefill, before the tail)
        if sb.mode.name != "DECODE":
            return orig(sb, **kw)
        seen[0] += 1
        if seen[0] == 3:
            torch.cuda.synchronize()
            prof.start()
        out = orig(sb, **kw)
        if seen[0] == 2 + steps:
            torch.cuda.synchronize()
            prof.stop()
        return out

    eng.runner.run = run  # type: ignore[method-assign]
    try:
        eng.generate(prompts, {"max_new_tokens": steps + 6, "ignore_eos": True})
    finally:
        eng.runner.run = orig  # type: ignore[method-assign]
    n_dec = steps
    if origins:  # which host calls launched the copies and the non-kernel GPU work
        launched: dict[str, int] = defaultdict(int)
        for ev in prof.events():
            for k in getattr(ev, "kernels", []) or []:
                if "memcpy" in k.name.lower() or "memset" in k.name.lower():
                    stack = " <- ".join(f for f in (ev.stack or [])[:6] if "llmir_lang" in f or "torch/" in f)
                    launched[f"{k.name[:40]} by {ev.name} :: {stack[:300]}"] += 1
        for key, n in sorted(launched.items(), key=lambda kv: -kv[1])[:12]:
            print(f"   origin x{n / n_dec:.1f}/step: {key}")
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages():
        t = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        if t <= 0:
            continue
        per_kernel[ev.key][0] += t
        per_kernel[ev.key][1] += ev.count
    rows = []
    total = 0.0
    cats: dict[str, float] = defaultdict(float)
    for name, (us, count) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0]):
        per_step = us / n_dec
        c = category(name)
        cats[c] += per_step
        total += per_step
        rows.append(
            {"kernel": name[:140], "category": c, "us_per_step": per_step, "calls_per_step": count / n_dec}
        )
    # bytes a decode step reads, as bench_engine_gpu.py counts them: every parameter except an
    # untied input embedding table (a step reads only its rows)
    weight_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    if not eng.model.config.tie_word_embeddings:
        emb = eng.model.model.embed_tokens.weight
        weight_bytes -= emb.numel() * emb.element_size()
    # the shared prefix is read once a step (shared-prefix decode), each request's own tokens apart
    kv_bytes = (shared + batch * (ctx + 2 + steps / 2)) * eng.pool.bytes_per_token
    return {
        "batch": batch,
        "ctx": ctx,
        "shared_prefix": shared,
        "shared_prefix_steps_total": eng.runner.num_shared_prefix_steps,
        "decode_steps": n_dec,
        "gpu_us_per_step": total,
        "roofline_us": (weight_bytes + kv_bytes) / HBM * 1e6,
        "weight_GB": weight_bytes / 1e9,
        "gemm_bandwidth_TBps": weight_bytes / max(cats["gemm"], 1e-9) / 1e6,
        "categories_us_per_step": dict(cats),
        "kernels": rows[:40],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        help="a prefix of this many tokens shared by every prompt, before its --ctx own tokens",
    )
    ap.add_argument("--origins", action="store_true", help="also list the host calls behind copies")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": {}}
    for shape in a.shapes.split(","):
        folder = Path(tempfile.mkdtemp(prefix=f"prof_{shape}_"))
        with torch.device("cuda"):
            hf = random_checkpoint(shape, folder, dtype=torch.bfloat16)
        del hf
        torch.cuda.empty_cache()
        with Engine(str(folder), device="cuda", dtype=torch.bfloat16, kv_memory="16GB") as eng:
            res = []
            for b in (int(x) for x in a.batches.split(",")):
                r = profile_case(eng, b, a.ctx, a.steps, a.shared_prefix, a.origins)
                res.append(r)
                print(
                    f"== {shape} batch {b} (shared prefix {a.shared_prefix}): {r['gpu_us_per_step']:.0f} us/step on the GPU, roofline "
                    f"{r['roofline_us']:.0f} us ({100 * r['roofline_us'] / r['gpu_us_per_step']:.1f}%), "
                    f"GEMMs at {r['gemm_bandwidth_TBps']:.2f} TB/s",
                    flush=True,
                )
                print("   categories:", {k: round(v, 1) for k, v in r["categories_us_per_step"].items()})
                for k in r["kernels"][:25]:
                    print(
                        f"   {k['us_per_step']:8.1f} us {k['calls_per_step']:6.1f}x  {k['category']:18s} {k['kernel'][:100]}"
                    )
            out["shapes"][shape] = res
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with open(os.path.join(a.out, "profile_kernels.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
