"""Engine benchmarks on a GPU (issue 5, engine part), per model shape, random bf16 weights.

shared    64 requests x (1024-token shared prefix + 64 own tokens), 128 new tokens each, EOS ignored,
          greedy: the engine against transformers ``generate`` on the same weights, in the same run.
roofline  decode step time at batch 1 and 64 (distinct 1024-token prompts) against the bandwidth
          roofline (weight bytes + KV bytes read) / 3.35 TB/s, for each runner variant
          (CUDA graphs with/without torch.compile of the elementwise modules, eager).
prefix    shared-prefix decode on vs off at batch 64 and 128 with 4k and 16k prefixes: the whole
          decode step in the engine, and attention alone (the backend's kernels, all layers).

A decode step time is the runner's ``run`` (host batch building + model), synchronized on both
sides; "engine step" is the time between consecutive decode steps (adds scheduling, sampling and
output processing). Both come from a run with those synchronizations, which also stop the
engine's run-ahead decode (step N+1 queued before step N's tokens are read), so the headline
figures come from untimed runs: the shared batch's wall time, with run-ahead on (set here)
and off, alternated; and the roofline section's ``wall_step_ms``, the wall time per decode step
of untimed ``generate`` calls (the difference between a long and a short run over the same
prompts, so prefill cancels out). Results: a table on stdout and JSON in ``--out`` (and
benchmarks/results/).

    python benchmarks/gpu/bench_engine_gpu.py --out DIR [--shapes llama-3.2-1b,llama-3-8b]
        [--sections shared,roofline,prefix] [--compile] [--budget 480]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS, device_name, random_checkpoint, table  # noqa: E402
from llmir_lang.kernels import triton_common, triton_decode, triton_gemv, triton_misc  # noqa: E402

from llmir_lang.executor.attention import ForwardMode  # noqa: E402
from llmir_lang.executor.engine import Engine  # noqa: E402

HBM_BYTES_PER_S = 3.35e12  # the yardstick (H100 SXM)
T0 = time.perf_counter()
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for a dry run of this script


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


class StepTimer:
    """Wraps ``engine.runner.run``: records every decode step while ``on``."""

    def __init__(self, eng: Engine):
        self.orig = eng.runner.run
        self.runner = eng.runner
        # (batch, kv tokens, seconds, start, host seconds building the inputs)
        self.records: list[tuple[int, int, float, float, float]] = []
        self.on = False
        eng.runner.run = self._run  # type: ignore[method-assign]

    def _run(self, sb, ahead_ids=None):
        if not self.on or sb.mode is not ForwardMode.DECODE:
            return self.orig(sb, ahead_ids)
        sync()
        t0 = time.perf_counter()
        out = self.orig(sb, ahead_ids)
        sync()
        dt = time.perf_counter() - t0
        self.records.append(
            (len(sb.reqs), sum(sb.prefix_lens) + len(sb.reqs), dt, t0, self.runner.last_host_s)
        )
        return out

    def measure(self, fn, batch: int) -> dict[str, float]:
        self.records = []
        self.on = True
        try:
            fn()
        finally:
            self.on = False
        recs = [r for r in self.records if r[0] == batch]
        if not recs:
            return {"steps": 0}
        starts = [r[3] for r in recs]
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        return {
            "steps": len(recs),
            "step_s": statistics.median(r[2] for r in recs),
            "kv_tokens": statistics.median(r[1] for r in recs),
            "engine_step_s": statistics.median(gaps) if gaps else float("nan"),
            "host_s": statistics.median(r[4] for r in recs),
        }


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter, except an untied input embedding (rows only)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        emb = model.model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    return total


def set_engine(eng: Engine, **attrs: Any) -> None:
    """Set engine attributes (``run_ahead``) on the engine thread, between steps."""
    eng.call_in_engine_thread(lambda: [setattr(eng, k, v) for k, v in attrs.items()])


def wall_step(eng: Engine, prompts: list[list[int]], short: int, long: int) -> float:
    """Seconds per decode step of untimed ``generate`` calls: (long run - short run) / (long - short),
    each over the same prompts with nothing cached, best of two."""
    times = {}
    for n in (short, long):
        best = float("inf")
        for _ in range(2):
            eng.flush_cache()
            sync()
            t0 = time.perf_counter()
            eng.generate(prompts, {"max_new_tokens": n, "ignore_eos": True})
            sync()
            best = min(best, time.perf_counter() - t0)
        times[n] = best
    return (times[long] - times[short]) / (long - short)


PDL_MODULES = (triton_gemv, triton_decode, triton_misc)


def set_runner(eng: Engine, **attrs: Any) -> None:
    def apply() -> None:
        r = eng.runner
        if "compile" in attrs:
            r.set_compile(attrs.pop("compile"))
        if "triton_linear" in attrs:
            r.set_triton_linear(attrs.pop("triton_linear"))
        pdl = attrs.pop("pdl", True)
        pdl_off = attrs.pop("pdl_off", ())  # kernel modules whose own PDL switch is off
        switches = [(triton_common, pdl)] + [(m, m.__name__.rsplit(".", 1)[1] not in pdl_off) for m in PDL_MODULES]
        if any(m.PDL != on for m, on in switches):  # graphs captured with the other launches are dropped
            for m, on in switches:
                m.PDL = on
            if r.graphs is not None:
                r.graphs.clear()
        small_chunk = attrs.pop("small_batch_min_chunk", 128)
        cfg = getattr(r.backend, "decode_config", None)
        if cfg is not None and cfg.small_batch_min_chunk != small_chunk:
            r.backend.decode_config = dataclasses.replace(cfg, small_batch_min_chunk=small_chunk)
            if r.graphs is not None:
                r.graphs.clear()
        fuse_rotary = attrs.pop("fuse_rotary", True)
        if getattr(r.backend, "fuse_rotary", fuse_rotary) != fuse_rotary:
            r.backend.fuse_rotary = fuse_rotary
            if r.graphs is not None:
                r.graphs.clear()
        if "fuse_rows" in attrs:
            r.model.fuse_rows = attrs.pop("fuse_rows")
            if r.graphs is not None:
                r.graphs.clear()
        for k, v in attrs.items():
            setattr(r, k, v)

    eng.call_in_engine_thread(apply)


def rand_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


# ---- section 1: shared-prefix batch vs transformers -------------------------------------------
def shared_prompts(seed: int, vocab: int, a: argparse.Namespace) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = rand_ids(rng, a.prefix, vocab)
    return [prefix + rand_ids(rng, a.own, vocab) for _ in range(a.requests)]


def run_transformers(
    hf, prompts: list[list[int]], new: int, runs: int
) -> tuple[list[float], list[list[int]]]:
    """Seconds of each of ``runs`` timed ``generate`` calls (one batch of all prompts) and the ids."""
    hf.generation_config.pad_token_id = 0
    batch = torch.tensor(prompts, device=DEV)
    times = []
    with torch.no_grad():
        hf.generate(batch[:2, :16], attention_mask=torch.ones_like(batch[:2, :16]), max_new_tokens=2)
        for _ in range(runs):
            sync()
            t0 = time.perf_counter()
            out = hf.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
            )
            sync()
            times.append(time.perf_counter() - t0)
    return times, out[:, batch.shape[1] :].tolist()


def teacher_forced(hf, prompts: list[list[int]], outputs: list[list[int]], k: int = 4) -> dict:
    """transformers' log-probabilities over our greedy tokens: how often ours is its argmax, and by
    how much it is worse where not (bf16 near-ties make exact sequence equality a poor check)."""
    gaps: list[float] = []
    with torch.no_grad():
        for p, o in zip(prompts[:k], outputs[:k]):
            logits = hf(torch.tensor([p + o], device=DEV)).logits[0, len(p) - 1 : -1].float()
            lp = torch.log_softmax(logits, -1)
            chosen = lp.gather(1, torch.tensor(o, device=DEV)[:, None])[:, 0]
            gaps += (lp.max(-1).values - chosen).tolist()
    return {
        "steps": len(gaps),
        "argmax_share": sum(g == 0 for g in gaps) / len(gaps),
        "max_logprob_gap": max(gaps),
        "mean_logprob_gap": sum(gaps) / len(gaps),
    }


def section_shared(
    eng: Engine, timer: StepTimer, a: argparse.Namespace, hf_times: list[float], hf_tokens: list[list[int]]
) -> tuple[dict, list[list[int]]]:
    vocab = eng.config.vocab_size
    params = {"max_new_tokens": a.new, "ignore_eos": True}
    eng.generate(shared_prompts(1, vocab, a), params)  # warm-up: graphs captured, kernels compiled
    eng.flush_cache()
    prompts = shared_prompts(0, vocab, a)
    # untimed runs (no synchronization inside), run-ahead on and off, alternated
    walls: dict[bool, list[float]] = {True: [], False: []}
    outs: dict[bool, list[list[int]]] = {}
    for _ in range(a.wall_runs):
        for ahead in (True, False):
            set_engine(eng, run_ahead=ahead)
            eng.flush_cache()
            sync()
            t0 = time.perf_counter()
            got = eng.generate(prompts, params)
            sync()
            walls[ahead].append(time.perf_counter() - t0)
            outs[ahead] = [r.token_ids for r in got]
    set_engine(eng, run_ahead=True)
    eng.flush_cache()
    before = eng.stats()
    shared_steps = eng.runner.num_shared_prefix_steps
    sync()
    t0 = time.perf_counter()
    timer.on = True
    timer.records = []
    try:
        res = eng.generate(prompts, params)
    finally:
        timer.on = False
    timed_s = time.perf_counter() - t0
    ours_s = min(walls[True])
    recs = [r for r in timer.records if r[0] == a.requests]
    starts = [r[3] for r in recs]
    decode_s = sum(r[2] for r in timer.records)
    after = eng.stats()
    total = a.requests * a.new
    same = sum(r.token_ids == h for r, h in zip(res, hf_tokens))
    agree = [
        next((i for i, (x, y) in enumerate(zip(r.token_ids, h)) if x != y), a.new)
        for r, h in zip(res, hf_tokens)
    ]
    hit = after["cache"]["hit_tokens"] - before["cache"]["hit_tokens"]
    req = after["cache"]["requested_tokens"] - before["cache"]["requested_tokens"]
    hf_s = min(hf_times)  # the baseline's best run: the conservative ratio
    stats = {
        "requests": a.requests,
        "prefix": a.prefix,
        "own": a.own,
        "new": a.new,
        "transformers_s": hf_s,
        "transformers_runs_s": hf_times,
        "transformers_tok_s": total / hf_s,
        "llmir_s": ours_s,
        "llmir_tok_s": total / ours_s,
        "llmir_runs_s": walls[True],
        "llmir_no_run_ahead_s": min(walls[False]),
        "llmir_no_run_ahead_runs_s": walls[False],
        "run_ahead_speedup": min(walls[False]) / ours_s,
        "run_ahead_same_tokens": outs[True] == outs[False],
        "llmir_timed_run_s": timed_s,
        "speedup": hf_s / ours_s,
        "target_speedup": 20.0,
        "identical_outputs": same,
        "mean_agreeing_prefix_tokens": sum(agree) / len(agree),
        "cache_share": hit / max(req, 1),
        "shared_prefix_decode_steps": eng.runner.num_shared_prefix_steps - shared_steps,
        "decode_steps": len(timer.records),
        "decode_step_ms": statistics.median(r[2] for r in recs) * 1e3 if recs else None,
        "decode_host_ms": statistics.median(r[4] for r in recs) * 1e3 if recs else None,
        "engine_step_ms": statistics.median(b - a for a, b in zip(starts, starts[1:])) * 1e3
        if len(starts) > 1
        else None,
        "time_in_model_decode_s": decode_s,
    }
    return stats, [r.token_ids for r in res]


# ---- section 2: decode step vs the roofline ----------------------------------------------------
VARIANTS = {
    "graphs+compile": dict(cuda_graphs=True, compile=True, triton_linear=True, fuse_rows=True),
    # Triton projections, but each norm and SwiGLU's product as its own kernel at batch 1 too
    "graphs+compile+unfused": dict(cuda_graphs=True, compile=True, triton_linear=True, fuse_rows=False),
    # the same with every kernel launched without PDL (triton_common.PDL off: the one-row
    # projections, the rotary + KV store, decode attention)
    "graphs+compile+nopdl": dict(
        cuda_graphs=True, compile=True, triton_linear=True, fuse_rows=True, pdl=False
    ),
    # the same with the rotary as its own (compiled) kernel and store_kv after it (PDL on the
    # projections and decode attention)
    "graphs+compile+rope_apart": dict(
        cuda_graphs=True, compile=True, triton_linear=True, fuse_rows=True, fuse_rotary=False
    ),
    # PDL on the one-row projections only (fused rotary + store kept)
    "graphs+compile+pdl_gemv": dict(
        cuda_graphs=True, compile=True, triton_linear=True, fuse_rows=True, pdl_off=("triton_decode", "triton_misc")
    ),
    # the eighteenth session's step: rotary apart, PDL on the projections only
    "graphs+compile+s18": dict(
        cuda_graphs=True,
        compile=True,
        triton_linear=True,
        fuse_rows=True,
        fuse_rotary=False,
        pdl_off=("triton_decode", "triton_misc"),
    ),
    # the same with small batches split as large ones (decode attention's min_chunk 256, as
    # before the nineteenth session)
    "graphs+compile+chunk256": dict(
        cuda_graphs=True, compile=True, triton_linear=True, fuse_rows=True, small_batch_min_chunk=256
    ),
    # the same with every projection through cuBLAS (F.linear), not the Triton GEMV kernels
    "graphs+compile+cublas": dict(cuda_graphs=True, compile=True, triton_linear=False),
    "graphs": dict(cuda_graphs=True, compile=False, triton_linear=True),
    "eager": dict(cuda_graphs=False, compile=False, triton_linear=True),
    # the two above with the rotary (plain torch ops) and store_kv apart
    "graphs+rope_apart": dict(cuda_graphs=True, compile=False, triton_linear=True, fuse_rotary=False),
    "eager+rope_apart": dict(cuda_graphs=False, compile=False, triton_linear=True, fuse_rotary=False),
}


def section_roofline(eng: Engine, timer: StepTimer, a: argparse.Namespace) -> list[dict]:
    vocab = eng.config.vocab_size
    wbytes = weight_bytes(eng.model)
    tok_bytes = eng.pool.bytes_per_token
    rows = []
    for variant in a.variants:
        set_runner(eng, shared_prefix=False, **dict(VARIANTS[variant]))
        for batch in a.batches:
            rng = random.Random(100 + batch)
            prompts = [rand_ids(rng, a.ctx, vocab) for _ in range(batch)]
            new = 48 if batch == 1 else 24
            params = {"max_new_tokens": new, "ignore_eos": True}
            eng.generate(prompts[:batch], {"max_new_tokens": 3, "ignore_eos": True})  # capture / compile
            eng.flush_cache()
            m = timer.measure(lambda p=prompts, q=params: eng.generate(p, q), batch)
            if not m.get("steps"):
                continue
            wall = wall_step(eng, prompts, 8, 8 + new) if a.wall_steps else float("nan")
            roof = (wbytes + m["kv_tokens"] * tok_bytes) / HBM_BYTES_PER_S
            rows.append(
                {
                    "variant": variant,
                    "batch": batch,
                    "ctx": a.ctx,
                    "steps": m["steps"],
                    "step_ms": m["step_s"] * 1e3,
                    "engine_step_ms": m["engine_step_s"] * 1e3,
                    "host_ms": m["host_s"] * 1e3,
                    "roofline_ms": roof * 1e3,
                    "pct_of_roofline": 100 * roof / m["step_s"],
                    "wall_step_ms": wall * 1e3,
                    "run_ahead": eng.run_ahead,
                    "pct_of_roofline_wall": 100 * roof / wall,
                    "weight_GB": wbytes / 1e9,
                    "kv_GB": m["kv_tokens"] * tok_bytes / 1e9,
                }
            )
            log(
                f"roofline {variant} b{batch}: {rows[-1]['step_ms']:.3f} ms, {rows[-1]['pct_of_roofline']:.1f}%"
            )
    set_runner(eng, shared_prefix=True, **dict(VARIANTS[a.main_variant]))
    return rows


# ---- section 3: shared-prefix decode on vs off -------------------------------------------------
def graph_time(fn, iters: int = 20, reps: int = 10) -> float:
    """Median seconds of one call of ``fn`` replayed as a CUDA graph (``reps`` replays back to back
    per timed window, so host delays between launches do not count)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(iters + 3):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3 / reps)
    return statistics.median(times[3:])


def attention_on_off(eng: Engine, batch: int, plen: int, suffix: int) -> tuple[float, float]:
    """Per-layer attention seconds, (shared-prefix path, plain decode), on the engine's pool."""
    from llmir_lang.kernels import triton_decode as td
    from llmir_lang.kernels import triton_shared_prefix as tsp

    cfg, be = eng.config, eng.backend
    kb, vb = eng.pool.k_buffers[0], eng.pool.v_buffers[0]
    dev = kb.device
    q = torch.randn(batch, cfg.num_heads, cfg.head_dim, dtype=kb.dtype, device=dev)
    prefix = torch.arange(plen, device=dev)
    suffixes = torch.arange(plen, plen + batch * suffix, device=dev).view(batch, suffix)
    suf_indptr = torch.arange(0, batch * suffix + 1, suffix, device=dev)
    kv_indices = torch.cat([prefix.expand(batch, plen), suffixes], 1).reshape(-1)
    kv_indptr = torch.arange(0, batch * (plen + suffix) + 1, plen + suffix, device=dev)
    cfg_d = be.decode_config
    splits = td.split_cap(batch, kb.shape[1], cfg_d, dev)
    ws = td.alloc_partials(batch, cfg.num_heads, splits, cfg.head_dim, dev)
    scale = cfg.head_dim**-0.5
    on = graph_time(
        lambda: tsp.shared_prefix_decode(q, kb, vb, prefix, suf_indptr, suffixes.reshape(-1), scale)
    )
    off = graph_time(
        lambda: td.decode_attention(q, kb, vb, kv_indptr, kv_indices, scale, workspace=ws, config=cfg_d)
    )
    return on, off


def section_prefix(eng: Engine, timer: StepTimer, a: argparse.Namespace) -> list[dict]:
    from llmir_lang.kernels import policy

    vocab = eng.config.vocab_size
    per_layer = 2 * eng.config.num_kv_heads * eng.config.head_dim * eng.pool.k_buffers[0].element_size()
    rows = []
    for plen in a.prefix_lens:
        rng = random.Random(plen)
        prefix = rand_ids(rng, plen, vocab)
        eng.generate(prefix + [5], {"max_new_tokens": 1})  # the prefix is now cached
        for batch in a.prefix_batches:
            if time.perf_counter() - T0 > a.budget:
                log("prefix: out of time budget, stopping")
                return rows
            res: dict[str, Any] = {"prefix": plen, "batch": batch}
            for mode in ("on", "off"):
                set_runner(eng, shared_prefix=mode == "on")
                prompts = [prefix + rand_ids(rng, a.prefix_own, vocab) for _ in range(batch)]
                params = {"max_new_tokens": a.prefix_new, "ignore_eos": True}
                before = eng.runner.num_shared_prefix_steps
                m = timer.measure(lambda p=prompts, q=params: eng.generate(p, q), batch)
                res[f"step_ms_{mode}"] = m.get("step_s", float("nan")) * 1e3
                res[f"shared_steps_{mode}"] = eng.runner.num_shared_prefix_steps - before
            res["step_speedup"] = res["step_ms_off"] / res["step_ms_on"]
            res["rule_says_use"] = policy.should_use_shared_prefix(plen, batch, per_layer)
            if DEV == "cuda":
                eng.call_in_engine_thread(lambda: None)  # the engine is idle: no GIL contention
                on, off = attention_on_off(eng, batch, plen, a.prefix_own + a.prefix_new // 2)
                layers = eng.config.num_layers
                res.update(
                    attn_ms_on=on * layers * 1e3, attn_ms_off=off * layers * 1e3, attn_speedup=off / on
                )
            rows.append(res)
            log(
                f"prefix {plen} b{batch}: step {res['step_speedup']:.2f}x, attention {res.get('attn_speedup')}"
            )
    set_runner(eng, shared_prefix=True)
    return rows


# ---- driver ------------------------------------------------------------------------------------
def make_checkpoint(shape: str, folder: Path):
    with torch.device(DEV):  # random init on the GPU: seconds instead of minutes for 8B
        return random_checkpoint(shape, folder, dtype=torch.bfloat16)


def run_shape(shape: str, a: argparse.Namespace, out: dict) -> None:
    res: dict[str, Any] = {}
    out["shapes"][shape] = res
    folder = Path(tempfile.mkdtemp(prefix=f"bench_{shape}_"))
    try:
        hf = make_checkpoint(shape, folder)
        log(f"{shape}: checkpoint saved")
        hf_times: list[float] = []
        hf_tokens: list[list[int]] = []
        if "shared" in a.sections:
            prompts = shared_prompts(0, hf.config.vocab_size, a)
            hf_times, hf_tokens = run_transformers(hf, prompts, a.new, a.hf_runs)
            log(f"{shape}: transformers {a.requests * a.new / min(hf_times):.0f} tok/s (best of {a.hf_runs})")
        # keep a small model to check the engine's greedy tokens against it afterwards
        keep = "shared" in a.sections and weight_bytes(hf) < 6e9
        if not keep:
            del hf
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
        kv = a.kv_memory if DEV == "cuda" else "1GB"
        with Engine(str(folder), device=DEV, dtype=torch.bfloat16, kv_memory=kv) as eng:
            timer = StepTimer(eng)
            set_runner(eng, **dict(VARIANTS[a.main_variant]))
            res["variant"] = a.main_variant
            res["weight_GB"] = weight_bytes(eng.model) / 1e9
            res["kv_pool_tokens"] = eng.pool.capacity
            if "shared" in a.sections:
                res["shared"], ours = section_shared(eng, timer, a, hf_times, hf_tokens)
                s = res["shared"]
                if keep:
                    try:
                        s["teacher_forced"] = teacher_forced(hf, prompts, ours)
                    except Exception as e:
                        s["teacher_forced"] = f"failed: {type(e).__name__}: {e}"
                    del hf
                    gc.collect()
                log(f"{shape}: engine {s['llmir_tok_s']:.0f} tok/s, {s['speedup']:.1f}x transformers")
                save(out, a)
            if "roofline" in a.sections and time.perf_counter() - T0 < a.budget:
                res["roofline"] = section_roofline(eng, timer, a)
                save(out, a)
            if "prefix" in a.sections and time.perf_counter() - T0 < a.budget:
                res["prefix"] = section_prefix(eng, timer, a)
                save(out, a)
            res["runner"] = {
                "graph_captures": eng.runner.graphs.num_captures if eng.runner.graphs else 0,
                "graph_replays": eng.runner.num_graph_replays,
                "shared_prefix_steps": eng.runner.num_shared_prefix_steps,
                "slot_row_uploads": eng.runner.table.num_row_uploads,
            }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save(out: dict, a: argparse.Namespace) -> None:
    dev = device_name().replace(" ", "_")
    name = f"engine_gpu_{dev}_{date.today().isoformat()}{a.suffix}.json"
    text = json.dumps(out, indent=2, default=str)
    for folder in [Path(a.out)] + ([RESULTS] if a.results else []):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def report(out: dict) -> None:
    for shape, res in out["shapes"].items():
        print(f"\n=== {shape} ({res.get('variant')}) on {out['device']} ===")
        if "shared" in res:
            s = res["shared"]
            print(
                table(
                    [
                        {
                            "system": "transformers generate",
                            "s": s["transformers_s"],
                            "tok/s": s["transformers_tok_s"],
                        },
                        {"system": "llmir engine", "s": s["llmir_s"], "tok/s": s["llmir_tok_s"]},
                        {
                            "system": "llmir engine, run-ahead off",
                            "s": s["llmir_no_run_ahead_s"],
                            "tok/s": s["requests"] * s["new"] / s["llmir_no_run_ahead_s"],
                        },
                    ],
                    ["system", "s", "tok/s"],
                )
            )
            print(
                f"speedup {s['speedup']:.1f}x (target 20x); identical greedy outputs {s['identical_outputs']}"
            )
            if s.get("decode_step_ms") is not None:
                print(
                    f"decode step {s['decode_step_ms']:.2f} ms in the model, {s['engine_step_ms']:.2f} ms engine"
                )
            if "teacher_forced" in s:
                print(f"transformers over our greedy tokens: {s['teacher_forced']}")
        if res.get("roofline"):
            cols = ["variant", "batch", "ctx", "step_ms", "host_ms", "engine_step_ms", "roofline_ms"]
            cols += ["pct_of_roofline", "wall_step_ms", "pct_of_roofline_wall"]
            print(table(res["roofline"], cols))
        if res.get("prefix"):
            cols = [
                "prefix",
                "batch",
                "step_ms_on",
                "step_ms_off",
                "step_speedup",
                "attn_ms_on",
                "attn_ms_off",
            ]
            print(table(res["prefix"], cols + ["attn_speedup", "rule_says_use"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--results", action="store_true", help="also write into benchmarks/results/")
    ap.add_argument("--suffix", default="", help="appended to the result file's name (e.g. _s2)")
    ap.add_argument("--shapes", default="llama-3.2-1b")
    ap.add_argument("--sections", default="shared,roofline,prefix")
    ap.add_argument("--variant", dest="main_variant", default="graphs+compile", choices=list(VARIANTS))
    ap.add_argument("--variants", default="graphs+compile,graphs,eager", help="roofline variants")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--own", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prefix-lens", default="4096,16384")
    ap.add_argument("--prefix-batches", default="64,128")
    ap.add_argument("--prefix-own", type=int, default=16)
    ap.add_argument("--prefix-new", type=int, default=12)
    ap.add_argument("--kv-memory", default="0.8")
    ap.add_argument("--hf-runs", type=int, default=2, help="timed transformers runs (best is used)")
    ap.add_argument("--wall-runs", type=int, default=2, help="untimed engine runs of each run-ahead mode")
    ap.add_argument(
        "--no-wall-steps", dest="wall_steps", action="store_false", help="skip the roofline's untimed steps"
    )
    ap.add_argument("--budget", type=float, default=480.0, help="seconds; later work is skipped past it")
    a = ap.parse_args()
    a.sections = a.sections.split(",")
    a.variants = a.variants.split(",")
    a.batches = [int(x) for x in a.batches.split(",")]
    a.prefix_lens = [int(x) for x in a.prefix_lens.split(",")]
    a.prefix_batches = [int(x) for x in a.prefix_batches.split(",")]
    a.kv_memory = float(a.kv_memory) if "." in a.kv_memory else a.kv_memory
    import triton

    out: dict[str, Any] = {
        "benchmark": "engine_gpu",
        "device": device_name(),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join(sys.argv),
        "hbm_bytes_per_s": HBM_BYTES_PER_S,
        "shapes": {},
    }
    for shape in a.shapes.split(","):
        if time.perf_counter() - T0 > a.budget:
            out["shapes"][shape] = {"skipped": "time budget"}
            continue
        try:
            run_shape(shape, a, out)
        except Exception as e:  # keep what the other shapes measured
            out["shapes"].setdefault(shape, {})["error"] = f"{type(e).__name__}: {e}"
            log(f"{shape}: FAILED {type(e).__name__}: {e}")
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
        save(out, a)
    out["total_s"] = time.perf_counter() - T0
    save(out, a)
    report(out)


if __name__ == "__main__":
    main()
