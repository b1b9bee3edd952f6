"""Prompt-lookup speculation on CUDA: does it pay at batch 1? (``executor/speculate.py``)

Runs ``benchmarks/bench_json.py``'s sequential workload (the bundled ``llmir-tiny``, fresh
extraction texts, one request at a time) on a CUDA engine, with speculation off and with drafts of
``--draft-tokens``, for JSON extraction with jump-forward and for unconstrained extraction, with
short extends (jump-forward's forced text, speculative drafts) run as graphed decode rows
(``ModelRunner.max_row_extend=8``, the CUDA default) and as eager extends (0), in ``--rounds``
interleaved rounds (fastest kept). That the outputs are the same with and without
speculation is checked by ``tests/executor/test_engine_paths_gpu.py``. Speculation is off by
default on CUDA; this is the measurement that decides whether that default should change.

    python benchmarks/gpu/bench_spec_gpu.py --out DIR [--records 60] [--rounds 3] [--dtype bfloat16]

Writes ``DIR/spec_gpu_<device>_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_json as bj  # noqa: E402

from llmir_lang.executor.backend import EngineBackend  # noqa: E402
from llmir_lang.executor.engine import Engine  # noqa: E402
from llmir_lang.models.tiny_tasks import extraction_items  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--records", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draft-tokens", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    t0 = time.perf_counter()
    eng = Engine(device="cuda", dtype=args.dtype, kv_memory="2GiB")
    print(f"engine up in {time.perf_counter() - t0:.1f} s", flush=True)
    backend = EngineBackend(eng)
    tok = eng.tokenizer

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False)) if text else 0

    items = extraction_items(args.records, 2027)
    warm = extraction_items(6, seed=1)
    configs = [
        (s, k, rows)
        for s in ("llmir-json-jf", "llmir-free")
        for k in (0, args.draft_tokens)
        for rows in (0, 8)
    ]
    for system, k, rows in configs:
        eng.runner.max_row_extend = rows
        bj.run_llmir(backend, system, "sequential", warm, count, k)
    runs: dict[tuple[str, int, int], list[bj.RunResult]] = {}
    for _ in range(args.rounds):
        for system, k, rows in configs:
            eng.runner.max_row_extend = rows
            r = bj.run_llmir(backend, system, "sequential", items, count, k)
            runs.setdefault((system, k, rows), []).append(r)
            print(
                f"{system:14s} draft {k} rows {rows}: {r.seconds:6.2f} s  {r.forward_calls} forwards",
                flush=True,
            )
    eng.shutdown()
    rows = []
    for (system, k, max_rows), rs in runs.items():
        best = min(rs, key=lambda r: r.seconds)
        rows.append(
            {
                "system": system,
                "draft_tokens": k,
                "max_row_extend": max_rows,
                "seconds": round(best.seconds, 3),
                "all_seconds": [round(r.seconds, 3) for r in rs],
                "tokens_per_s": round(best.tokens_per_s, 1),
                "forward_calls": best.forward_calls,
                "valid": best.schema_valid,
                "records": best.records,
                "spec_draft_tokens": best.extra.get("spec_draft_tokens"),
                "spec_accepted_tokens": best.extra.get("spec_accepted_tokens"),
            }
        )

    def secs(system: str, k: int, max_rows: int) -> float:
        return next(
            r["seconds"]
            for r in rows
            if (r["system"], r["draft_tokens"], r["max_row_extend"]) == (system, k, max_rows)
        )

    ratios = {}
    for system in ("llmir-json-jf", "llmir-free"):
        for max_rows in (0, 8):
            ratios[f"{system}_rows{max_rows}_spec_vs_off"] = round(
                secs(system, 0, max_rows) / secs(system, args.draft_tokens, max_rows), 3
            )
        for k in (0, args.draft_tokens):
            ratios[f"{system}_draft{k}_rows8_vs_rows0"] = round(secs(system, k, 0) / secs(system, k, 8), 3)
    ratios["jf_vs_free_rows8_nospec"] = round(secs("llmir-free", 0, 8) / secs("llmir-json-jf", 0, 8), 3)
    ratios["jf_vs_free_rows0_nospec"] = round(secs("llmir-free", 0, 0) / secs("llmir-json-jf", 0, 0), 3)
    print("\nsystem          draft rows  secs    tok/s  forwards  drafted  kept")
    for r in rows:
        print(
            f"{r['system']:14s} {r['draft_tokens']:5d} {r['max_row_extend']:4d} {r['seconds']:6.2f} "
            f"{r['tokens_per_s']:8.1f} {r['forward_calls']:9d} {r['spec_draft_tokens']:8d} "
            f"{r['spec_accepted_tokens']:5d}"
        )
    for k, v in ratios.items():
        print(f"{k:32s} {v:.3f}x")
    dev = torch.cuda.get_device_name().replace(" ", "_")
    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "records": args.records,
        "rounds": args.rounds,
        "rows": rows,
        "ratios": ratios,
        "command": "python benchmarks/gpu/bench_spec_gpu.py --out $OUT",
    }
    path = Path(args.out) / f"spec_gpu_{dev}_{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
