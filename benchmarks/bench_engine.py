"""Engine vs transformers ``generate`` on the same random weights, shared-prefix batch.

64 prompts = one 512-token shared prefix + 32 own tokens each; 32 new tokens each, EOS ignored,
greedy. Both run in this process on the same weights; prints tokens/s of each, the ratio, and the
share of prefill tokens served from the radix cache; writes benchmarks/results/engine_<device>_<date>.json.

    python benchmarks/bench_engine.py [--shape cpu-small] [--requests 64] [--prefix 512] [--own 32] [--new 32]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, random_checkpoint, table, write_result  # noqa: E402

from llmir_lang.executor.engine import Engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="cpu-small")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--own", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--dtype", default=None, help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument(
        "--hf-batch", type=int, default=0, help="transformers batch size (0 = all requests at once)"
    )
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype or ("bf16" if dev.type == "cuda" else "fp32")
    )
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf = random_checkpoint(args.shape, Path(tmp), dtype=dtype).to(dev)
        vocab = hf.config.vocab_size
        prefix = [rng.randrange(3, vocab) for _ in range(args.prefix)]
        prompts = [prefix + [rng.randrange(3, vocab) for _ in range(args.own)] for _ in range(args.requests)]
        total_new = args.requests * args.new

        # --- transformers: one batched generate (the usual way), same weights -----------------
        hf_bs = args.hf_batch or args.requests
        hf.generation_config.pad_token_id = 0
        t0 = time.perf_counter()
        hf_tokens = []
        for i in range(0, len(prompts), hf_bs):
            batch = torch.tensor(prompts[i : i + hf_bs], device=dev)
            with torch.no_grad():
                out = hf.generate(
                    batch,
                    attention_mask=torch.ones_like(batch),
                    max_new_tokens=args.new,
                    min_new_tokens=args.new,
                    do_sample=False,
                )
            hf_tokens.extend(out[:, batch.shape[1] :].tolist())
        if dev.type == "cuda":
            torch.cuda.synchronize()
        hf_s = time.perf_counter() - t0
        del hf
        if dev.type == "cuda":
            torch.cuda.empty_cache()

        # --- llmir engine ----------------------------------------------------------------------
        with Engine(tmp, device=dev, dtype=dtype, kv_memory="2GB" if dev.type == "cpu" else 0.5) as eng:
            eng.generate(prompts[0][:16], {"max_new_tokens": 2})  # warm-up (not timed)
            eng.flush_cache()
            before = eng.stats()
            t0 = time.perf_counter()
            res = eng.generate(prompts, {"max_new_tokens": args.new, "ignore_eos": True})
            ours_s = time.perf_counter() - t0
            after = eng.stats()
        cache = after["cache"]
        requested = cache["requested_tokens"] - before["cache"]["requested_tokens"]
        hit = cache["hit_tokens"] - before["cache"]["hit_tokens"]
        same = sum(r.token_ids == h for r, h in zip(res, hf_tokens))

    rows = [
        {"system": "transformers generate", "seconds": hf_s, "output tok/s": total_new / hf_s},
        {"system": "llmir engine", "seconds": ours_s, "output tok/s": total_new / ours_s},
    ]
    ratio = hf_s / ours_s
    print(f"device: {device_name()}  shape: {args.shape}  dtype: {dtype}")
    print(
        f"{args.requests} requests x ({args.prefix} shared + {args.own} own) prompt tokens, {args.new} new each"
    )
    print(table(rows, ["system", "seconds", "output tok/s"]))
    print(
        f"speedup: {ratio:.2f}x   prefill tokens from cache: {hit}/{requested} = {hit / max(requested, 1):.1%}"
    )
    print(f"greedy outputs identical to transformers: {same}/{len(res)}")
    path = write_result(
        "engine",
        {
            "args": vars(args),
            "transformers_s": hf_s,
            "llmir_s": ours_s,
            "speedup": ratio,
            "transformers_tok_s": total_new / hf_s,
            "llmir_tok_s": total_new / ours_s,
            "cache_hit_tokens": hit,
            "prefill_requested_tokens": requested,
            "cache_share": hit / max(requested, 1),
            "identical_outputs": same,
            "targets": {"cpu_speedup": 3.0, "cache_share": 0.8},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
