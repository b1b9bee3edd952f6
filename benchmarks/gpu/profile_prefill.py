"""Where the time before the first decode step of the shared-prefix batch goes (CUDA only).

The issue's shared-prefix batch on a random bf16 Llama-3.2-1B (64 requests of one 1,024-token prefix
plus 64 own tokens) spends 80-90 ms before its first decode step (``profile_step.py``), against
about 25 ms of prefill arithmetic. This records that phase of a warm run with ``torch.profiler``
(host and GPU), and prints the engine's own extend steps (start, length, tokens), the GPU kernel time
by kernel, and the host functions by self time, so host gaps and slow kernels can be told apart.

    python3 benchmarks/gpu/profile_prefill.py [--requests 64 --prefix 1024 --own 64]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import random_checkpoint  # noqa: E402

from llmir_lang.executor.attention import ForwardMode  # noqa: E402
from llmir_lang.executor.engine import Engine  # noqa: E402


def ab_rounds(eng: Engine, prompts: list[list[int]], params: dict, rounds: int) -> None:
    """Time the phase before the first decode step with the engine's rule for the extends'
    elementwise ops (plain ops up to ``plain_extend_tokens`` tokens, compiled above), with the
    compiled ops on every extend, and with the plain ops on every extend (decode steps keep the
    compiled ones), alternating, each after a cache flush."""
    from llmir_lang.executor.model import PLAIN_OPS

    runner, model = eng.runner, eng.runner.model
    compiled, rule = model.ops, model.plain_extend_tokens
    orig = runner.run
    arms = (("engine rule", compiled, rule), ("compiled", compiled, 0), ("plain", PLAIN_OPS, 0))
    res: dict[str, list[tuple[float, list[tuple[float, float]]]]] = {name: [] for name, _, _ in arms}
    for _ in range(rounds):
        for name, ops, limit in arms:
            extends: list[tuple[float, float]] = []  # (start, seconds with a sync)
            first: list[float] = []

            def run(sb, ops=ops, limit=limit, extends=extends, first=first, **kw):
                if sb.mode is ForwardMode.DECODE:
                    if not first:
                        torch.cuda.synchronize()
                        first.append(time.perf_counter())
                    return orig(sb, **kw)
                model.ops, model.plain_extend_tokens = ops, limit
                try:
                    t0 = time.perf_counter()
                    out = orig(sb, **kw)
                    torch.cuda.synchronize()
                    extends.append((t0, time.perf_counter() - t0))
                    return out
                finally:
                    model.ops, model.plain_extend_tokens = compiled, rule

            runner.run = run  # type: ignore[method-assign]
            eng.flush_cache()
            t_start = time.perf_counter()
            try:
                eng.generate(prompts, params)
            finally:
                del runner.run
            at = (first[0] - t_start) * 1e3 if first else float("nan")
            res[name].append((at, [((t0 - t_start) * 1e3, dt * 1e3) for t0, dt in extends]))
    for name, rows in res.items():
        for at, ext in rows:
            desc = ", ".join(f"{dt:.1f} ms at {t0:.1f}" for t0, dt in ext)
            print(f"  {name:11s} first decode step at {at:6.1f} ms; extends (with a sync): {desc}")


def host_split(eng: Engine, prompts: list[list[int]], params: dict, rounds: int = 3) -> None:
    """Host time of each extend's forward by part (projections, elementwise ops, attention, the
    rest), measured without synchronizing inside, against the forward's time with a sync at the end.
    A forward whose host time is close to its synchronized time is bound by host work."""
    from dataclasses import fields, replace

    runner = eng.runner
    model, backend = runner.model, runner.backend
    parts: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                parts[name] += time.perf_counter() - t0

        return wrapper

    orig_ops, orig_linear, orig_attn, orig_fwd = model.ops, model.linear, backend.forward, model.forward
    model.ops = replace(
        orig_ops, **{f.name: timed(f.name, getattr(orig_ops, f.name)) for f in fields(orig_ops)}
    )
    model.linear = timed("linear", orig_linear)
    backend.forward = timed("attention", orig_attn)  # type: ignore[method-assign]
    rows: list[str] = []

    def fwd(batch, be):
        if batch.mode is ForwardMode.DECODE:
            return orig_fwd(batch, be)
        parts.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = orig_fwd(batch, be)
        enqueue = time.perf_counter() - t0
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        split = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        rest = enqueue - sum(parts.values())
        rows.append(
            f"  {int(batch.input_ids.shape[0]):5d} tokens: forward {total * 1e3:6.2f} ms with a sync, host "
            f"{enqueue * 1e3:6.2f} ms ({split}, rest {rest * 1e3:.2f})"
        )
        return out

    model.forward = fwd  # type: ignore[method-assign]
    try:
        for _ in range(rounds):
            eng.flush_cache()
            eng.generate(prompts, params)
    finally:
        model.ops, model.linear = orig_ops, orig_linear
        del backend.forward, model.forward
    print("extend forwards (ms):")
    print("\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--own", type=int, default=64)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument(
        "--host-split",
        action="store_true",
        help="no profiler: each extend's host time (enqueue, no sync) by part, against its time with a sync",
    )
    ap.add_argument(
        "--host-only", action="store_true", help="cProfile only (no torch.profiler), by cumulative time"
    )
    ap.add_argument(
        "--ab",
        type=int,
        default=0,
        help="no profiler: N alternating rounds of extends with the compiled ops and with the plain ones",
    )
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("cuda"):
            random_checkpoint("llama-3.2-1b", Path(tmp), dtype=torch.bfloat16)
        rng = random.Random(0)
        head = [rng.randrange(5, 4000) for _ in range(a.prefix)]
        prompts = [head + [rng.randrange(5, 4000) for _ in range(a.own)] for _ in range(a.requests)]
        params = {"max_new_tokens": a.new, "ignore_eos": True}
        with Engine(tmp, device="cuda", kv_memory="8GB") as eng:
            eng.call_in_engine_thread(lambda: eng.runner.set_compile(True))
            for _ in range(2):  # warm-up: compile, graphs, Triton kernels at these shapes
                eng.generate([p[:-1] + [5 + (p[-1] + 1) % 4000] for p in prompts], params)
                eng.flush_cache()
            if a.ab:
                ab_rounds(eng, prompts, params, a.ab)
                return
            if a.host_split:
                host_split(eng, prompts, params)
                return
            runner = eng.runner
            orig = runner.run
            marks: list[tuple[float, float, str]] = []
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            host = cProfile.Profile()
            state = {"decode": False, "started": False}

            def run(sb, **kw):  # runs in the engine thread, like the profilers' start and stop
                if sb.mode is ForwardMode.DECODE and not state["decode"]:
                    state["decode"] = True
                    torch.cuda.synchronize()
                    host.disable()
                    marks.append((time.perf_counter(), 0.0, "first decode step"))
                    if state["started"] and not a.host_only:
                        prof.stop()
                if not state["decode"] and not state["started"]:
                    state["started"] = True
                    if not a.host_only:
                        prof.start()
                t0 = time.perf_counter()
                out = orig(sb, **kw)
                if not state["decode"]:
                    torch.cuda.synchronize()
                    what = f"{sb.mode.name} {len(sb.reqs)} req {sum(sb.extend_lens)} tok"
                    marks.append((t0, time.perf_counter() - t0, what))
                return out

            runner.run = run  # type: ignore[method-assign]
            eng.call_in_engine_thread(host.enable)
            t_start = time.perf_counter()
            try:
                eng.generate(prompts, params)
            finally:
                del runner.run
    for t, dur, what in marks:
        print(f"  at {(t - t_start) * 1e3:7.1f} ms: {what} ({dur * 1e3:.1f} ms with a sync)")
    if a.host_only:
        buf = io.StringIO()
        pstats.Stats(host, stream=buf).sort_stats("cumulative").print_stats(60)
        print("engine thread until the first decode step (cProfile, cumulative):", buf.getvalue())
        return
    gpu: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    cpu: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages():
        dt = getattr(ev, "self_device_time_total", 0) or 0  # a kernel's own time, counted once
        if dt > 0:
            gpu[ev.key] = [dt, ev.count]
        st = getattr(ev, "self_cpu_time_total", 0) or 0
        if st > 0:
            cpu[ev.key] = [st, ev.count]
    total_gpu = sum(v[0] for v in gpu.values())
    print(f"GPU kernel time before the first decode step: {total_gpu / 1e3:.1f} ms")
    for k, (us, n) in sorted(gpu.items(), key=lambda kv: -kv[1][0])[:20]:
        print(f"   {us / 1e3:8.2f} ms {n:6d}x  {k[:110]}")
    buf = io.StringIO()
    pstats.Stats(host, stream=buf).sort_stats("tottime").print_stats(30)
    print("engine thread until the first decode step (cProfile):", buf.getvalue())
    print("host ops by self time:")
    for k, (us, n) in sorted(cpu.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"   {us / 1e3:8.2f} ms {n:6d}x  {k[:110]}")


if __name__ == "__main__":
    main()
