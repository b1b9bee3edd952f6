"""Per-step engine overhead: decode step time in the model runner and between engine steps.

Runs on the CPU or a GPU. Two cases:

tiny-b1   the bundled llmir-tiny, one request, 64 new tokens: a decode step is almost all eager op
          dispatch on the CPU (the model is small), so this tracks the model's op count.
rand-b64  a small random Llama (hidden 64, 2 layers, vocab 4096), 64 requests of 32 prompt tokens,
          48 new tokens each: the model is cheap, so the engine step minus the runner step is the
          host work per step (scheduler, sampler, output processing).

``--profile`` runs cProfile inside the engine thread during the rand-b64 run and prints the top
functions by own time. Medians over the decode steps of the timed run (after a warm-up run).

    python benchmarks/gpu/profile_step.py [--cases tiny-b1,rand-b64] [--profile] [--repeat 3]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import BUNDLED, save_tokenizer  # noqa: E402

from llmir_lang.executor.attention import ForwardMode  # noqa: E402
from llmir_lang.executor.engine import Engine  # noqa: E402


def _random_folder(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        max_position_embeddings=1024,
        eos_token_id=0,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder), safe_serialization=True)
    save_tokenizer(folder)


def measure(eng: Engine, prompts: list[list[int]], new: int, prof: cProfile.Profile | None) -> dict:
    runner = eng.runner
    orig = runner.run
    recs: list[tuple[float, float, float]] = []  # (start, seconds, host seconds) of each decode step

    def timed(sb):
        if sb.mode is not ForwardMode.DECODE:
            return orig(sb)
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = orig(sb)
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        recs.append((t0, time.perf_counter() - t0, runner.last_host_s))
        return out

    params = {"max_new_tokens": new, "ignore_eos": True}
    eng.generate(prompts, params)  # warm-up
    eng.flush_cache()
    runner.run = timed  # type: ignore[method-assign]
    try:
        if prof is not None:
            eng.call_in_engine_thread(prof.enable)
        eng.generate(prompts, params)
        if prof is not None:
            eng.call_in_engine_thread(prof.disable)
    finally:
        del runner.run
    gaps = [b[0] - a[0] for a, b in zip(recs, recs[1:])]
    return {
        "steps": len(recs),
        "runner_ms": statistics.median(r[1] for r in recs) * 1e3,
        "engine_step_ms": statistics.median(gaps) * 1e3,
        "host_ms": statistics.median(r[2] for r in recs) * 1e3,
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
                _random_folder(Path(tmp))
                folder, new = Path(tmp), 48
                prompts = [[(7 * i + j) % 4000 + 5 for j in range(32)] for i in range(64)]
            else:
                raise SystemExit(f"unknown case {case!r}")
            with Engine(str(folder), device=dev, kv_memory="256MB") as eng:
                best = None
                for r in range(a.repeat):
                    prof = cProfile.Profile() if a.profile and case == "rand-b64" and r == 0 else None
                    m = measure(eng, prompts, new, prof)
                    if best is None or m["engine_step_ms"] < best["engine_step_ms"]:
                        best = m
                    if prof is not None:
                        s = io.StringIO()
                        pstats.Stats(prof, stream=s).sort_stats(a.sort).print_stats(35)
                        print(s.getvalue())
            assert best is not None
            print(
                f"{case} on {dev}: decode steps {best['steps']}, runner {best['runner_ms']:.3f} ms, "
                f"(host {best['host_ms']:.3f} ms), engine step {best['engine_step_ms']:.3f} ms, "
                f"outside the runner {best['engine_step_ms'] - best['runner_ms']:.3f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
