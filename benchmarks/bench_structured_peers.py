"""llmir's JSON-schema constraints beside its peers: llguidance, XGrammar, outlines-core.

Usage::

    .venv/bin/python benchmarks/bench_structured_peers.py                      # whole sample
    .venv/bin/python benchmarks/bench_structured_peers.py --limit 100          # first 100 files
    .venv/bin/python benchmarks/bench_structured_peers.py --sample 500 --seed 0   # seeded subset
    .venv/bin/python benchmarks/bench_structured_peers.py --limit 20 --engines llmir,xgrammar

Data: the JSONSchemaBench sample in ``../shared/data/jsonschemabench`` (sorted file names, as
``bench_constraints.py`` reads it), its ``tests`` as the instances, every instance walked compact
and with json.dumps' default separators (``constraints.testing.instance_texts``), token by token
through its canonical tokenization under the 32k byte-level BPE of ``constraints.testing``. Every
engine walks the same token ids through ``constraints.testing.walk_tokens`` (a token passes iff
its mask bit is set; at the end the EOS bit must be set), so they are timed by the same code.

Engines (``structured_peers_engines.py`` says exactly how each is built): ``llmir`` (the
``ConstraintCompiler`` as the engine builds it), ``llguidance`` (``JsonCompiler`` + ``LLMatcher``),
``xgrammar`` (``GrammarCompiler.compile_json_schema`` + ``GrammarMatcher``), ``outlines-core``
(``Index`` over ``build_regex_from_schema``, as outlines 1.x does). Each runs in a worker
process of its own, warmed up on two schemas outside the sample, one thread, compile caches off;
a compile past ``--compile-timeout`` (10 s) or walks past ``--walk-timeout`` end that worker
(restarted for the next schema) and count as a failure of that schema; an exception is one too.

The oracle is the ``jsonschema`` validator of the schema's draft, with format checks
(``structured_peers_cases.py``: jsonschema's own, and the date-time / uri / hostname ones it
would take from packages not installed here); where it raises, the file's label is used. It
agrees with JSONSchemaBench's labels on 4,603 of the 4,607 instances; the result counts and
lists the disagreements.

Reported per engine: compiles (yes / error / timeout), valid instances accepted (in both
serializations; each serialization also apart), invalid instances rejected (in both), share of
schemas fully correct (compiled, every valid accepted, every invalid rejected: as
``bench_constraints.py`` counts it, so a schema without tests, 327 of the 1,893, is correct iff
it compiles, whatever the engine ignores), the same over the schemas with tests, compile time
p50 / p90 over compiled schemas (and p90 with failures counted at their time, timeouts at the
bound), mask time per token p50 / p99 at batch 1 while walking valid instances (wall, and thread
CPU), ratios against llmir, and each peer beside llmir on shared ground (compile over the schemas
both compiled; masks over the schemas both got fully correct, i.e. the very same walks). Written
to ``benchmarks/results/structured_peers_cpu_<date>.json`` with versions, command, machine, date,
each schema's verdicts and the schemas where llmir is wrong and a peer right.

Differences between the engines this benchmark could not remove:

- Whitespace: llmir, llguidance and outlines-core allow ``[ ]?`` between JSON tokens (one
  optional space: both serializations). XGrammar has no "space only" option: it allows one
  whitespace character of any kind (``any_whitespace=True, max_whitespace_cnt=1``), a slightly
  larger language; its ``any_whitespace=False`` and llguidance's ``JsonCompiler`` default both
  force ``", "`` / ``": "`` and refuse compact JSON (not used here; the per-serialization
  acceptance shows how each setting fares).
- XGrammar runs with ``strict_mode=False`` (its default, True, forbids properties and items the
  schema leaves open, which JSON Schema allows; ``--xgrammar-strict`` measures the default).
- outlines-core's vocabulary holds each token's exact bytes; outlines 1.x builds it from
  ``convert_tokens_to_string``, which turns the 165 partial-UTF-8 tokens of this tokenizer into
  U+FFFD (``--outlines-vocab outlines1x`` measures that).
- Compile time is what each engine needs before its first matcher: llmir's includes its schema
  checks and rewrites and one mask (its satisfiability check); llguidance builds lexer states
  lazily, during masks; XGrammar precomputes token masks per grammar position; outlines-core
  builds its whole token-level DFA. llmir sends some outlines-core builds to a child process.
- Property order: every engine generates (and so accepts) properties in the schema's order; an
  instance with another order is rejected by all alike.
- Mask times are per ``fill_bitmask`` call through each engine's Python binding plus a thin
  adapter (a method call; llguidance's adds an ``is_error`` check), on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_constraints import pct, split_of, summarize  # noqa: E402
from common import table  # noqa: E402
from structured_peers_cases import load_cases  # noqa: E402
from structured_peers_engines import ENGINES, versions  # noqa: E402
from structured_peers_worker import EngineWorker  # noqa: E402

from llmir_lang.executor.constraints.testing import (  # noqa: E402
    SchemaResult,
    shared_data_dir,
    train_test_tokenizer,
)


# --- scoring ---------------------------------------------------------------------------------
def score(run: dict[str, Any], tests: list[dict[str, Any]]) -> tuple[SchemaResult, dict[str, int]]:
    """A ``SchemaResult`` (bench_constraints' record) of one engine on one schema, plus counts of
    valid instances accepted per serialization."""
    compiled = run["status"] in ("ok", "walk_timeout")
    res = SchemaResult(
        compiled,
        engine=run.get("route", ""),
        error=run.get("error", ""),
        error_type=run["status"],
        compile_seconds=run["compile_s"],
        mask_seconds=run.get("mask_s", []),
        mask_cpu_seconds=run.get("mask_cpu_s", []),
        failures=[],
    )
    per_sep = {"compact": 0, "default": 0}
    verdicts = iter(run.get("verdicts", []))
    for t in tests:
        got = [next(verdicts, (None, -1, run["status"])) for _ in t["texts"]]
        ok = [v[0] is True for v in got]
        if t["valid"]:
            res.valid_total += 1
            res.valid_accepted += all(ok)
            per_sep["compact"] += ok[0]
            per_sep["default"] += ok[-1]
        else:
            res.invalid_total += 1
            res.invalid_rejected += all(v[0] is False for v in got)
        for text, v in zip(t["texts"], got):
            if v[0] is not t["valid"]:
                res.failures.append(
                    f"{'valid' if t['valid'] else 'invalid'} {text[:100]!r}: {v[2] or 'accepted'}"
                )
    return res, per_sep


def engine_summary(results: list[SchemaResult], seps: list[dict[str, int]], timeout: float) -> dict[str, Any]:
    s = summarize(results)
    statuses = collections.Counter(r.error_type for r in results)
    s.update({f"status_{k}": v for k, v in sorted(statuses.items())})
    s["valid_accepted_compact"] = sum(p["compact"] for p in seps)
    s["valid_accepted_default"] = sum(p["default"] for p in seps)
    every = [
        timeout if r.error_type == "timeout" else r.compile_seconds
        for r in results
        if r.compile_seconds == r.compile_seconds
    ]
    s["compile_ms_p90_all"] = 1000 * pct(every, 0.9)
    s["routes"] = dict(collections.Counter(r.engine for r in results if r.compiled))
    tested = [r for r in results if r.valid_total + r.invalid_total]  # no tests: correct iff compiled
    s["schemas_with_tests"] = len(tested)
    s["fully_correct_with_tests"] = sum(r.fully_correct for r in tested)
    s["fully_correct_with_tests_share"] = s["fully_correct_with_tests"] / max(1, len(tested))
    return s


def timing_on(compiled: list[SchemaResult], walked: list[SchemaResult]) -> dict[str, float]:
    """Compile percentiles over ``compiled``, mask percentiles over the walks of ``walked``."""
    masks = [t for r in walked for t in r.mask_seconds or []]
    return {
        "compile_ms_p50": 1000 * pct([r.compile_seconds for r in compiled], 0.5),
        "compile_ms_p90": 1000 * pct([r.compile_seconds for r in compiled], 0.9),
        "mask_tokens": len(masks),
        "mask_us_p50": 1e6 * pct(masks, 0.5),
        "mask_us_p99": 1e6 * pct(masks, 0.99),
    }


def pairwise(per: dict[str, list[SchemaResult]]) -> dict[str, dict[str, Any]]:
    """Each peer against llmir on shared ground: compile times over the schemas both compiled,
    mask times over the schemas both got fully correct (the very same token walks)."""
    base = per.get("llmir")
    if base is None:
        return {}
    out = {}
    for e, rs in per.items():
        if e == "llmir":
            continue
        both = [i for i, (a, b) in enumerate(zip(base, rs)) if a.compiled and b.compiled]
        right = [i for i in both if base[i].fully_correct and rs[i].fully_correct]
        mine = timing_on([rs[i] for i in both], [rs[i] for i in right])
        theirs = timing_on([base[i] for i in both], [base[i] for i in right])
        out[e] = {
            "compiled_both": len(both),
            "fully_correct_both": len(right),
            "llmir": theirs,
            e: mine,
            "ratio": {
                k: mine[k] / theirs[k] if theirs[k] else float("nan") for k in mine if k != "mask_tokens"
            },
        }
    return out


RATIO_KEYS = ("fully_correct_share", "compile_ms_p50", "compile_ms_p90", "mask_us_p50", "mask_us_p99")


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    base = summary.get("llmir")
    if base is None:
        return {}
    return {
        e: {k: s[k] / base[k] if base[k] else float("nan") for k in RATIO_KEYS}
        for e, s in summary.items()
        if e != "llmir"
    }


# --- main ------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = ""
    try:
        model = next(
            ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "threads_per_engine": 1,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="first N files (after --sample)")
    ap.add_argument("--sample", type=int, default=None, help="a seeded random subset of N files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    ap.add_argument("--compile-timeout", type=float, default=10.0)
    ap.add_argument("--walk-timeout", type=float, default=120.0, help="all walks of one schema")
    ap.add_argument("--outlines-vocab", choices=["bytes", "outlines1x"], default="bytes")
    ap.add_argument("--xgrammar-strict", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        ap.error(f"unknown engines {unknown}; choose from {list(ENGINES)}")
    import importlib.util

    missing = [e for e in engines if importlib.util.find_spec(ENGINES[e].module) is None]
    if missing:
        ap.error(
            f"not installed: {[ENGINES[e].module for e in missing]} (pip install xgrammar into .venv: "
            f"0.2.8 was measured), or leave {missing} out of --engines"
        )
    from tqdm import tqdm

    t0 = time.perf_counter()
    opts = {"outlines_vocab": args.outlines_vocab, "xgrammar_strict": args.xgrammar_strict}
    log_dir = Path(tempfile.mkdtemp(prefix="structured_peers_"))
    workers = {e: EngineWorker(e, opts, log_dir) for e in engines}
    for w in workers.values():  # they load side by side while the cases are read
        w.start()
    hf = train_test_tokenizer("byte_level_bpe", 32000)
    cases, disagreements = load_cases(
        shared_data_dir() / "jsonschemabench", args.limit, args.sample, args.seed, hf
    )
    for w in workers.values():
        w.ready()
    load_start = os.getloadavg()
    per: dict[str, list[SchemaResult]] = {e: [] for e in engines}
    seps: dict[str, list[dict[str, int]]] = {e: [] for e in engines}
    rows: list[dict[str, Any]] = []
    bar = tqdm(cases, unit="schema", dynamic_ncols=True)
    for n, case in enumerate(bar):
        walks = [(ids, t["valid"]) for t in case["tests"] for ids in t["ids"]]
        row: dict[str, Any] = {"file": case["file"], "tests": len(case["tests"])}
        for e in engines[n % len(engines) :] + engines[: n % len(engines)]:  # rotate: drift hits all alike
            run = workers[e].run(case["schema"], walks, args.compile_timeout, args.walk_timeout)
            res, sep = score(run, case["tests"])
            per[e].append(res)
            seps[e].append(sep)
            row[e] = {
                "status": run["status"],
                "route": run.get("route", ""),
                "error": run.get("error", ""),
                "compile_ms": round(1000 * run["compile_s"], 3),
                "fully_correct": res.fully_correct,
                "failures": (res.failures or [])[:4],
            }
        rows.append(row)
        bar.set_postfix({e: sum(r.fully_correct for r in per[e]) for e in engines}, refresh=False)
    bar.close()
    for w in workers.values():
        w.kill()

    summary = {e: engine_summary(per[e], seps[e], args.compile_timeout) for e in engines}
    common = [i for i in range(len(cases)) if all(per[e][i].compiled for e in engines)]
    report: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "machine": machine(),
        "versions": versions(),
        "engines": {e: workers[e].info.get("settings", {}) for e in engines},
        "worker_setup_seconds": {e: workers[e].info.get("setup_seconds") for e in engines},
        "worker_restarts": {e: workers[e].restarts for e in engines},
        "tokenizer": "byte_level_bpe 32000 (llmir_lang.executor.constraints.testing, trained locally)",
        "data": {
            "files": len(cases),
            "limit": args.limit,
            "sample": args.sample,
            "seed": args.seed,
            "instances": sum(len(c["tests"]) for c in cases),
            "valid_instances": sum(t["valid"] for c in cases for t in c["tests"]),
            "oracle_label_disagreements": sum(d["source"] == "jsonschema" for d in disagreements),
            "oracle_raised_label_used": sum(d["source"] == "label" for d in disagreements),
        },
        "compile_timeout_s": args.compile_timeout,
        "walk_timeout_s": args.walk_timeout,
        "load_average_start": load_start,
        "summary": summary,
        "ratios_vs_llmir": ratios(summary),
        "pairwise_vs_llmir": pairwise(per),
        "on_schemas_all_compiled": {
            e: {"schemas": len(common), **timing_on([per[e][i] for i in common], [per[e][i] for i in common])}
            for e in engines
        },
        "by_split": {
            e: {
                k: summarize([r for c, r in zip(cases, per[e]) if split_of(c["file"]) == k])
                for k in sorted({split_of(c["file"]) for c in cases})
            }
            for e in engines
        },
        # with tests: llmir refused or got an instance wrong where a peer got every instance right;
        # without: llmir refused what a peer compiled (nothing checks what the peer enforces)
        "llmir_wrong_peer_right": [
            r
            for r in rows
            if "llmir" in r
            and not r["llmir"]["fully_correct"]
            and any(r[e]["fully_correct"] for e in engines if e != "llmir")
        ],
        "oracle_label_disagreements": disagreements,  # and the instances where the label was used
        "schemas": rows,
    }
    report["load_average_end"] = os.getloadavg()
    report["wall_seconds"] = time.perf_counter() - t0
    print_report(report, engines)
    out = (
        args.out
        or Path(__file__).parent / "results" / f"structured_peers_cpu_{datetime.date.today():%Y%m%d}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} ({report['wall_seconds']:.0f} s; worker logs in {log_dir})")


def print_report(report: dict[str, Any], engines: list[str]) -> None:
    rows = []
    for e in engines:
        s = report["summary"][e]
        rows.append(
            {
                "engine": e,
                "compiled": f"{s['compiled']}/{s['schemas']}",
                "err/timeout": f"{s['schemas'] - s['compiled'] - s.get('status_timeout', 0)}/{s.get('status_timeout', 0)}",
                "fully correct": f"{s['fully_correct']} ({100 * s['fully_correct_share']:.1f}%)",
                "with tests": f"{s['fully_correct_with_tests']}/{s['schemas_with_tests']}",
                "valid acc.": f"{s['valid_accepted']}/{s['valid_instances']}",
                "compact/default": f"{s['valid_accepted_compact']}/{s['valid_accepted_default']}",
                "invalid rej.": f"{s['invalid_rejected']}/{s['invalid_instances']}",
                "compile p50/p90 ms": f"{s['compile_ms_p50']:.2f}/{s['compile_ms_p90']:.1f}",
                "mask p50/p99 us": f"{s['mask_us_p50']:.1f}/{s['mask_us_p99']:.0f}",
                "mask tokens": s["mask_tokens"],
            }
        )
    print(table(rows, list(rows[0])))
    if report["ratios_vs_llmir"]:
        print("\nratios, engine / llmir (correct share: higher is better; times: lower is better)")
        cols = ["engine", *RATIO_KEYS]
        print(
            table(
                [
                    {"engine": e, **{k: round(v, 3) for k, v in r.items()}}
                    for e, r in report["ratios_vs_llmir"].items()
                ],
                cols,
            )
        )
    pairs = []
    for e, p in report["pairwise_vs_llmir"].items():
        for who in ("llmir", e):
            pairs.append(
                {
                    "pair": f"{e} vs llmir",
                    "engine": who,
                    "compiled both": p["compiled_both"],
                    "correct both": p["fully_correct_both"],
                    **{k: round(v, 2) for k, v in p[who].items()},
                }
            )
    if pairs:
        print(
            "\neach peer beside llmir: compile over schemas both compiled, masks over schemas both got right"
        )
        print(table(pairs, list(pairs[0])))
    common = report["on_schemas_all_compiled"]
    print("\non the schemas every engine compiled:")
    print(
        table(
            [{"engine": e, **{k: round(v, 2) for k, v in common[e].items()}} for e in engines],
            ["engine", *next(iter(common.values()))],
        )
    )
    print(
        f"\noracle vs JSONSchemaBench labels: {report['data']['oracle_label_disagreements']} instances differ; "
        f"llmir wrong where a peer is right: {len(report['llmir_wrong_peer_right'])} schemas"
    )


if __name__ == "__main__":
    main()
