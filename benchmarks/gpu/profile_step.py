"""Per-step engine overhead: decode step time in the model runner and between engine steps.

Runs on the CPU or a GPU. Two cases:

tiny-b1   the bundled llmir-tiny, one request, 64 new tokens: a decode step is almost all eager op
          dispatch on the CPU (the model is small), so this tracks the model's op count.
rand-b64  a small random Llama (hidden 64, 2 layers, vocab 4096), 64 requests of 32 prompt tokens,
          48 new tokens each: the model is cheap, so the engine step minus the runner step is the
          host work per step (scheduler, sampler, output processing).

shared-1b the issue's shared-prefix batch on a random Llama-3.2-1B (bf16, CUDA only): 64 requests of
          a 1,024-token shared prefix + 64 own tokens, 128 new tokens, compile on; also reports
          the time before the first decode step (prefill) and the whole run.

``--profile`` runs cProfile inside the engine thread during the first timed run of each case and
prints the top functions. Medians over the decode steps of the timed run (after a warm-up run).

    python benchmarks/gpu/profile_step.py [--cases tiny-b1,rand-b64] [--profile] [--repeat 3]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import BUNDLED, random_checkpoint  # noqa: E402

from llmir_lang.executor.attention import ForwardMode  # noqa: E402
from llmir_lang.executor.engine import Engine  # noqa: E402


def measure(eng: Engine, prompts: list[list[int]], new: int, prof: cProfile.Profile | None) -> dict:
    runner = eng.runner
    orig = runner.run
    recs: list[tuple[float, float, float]] = []  # (start, seconds, host seconds) of each decode step

    extends: list[tuple[float, float, int, int]] = []  # (start, seconds, requests, new tokens)

    def timed(sb, **kw):
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = orig(sb, **kw)
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        if sb.mode is ForwardMode.DECODE:
            recs.append((t0, time.perf_counter() - t0, runner.last_host_s))
        else:
            extends.append((t0, time.perf_counter() - t0, len(sb.reqs), sum(sb.extend_lens)))
        return out

    params = {"max_new_tokens": new, "ignore_eos": True}
    eng.generate([p[:-1] + [5 + (p[-1] + 1) % 4000] for p in prompts], params)  # warm-up, same shapes
    eng.flush_cache()
    runner.run = timed  # type: ignore[method-assign]
    try:
        if prof is not None:
            eng.call_in_engine_thread(prof.enable)
        t0 = time.perf_counter()
        eng.generate(prompts, params)
        total = time.perf_counter() - t0
        if prof is not None:
            eng.call_in_engine_thread(prof.disable)
    finally:
        del runner.run
    gaps = [b[0] - a[0] for a, b in zip(recs, recs[1:])]
    first = recs[0][0]
    return {
        "extends_before_decode": [
            f"at {(e[0] - t0) * 1e3:.1f} ms: {e[2]} req, {e[3]} tok, {e[1] * 1e3:.1f} ms"
            for e in extends
            if e[0] < first
        ],
        "steps": len(recs),
        "runner_ms": statistics.median(r[1] for r in recs) * 1e3,
        "engine_step_ms": statistics.median(gaps) * 1e3,
        "host_ms": statistics.median(r[2] for r in recs) * 1e3,
        "before_decode_ms": (recs[0][0] - t0) * 1e3,
        "total_ms": total * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="tiny-b1,rand-b64")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per case (best median kept)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumulative)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for case in a.cases.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            if case == "tiny-b1":
                folder, prompts, new = BUNDLED, [list(range(5, 37))], 64
            elif case == "rand-b64":
                random_checkpoint("cpu-tiny", Path(tmp))
                folder, new = Path(tmp), 48
                prompts = [[(7 * i + j) % 4000 + 5 for j in range(32)] for i in range(64)]
            elif case == "shared-1b":
                with torch.device(dev):
                    random_checkpoint("llama-3.2-1b", Path(tmp), dtype=torch.bfloat16)
                folder, new = Path(tmp), 128
                rng = random.Random(0)
                prefix = [rng.randrange(5, 4000) for _ in range(1024)]
                prompts = [prefix + [rng.randrange(5, 4000) for _ in range(64)] for _ in range(64)]
            else:
                raise SystemExit(f"unknown case {case!r}")
            kv = "8GB" if case == "shared-1b" else "256MB"
            with Engine(str(folder), device=dev, kv_memory=kv) as eng:
                if case == "shared-1b":
                    eng.call_in_engine_thread(lambda: eng.runner.set_compile(True))
                best = None
                for r in range(a.repeat):
                    prof = cProfile.Profile() if a.profile and r == 0 else None
                    m = measure(eng, prompts, new, prof)
                    if best is None or m["engine_step_ms"] < best["engine_step_ms"]:
                        best = m
                    if prof is not None:
                        s = io.StringIO()
                        pstats.Stats(prof, stream=s).sort_stats(a.sort).print_stats(35)
                        print(s.getvalue())
            assert best is not None
            print(f"{case}: extend steps before the first decode step: {best['extends_before_decode']}")
            print(
                f"{case} on {dev}: decode steps {best['steps']}, runner {best['runner_ms']:.3f} ms, "
                f"(host {best['host_ms']:.3f} ms), engine step {best['engine_step_ms']:.3f} ms, "
                f"outside the runner {best['engine_step_ms'] - best['runner_ms']:.3f} ms; "
                f"before the first decode step {best['before_decode_ms']:.1f} ms, "
                f"whole run {best['total_ms']:.1f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
