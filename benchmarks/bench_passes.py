"""The pass pipeline's own cost on big batches: what ``run_batch`` spends optimizing before the
engine sees a request, for 64 to thousands of programs (a batch extraction job).

Three workloads, each N programs traced with the DSL (no model needed):

- ``few_shot_select``: N questions under one ~2,000-character few-shot prefix, a 4-way ``select``.
- ``extraction``: an instruction prefix, one record each, two gens with constant text between.
- ``fork``: a shared task prompt, ``fork(5)`` points, join, a summary gen.

For each, the default pipeline (``DEFAULT_PIPELINE``, the final module verified) runs on one
module holding all N functions, as ``run_batch``'s runner builds it. Time: best of ``--repeat``
runs in one process. ``--compare REV`` runs the same in a copy of ``REV``'s ``llmir_lang``
(``git archive``; the checkout is not touched) in alternating subprocesses, ``--rounds`` times
each, and reports the median over rounds of each round's REV/current ratio; it also checks that
both trees print the same optimized IR. Writes ``benchmarks/results/passes_cpu_<date>.json``.

    .venv/bin/python benchmarks/bench_passes.py [--compare HEAD~1] [--sizes 64,1000,3000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from revtree import extract_package  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
WORKLOADS = ("few_shot_select", "extraction", "fork")


def build(workload: str, n: int) -> Any:
    """One module of ``n`` traced programs (renamed ``f0 .. f{n-1}``, as the batch runner does)."""
    from dataclasses import replace

    import llmir_lang as llmir
    from llmir_lang.ir import Module

    prefix = "".join(
        f"Q: is {i} bigger than {i * 7 % 13}?\nA: {'yes' if i > i * 7 % 13 else 'no'}\n" for i in range(64)
    )

    @llmir.function
    def few_shot_select(s, question):
        s += prefix + "Q: " + question + "\nA: "
        s += llmir.select("answer", ["yes", "no", "unknown", "maybe"])

    @llmir.function
    def extraction(s, record):
        s += "Extract the name and the age of the person in the record below.\n" * 8
        s += "Record: " + record + "\nName: " + llmir.gen("name", max_tokens=8, stop="\n")
        s += "\nAge: " + llmir.gen("age", max_tokens=3, regex=r"[0-9]+")

    @llmir.function
    def fork(s, topic):
        s += "You are an expert writer. Give five short points about the topic, then a summary.\n"
        s += "Topic: " + topic + "\n"
        forks = s.fork(5)
        forks += lambda i: f"Point {i + 1}:" + llmir.gen("point", max_tokens=16)
        forks.join()
        s += "\nSummary:" + llmir.gen("summary", max_tokens=16)

    fns = []
    for i in range(n):
        if workload == "few_shot_select":
            m = few_shot_select.trace(question=f"is {i % 97} bigger than {i % 31}? (#{i})")
        elif workload == "extraction":
            m = extraction.trace(record=f"Person {i} is {20 + i % 50} years old and lives in town {i % 37}.")
        else:
            m = fork.trace(topic=f"topic number {i}")
        fns.extend(replace(f, name=f"f{i}") for f in m.functions)
    return Module(tuple(fns))


def measure(sizes: list[int], repeat: int) -> dict[str, Any]:
    """Best-of-``repeat`` seconds of the default pipeline, per workload and size, in this tree."""
    from llmir_lang.ir import print_ir
    from llmir_lang.optimizer import DEFAULT_PIPELINE, PassManager

    out: dict[str, Any] = {}
    for workload in WORKLOADS:
        for n in sizes:
            module = build(workload, n)
            manager = PassManager(DEFAULT_PIPELINE, verify_each=False)  # as run_batch runs it
            best, optimized = float("inf"), None
            for _ in range(repeat):
                t0 = time.perf_counter()
                optimized = manager.run(module)
                best = min(best, time.perf_counter() - t0)
            digest = hashlib.sha256(print_ir(optimized).encode()).hexdigest()[:16]
            out[f"{workload}/{n}"] = {
                "seconds": best,
                "ir_sha256": digest,
                "ops": sum(len(f.ops) for f in module.functions),
            }
    return out


def _run_tree(root: Path, sizes: list[int], repeat: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(root))
    cmd = [sys.executable, __file__, "--child", "--sizes", ",".join(map(str, sizes)), "--repeat", str(repeat)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"the run in {root} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64,1000,3000", help="programs per module, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="pipeline runs per point (best kept)")
    ap.add_argument("--compare", default=None, metavar="REV", help="a git revision to compare against")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per tree with --compare")
    ap.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/...)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    sizes = [int(x) for x in a.sizes.split(",")]
    if a.child:
        print(json.dumps(measure(sizes, a.repeat)))
        return 0
    result: dict[str, Any] = {
        "benchmark": "passes", "date": date.today().isoformat(), "device": "cpu",
        "machine": platform.processor() or platform.machine(), "sizes": sizes, "repeat": a.repeat,
    }  # fmt: skip
    if a.compare is None:
        now = _run_tree(REPO, sizes, a.repeat)
        print(f"{'workload/programs':26s} {'ops':>8s} {'seconds':>9s} {'us/program':>11s}")
        for key, row in now.items():
            n = int(key.split("/")[1])
            print(f"{key:26s} {row['ops']:8d} {row['seconds']:9.3f} {1e6 * row['seconds'] / n:11.1f}")
        result["points"] = now
    else:
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "base"
            extract_package(REPO, a.compare, base)
            trees = {"base": base, "new": REPO}
            rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
            for r in range(a.rounds):
                for k in ("base", "new") if r % 2 == 0 else ("new", "base"):
                    rounds[k].append(_run_tree(trees[k], sizes, a.repeat))
        print(
            f"{'workload/programs':26s} {a.compare + ' s':>12s} {'now s':>9s} {'speed-up':>9s} {'same IR':>8s}"
        )
        points = {}
        for key in rounds["new"][0]:
            b = statistics.median(x[key]["seconds"] for x in rounds["base"])
            n = statistics.median(x[key]["seconds"] for x in rounds["new"])
            ratio = statistics.median(
                x[key]["seconds"] / y[key]["seconds"] for x, y in zip(rounds["base"], rounds["new"])
            )
            same = rounds["base"][0][key]["ir_sha256"] == rounds["new"][0][key]["ir_sha256"]
            points[key] = {"base_seconds": b, "seconds": n, "speedup": ratio, "same_ir": same}
            print(f"{key:26s} {b:12.3f} {n:9.3f} {ratio:8.2f}x {str(same):>8s}")
        result |= {"compare": a.compare, "rounds": a.rounds, "points": points}
    path = a.out or RESULTS / f"passes_cpu_{result['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
