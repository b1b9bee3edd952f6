"""JSON extraction benchmark: llmir with jump-forward vs llmir unconstrained vs Outlines, one run.

Same model (the bundled ``llmir-tiny``, fp32 on the CPU), same prompts (fresh extraction texts,
``tiny_tasks.extraction_prompt``), same schemas (``tiny_tasks.SCHEMAS``), greedy decoding:

====================  ==========================================================================
system                what runs
====================  ==========================================================================
llmir-json-jf         ``EngineBackend`` with ``spec_from_json_schema(schema, whitespace="")`` and
                      ``Engine(jump_forward=True)``: forced JSON text (keys, punctuation, the rest
                      of an enum value) is appended in one extend instead of one step per token
llmir-json-jf-nospec  the same with prompt-lookup speculation off (``speculative_draft_tokens=0``;
                      the other llmir systems run with the engine's default or ``--draft-tokens``):
                      shows what speculation adds
llmir-json            the same constraint with jump-forward off (shows what jump-forward adds)
llmir-free            no constraint, stop at a newline or EOS (the model was trained to write the
                      record and then EOS)
outlines              ``outlines`` (not a project dependency: ``pip install outlines``) with its
                      transformers model on the same weights, ``JsonSchema(whitespace_pattern="")``
====================  ==========================================================================

Each system runs in two modes: ``sequential`` (one request at a time: latency-bound, batch 1) and
``batched`` (every request submitted together: the engine batches them; Outlines uses its
``Generator.batch``, one batch per schema). Constraint compilation and warm-up happen before
timing. Every system runs ``--repeats`` times, interleaved, and the fastest run counts; tokens per
CPU-second (this process, all threads) is reported beside tokens per wall-second, because the
machine is shared and wall time includes time other processes took.

Tokens are counted the same way for every system: the tokens of the produced JSON text under the
model's tokenizer (so an EOS step, a held-back token or a different spelling does not change the
count). Also reported: records/s, JSON parse rate, schema-valid rate, field accuracy (fields equal
to the record the text was generated from), and the engine's forward passes.

A ``prefill_only`` run per mode (the same prompts, ``max_new_tokens=1``) measures what every
system spends before decoding; jump-forward can only shorten the rest. From it,
``sequential_jf_vs_free_cpu_if_every_step_cost_a_decode`` is the speed-up jump-forward would
reach with its forward-pass count if none of its passes cost more than a free decode step (the
extend of forced tokens and the mask work do cost more): an upper bound that says whether the
target is reachable by saving steps at all. Batched, ``prefill_only`` gives the part of the time
that no saved decode step can touch.

    .venv/bin/python benchmarks/bench_json.py [--records 60] [--batched-records 120] [--repeats 2]
                                              [--no-outlines] [--draft-tokens N]

Writes ``benchmarks/results/json_cpu_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmir_lang.executor.backend import ChainRequest, EngineBackend, GenStep
from llmir_lang.executor.constraints import spec_from_json_schema
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.models.tiny_tasks import (
    EXTRACTION_KINDS,
    SCHEMAS,
    extraction_items,
)

RESULTS = Path(__file__).resolve().parent / "results"
MAX_NEW_TOKENS = 96
LLMIR_SYSTEMS = (
    "llmir-json-jf",
    "llmir-json-jf-nospec",
    "llmir-json",
    "llmir-free",
)  # the longest record is about 45 tokens

Item = tuple[str, str, dict[str, Any]]  # (kind, prompt, gold record)


@dataclass(slots=True)
class RunResult:
    system: str
    mode: str
    records: int
    seconds: float
    output_tokens: int  # tokens of the produced texts under the model's tokenizer
    parsed: int
    schema_valid: int
    fields: int
    fields_correct: int
    cpu_seconds: float = 0.0  # CPU time of this process (all threads): robust to other load
    forward_calls: int | None = None
    jump_forward_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.output_tokens / max(self.cpu_seconds, 1e-9)

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        out["tokens_per_s"] = round(self.tokens_per_s, 1)
        out["tokens_per_cpu_s"] = round(self.tokens_per_cpu_s, 1)
        out["cpu_seconds"] = round(self.cpu_seconds, 3)
        out["records_per_s"] = round(self.records / self.seconds, 2)
        out["field_accuracy"] = round(self.fields_correct / max(1, self.fields), 4)
        out["seconds"] = round(self.seconds, 3)
        return out


def score(
    system: str, mode: str, items: list[Item], texts: list[str], seconds: float, count: Callable
) -> RunResult:
    import jsonschema

    res = RunResult(system, mode, len(items), seconds, 0, 0, 0, 0, 0)
    for (kind, _, gold), text in zip(items, texts):
        text = text.strip()
        res.output_tokens += count(text)
        res.fields += len(gold)
        try:
            got = json.loads(text)
        except json.JSONDecodeError:
            continue
        res.parsed += 1
        try:
            jsonschema.validate(got, SCHEMAS[kind])
            res.schema_valid += 1
        except jsonschema.ValidationError:
            pass
        if isinstance(got, dict):
            res.fields_correct += sum(got.get(k) == v for k, v in gold.items())
    return res


# --- llmir ----------------------------------------------------------------------------------
def llmir_requests(items: list[Item], constrained: bool, max_new: int = MAX_NEW_TOKENS) -> list[ChainRequest]:
    reqs = []
    for kind, prompt, _ in items:
        if constrained:
            step = GenStep(
                "record",
                SamplingParams(max_new_tokens=max_new),
                spec_from_json_schema(SCHEMAS[kind], whitespace=""),
            )
        else:
            step = GenStep("record", SamplingParams(max_new_tokens=max_new, stop=["\n"]))
        reqs.append(ChainRequest(prompt, [step]))
    return reqs


def run_prefill(backend: EngineBackend, mode: str, items: list[Item]) -> dict[str, float]:
    """The same prompts with ``max_new_tokens=1``: what every system spends before decoding
    (prefill and the first token). Jump-forward can only shorten the rest."""
    eng = backend.engine
    eng.jump_forward = False
    eng.speculative_draft_tokens = 0
    reqs = llmir_requests(items, constrained=False, max_new=1)
    eng.flush_cache()
    before = eng.stats()["forward_calls"]
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "batched":
        backend.run(reqs)
    else:
        for r in reqs:
            backend.run([r])
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "forward_calls": eng.stats()["forward_calls"] - before,
    }


def run_llmir(
    backend: EngineBackend, system: str, mode: str, items: list[Item], count: Callable, draft: int
) -> RunResult:
    eng = backend.engine
    eng.jump_forward = system.startswith("llmir-json-jf")
    eng.speculative_draft_tokens = 0 if system.endswith("-nospec") else draft
    constrained = system != "llmir-free"
    reqs = llmir_requests(items, constrained)
    eng.flush_cache()  # every system starts from a cold prefix cache
    before = eng.stats()["forward_calls"]
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "batched":
        out = backend.run(reqs)
    else:
        out = [backend.run([r])[0] for r in reqs]
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = [r.steps[0] for r in out]
    res = score(system, mode, items, [s.text for s in steps], seconds, count)
    res.cpu_seconds = cpu
    res.forward_calls = eng.stats()["forward_calls"] - before
    res.jump_forward_tokens = sum(int(s.meta.get("jump_forward_tokens") or 0) for s in steps)
    res.extra["finish_reasons"] = sorted({s.finish_reason for s in steps})
    res.extra["constraint_engines"] = sorted({str(s.meta.get("constraint_engine")) for s in steps})
    res.extra["spec_draft_tokens"] = sum(int(s.meta.get("spec_draft_tokens") or 0) for s in steps)
    res.extra["spec_accepted_tokens"] = sum(int(s.meta.get("spec_accepted_tokens") or 0) for s in steps)
    return res


# --- Outlines -------------------------------------------------------------------------------
class OutlinesSystem:
    """Outlines with its transformers model on the bundled weights (fp32, CPU, greedy)."""

    def __init__(self, model_dir: Path):
        import outlines
        import transformers
        from outlines.types import JsonSchema

        self.version = getattr(outlines, "__version__", None) or _dist_version("outlines")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        self.model = outlines.from_transformers(hf, tok)
        self.generators = {
            kind: outlines.Generator(self.model, JsonSchema(json.dumps(SCHEMAS[kind]), whitespace_pattern=""))
            for kind in EXTRACTION_KINDS
        }

    def generate(self, items: list[Item], mode: str) -> list[str]:
        kw = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}
        if mode == "sequential":
            return [self.generators[kind](prompt, **kw) for kind, prompt, _ in items]
        out: dict[int, str] = {}
        for kind in EXTRACTION_KINDS:  # one generator (schema) per batch
            idx = [i for i, it in enumerate(items) if it[0] == kind]
            texts = self.generators[kind].batch([items[i][1] for i in idx], **kw)
            out.update(zip(idx, texts))
        return [out[i] for i in range(len(items))]


def run_outlines(sys_: OutlinesSystem, mode: str, items: list[Item], count: Callable) -> RunResult:
    t0, c0 = time.perf_counter(), time.process_time()
    texts = sys_.generate(items, mode)
    res = score("outlines", mode, items, texts, time.perf_counter() - t0, count)
    res.cpu_seconds = time.process_time() - c0
    return res


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# --- main -----------------------------------------------------------------------------------
def table(rows: list[RunResult]) -> str:
    cols = "system mode recs secs tokens tok/s tok/cpu-s rec/s parsed valid fields fwd jf-tok".split()
    widths = (15, 10, 5, 7, 7, 7, 9, 6, 6, 6, 7, 6, 6)
    head = " ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.system:15s} {r.mode:10s} {r.records:5d} {r.seconds:7.2f} {r.output_tokens:7d} "
            f"{r.tokens_per_s:7.1f} {r.tokens_per_cpu_s:9.1f} {r.records / r.seconds:6.2f} "
            f"{r.parsed / r.records:6.1%} {r.schema_valid / r.records:6.1%} "
            f"{r.fields_correct / max(1, r.fields):7.1%} "
            f"{'' if r.forward_calls is None else r.forward_calls:>6} "
            f"{'' if r.jump_forward_tokens is None else r.jump_forward_tokens:>6}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=60, help="records in the sequential mode")
    ap.add_argument("--batched-records", type=int, default=120, help="records in the batched mode")
    ap.add_argument("--seed", type=int, default=2027, help="seed of the extraction texts")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (same for every system)")
    ap.add_argument("--no-outlines", action="store_true", help="skip the Outlines system")
    ap.add_argument("--repeats", type=int, default=2, help="runs of every system, interleaved; best kept")
    ap.add_argument(
        "--draft-tokens",
        type=int,
        default=None,
        help="prompt-lookup draft length of the llmir systems (default: the engine's CPU default)",
    )
    ap.add_argument(
        "--out", default=None, help="result file (default benchmarks/results/json_cpu_<date>.json)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    load0 = os.getloadavg()

    backend = EngineBackend(Engine(device="cpu", speculative_draft_tokens=args.draft_tokens))
    draft = backend.engine.speculative_draft_tokens
    tok = backend.engine.tokenizer

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False)) if text else 0

    # warm-up: compile the three schemas, touch every code path once
    warm = extraction_items(6, seed=1)
    for system in LLMIR_SYSTEMS:
        run_llmir(backend, system, "batched", warm, count, draft)

    outlines_sys: OutlinesSystem | None = None
    outlines_error: str | None = None
    if not args.no_outlines:
        try:
            t0 = time.perf_counter()
            outlines_sys = OutlinesSystem(backend.engine.model_path)
            outlines_sys.generate(warm[:3], "sequential")  # builds the three indexes
            outlines_sys.generate(warm, "batched")
            print(f"outlines {outlines_sys.version}: set up and warmed in {time.perf_counter() - t0:.1f} s")
        except Exception as e:  # an optional comparison: report, keep the rest
            outlines_error = f"{type(e).__name__}: {e}"
            print(f"outlines unavailable: {outlines_error}", file=sys.stderr)
            outlines_sys = None

    # Every system runs --repeats times, round-robin, and the fastest run of each is kept: the
    # machine is shared, and interleaving spreads the other load over all systems alike.
    runs: list[RunResult] = []
    prefill: dict[str, dict[str, float]] = {}
    print(table([]))
    for mode, n in (("sequential", args.records), ("batched", args.batched_records)):
        items = extraction_items(n, args.seed)
        for _ in range(args.repeats):
            pre = run_prefill(backend, mode, items)
            if mode not in prefill or pre["seconds"] < prefill[mode]["seconds"]:
                prefill[mode] = pre
            for system in LLMIR_SYSTEMS:
                runs.append(run_llmir(backend, system, mode, items, count, draft))
                print(table(runs[-1:]).splitlines()[-1], flush=True)
            if outlines_sys is not None:
                runs.append(run_outlines(outlines_sys, mode, items, count))
                print(table(runs[-1:]).splitlines()[-1], flush=True)
    backend.engine.shutdown()

    rows: list[RunResult] = []
    for r in runs:
        same = [x for x in rows if x.system == r.system and x.mode == r.mode]
        if not same:
            rows.append(r)
        elif r.seconds < same[0].seconds:
            rows[rows.index(same[0])] = r

    def find(system: str, mode: str) -> RunResult | None:
        return next((r for r in rows if r.system == system and r.mode == mode), None)

    ratios: dict[str, Any] = {}
    for mode in ("sequential", "batched"):
        jf, free, ol = find("llmir-json-jf", mode), find("llmir-free", mode), find("outlines", mode)
        assert jf is not None and free is not None
        ratios[f"{mode}_jf_vs_free"] = round(jf.tokens_per_s / free.tokens_per_s, 3)
        nospec = find("llmir-json-jf-nospec", mode)
        if nospec is not None:
            ratios[f"{mode}_jf_vs_jf_nospec"] = round(jf.tokens_per_s / nospec.tokens_per_s, 3)
        ratios[f"{mode}_jf_vs_free_cpu"] = round(jf.tokens_per_cpu_s / free.tokens_per_cpu_s, 3)
        if ol is not None:
            ratios[f"{mode}_jf_vs_outlines"] = round(jf.tokens_per_s / ol.tokens_per_s, 3)
            ratios[f"{mode}_jf_vs_outlines_cpu"] = round(jf.tokens_per_cpu_s / ol.tokens_per_cpu_s, 3)
        # What jump-forward could give if each of its remaining forward passes cost what a free
        # decode step costs (no extend surcharge, no mask work): free's time with its decode part
        # scaled by the ratio of forward passes after the prefill. Only at batch 1, where a step
        # costs about the same whatever it computes; a batched step's cost grows with its rows.
        pre = prefill[mode]
        free_decode = free.cpu_seconds - pre["cpu_seconds"]
        jf_fwd, free_fwd = ((r.forward_calls or 0) - pre["forward_calls"] for r in (jf, free))
        if mode == "sequential" and free_decode > 0 and free_fwd > 0:
            bound = free.cpu_seconds / (pre["cpu_seconds"] + free_decode * jf_fwd / free_fwd)
            ratios[f"{mode}_jf_vs_free_cpu_if_every_step_cost_a_decode"] = round(bound, 3)
    best_ol = max((r.tokens_per_s for r in rows if r.system == "outlines"), default=None)
    best_jf = max(r.tokens_per_s for r in rows if r.system == "llmir-json-jf")
    if best_ol:
        ratios["best_jf_vs_best_outlines"] = round(best_jf / best_ol, 3)

    print(f"\nfastest of {args.repeats} runs:")
    print(table(rows))
    print()
    for k, v in ratios.items():
        print(f"{k:32s} {v:.2f}x")

    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "threads": args.threads,
        "model": "llmir-tiny (bundled), fp32, CPU",
        "outlines_version": outlines_sys.version if outlines_sys else None,
        "outlines_error": outlines_error,
        "seed": args.seed,
        "max_new_tokens": MAX_NEW_TOKENS,
        "speculative_draft_tokens": draft,
        "targets": {"jf_vs_free": 1.3, "jf_vs_outlines": 3.0},
        "token_count": "tokens of the produced JSON text under the model's tokenizer, for every system",
        "repeats": args.repeats,
        "best": [r.row() for r in rows],
        "all_runs": [r.row() for r in runs],
        "ratios": ratios,
        "prefill_only": {m: {k: round(v, 3) for k, v in p.items()} for m, p in prefill.items()},
        "load_average_start": list(load0),
        "load_average_end": list(os.getloadavg()),
        "wall_seconds": round(time.perf_counter() - wall0, 1),
    }
    path = Path(args.out) if args.out else RESULTS / f"json_cpu_{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
