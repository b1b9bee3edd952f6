"""Start-up benchmark: the fixed cost of a process that uses llmir, measured in fresh processes.

Each repeat starts fresh Python processes and times them on the wall clock from the moment the
parent starts them:

- ``python``: ``python -c pass``, the interpreter alone (the floor every row includes);
- ``import``: ``import llmir_lang`` done;
- ``runtime``: ``llmir.Runtime()`` ready (the bundled model, default options);
- ``first_gen``: a first program (one ``gen`` of at most 8 tokens) done;
- ``exit``: the process gone, without ``shutdown()`` (as the README's scripts end); ``teardown``
  is ``exit - first_gen``;
- ``extract``: the whole of ``llmir extract`` (``python -m llmir_lang extract ... --no-progress``)
  over the first ``--records`` records of ``examples/sample_records.jsonl``.

``--baseline TREE`` measures another source tree in the same run (e.g. the code before a change:
``git archive HEAD | tar -x -C /tmp/before && ln -s ../kernels /tmp/before/llmir_lang/kernels``),
alternating with this checkout in every repeat so that the machine's load hits both alike, and
checks that both generate the same text and write the same extraction. Medians of ``--repeat``
runs are printed as a table and written to ``benchmarks/results/startup_cpu_<date>.json``.

    python benchmarks/bench_startup.py [--repeat 5] [--records 3] [--baseline /tmp/before]
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("python", "import", "runtime", "first_gen", "exit", "teardown", "extract")
LABELS = {
    "python": "python -c pass",
    "import": "import llmir_lang",
    "runtime": "llmir.Runtime() ready",
    "first_gen": "first gen done",
    "exit": "process exit",
    "teardown": "  teardown (exit - gen)",
    "extract": "llmir extract",
}
# modules whose presence at the end says what the start-up imported (see the README's note)
HEAVY = ("transformers", "torch._dynamo", "triton", "sympy", "jinja2", "lark")

# The child: stdlib only before the first stamp, so that nothing of this file is measured.
CHILD = """
import json, sys, time
stamps = {}
import llmir_lang as llmir
stamps["import"] = time.time()
rt = llmir.Runtime()
stamps["runtime"] = time.time()


@llmir.function
def qa(s, question):
    s += "Q: " + question + "\\nA: "
    s += llmir.gen("answer", max_tokens=8, stop="\\n")


answer = qa.run(question="What is 7 + 5?", backend=rt)["answer"]
stamps["first_gen"] = time.time()
import torch

print(json.dumps({
    "stamps": stamps, "answer": answer, "package": llmir.__file__, "modules": len(sys.modules),
    "heavy": [m for m in HEAVY if m in sys.modules], "torch": torch.__version__,
    "threads": torch.get_num_threads(),
}))
"""


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _timed(cmd: list[str], tree: Path) -> tuple[float, float, str]:
    """(start, end) wall-clock times of ``cmd`` run in ``tree``, and its standard output."""
    start = time.time()
    proc = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True)
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:4])}... in {tree} exited {proc.returncode}:\n{proc.stderr[-2000:]}"
        )
    return start, end, proc.stdout


def measure(tree: Path, records: Path, out: Path) -> dict[str, Any]:
    """One run of every stage in ``tree``: seconds per stage, and what the runs produced."""
    py = sys.executable
    start, end, _ = _timed([py, "-c", "pass"], tree)
    row: dict[str, Any] = {"python": end - start}
    start, end, stdout = _timed([py, "-c", f"HEAVY = {HEAVY!r}\n" + CHILD], tree)
    child = json.loads(stdout.strip().splitlines()[-1])
    for stage, t in child["stamps"].items():
        row[stage] = t - start
    row["exit"] = end - start
    row["teardown"] = end - child["stamps"]["first_gen"]
    out.unlink(missing_ok=True)  # a rerun would resume the job: nothing left to do
    cmd = [py, "-m", "llmir_lang", "extract", "--schema", "examples/extract_person.py:Person"]
    start, end, _ = _timed([*cmd, "--input", str(records), "--output", str(out), "--no-progress"], tree)
    row["extract"] = end - start
    extra = {k: child[k] for k in ("answer", "package", "modules", "heavy", "torch", "threads")}
    return {"times": row, **extra, "extraction": out.read_text()}


def run(trees: dict[str, Path], repeat: int, n_records: int, out: Path | None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="llmir_bench_startup_"))
    records = work / "records.jsonl"
    lines = (ROOT / "examples" / "sample_records.jsonl").read_text().splitlines()[:n_records]
    records.write_text("\n".join(lines) + "\n")
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
    for i in range(repeat):
        for label, tree in trees.items():  # alternated, so that a change of load hits both alike
            got = measure(tree, records, work / f"out_{label}.jsonl")
            runs[label].append(got)
            print(
                f"repeat {i + 1}/{repeat} {label}: "
                + "  ".join(f"{k} {v:.2f}" for k, v in got["times"].items())
            )
    results: dict[str, Any] = {
        "benchmark": "startup", "date": date.today().isoformat(), "device": "cpu",
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "repeat": repeat, "records": n_records,
        # without a bytecode cache every process compiles llmir_lang's sources again (~0.2 s)
        "bytecode_cache": not os.environ.get("PYTHONDONTWRITEBYTECODE"),
        "command": f"python -m llmir_lang extract --schema examples/extract_person.py:Person --input <first {n_records} of examples/sample_records.jsonl> --output <tmp> --no-progress",
        "trees": {},
    }  # fmt: skip
    for label, got in runs.items():
        first = got[0]
        results["trees"][label] = {
            "path": str(trees[label]),
            "package": first["package"],
            "torch": first["torch"],
            "threads": first["threads"],
            "modules_loaded": first["modules"],
            "heavy_modules_loaded": first["heavy"],
            "median_s": {s: statistics.median(r["times"][s] for r in got) for s in STAGES},
            "runs_s": {s: [r["times"][s] for r in got] for s in STAGES},
            "answer": first["answer"],
        }
    outputs = {(r["answer"], r["extraction"]) for got in runs.values() for r in got}
    results["same_output"] = len(outputs) == 1
    print_table(results)
    path = out or RESULTS / f"startup_cpu_{results['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return results


def print_table(results: dict[str, Any]) -> None:
    trees = results["trees"]
    labels = list(trees)
    print(
        f"\n== start-up, median of {results['repeat']} fresh processes (s; extract: {results['records']} records)"
    )
    head = f"{'stage':26}" + "".join(f"{label:>12}" for label in labels)
    if len(labels) == 2:
        head += f"{'saved':>10}{'ratio':>8}"
    print(head)
    for stage in STAGES:
        values = [trees[label]["median_s"][stage] for label in labels]
        line = f"{LABELS[stage]:26}" + "".join(f"{v:12.2f}" for v in values)
        if len(labels) == 2:
            line += f"{values[1] - values[0]:10.2f}{values[1] / max(values[0], 1e-9):7.2f}x"
        print(line)
    for label in labels:
        t = trees[label]
        print(f"{label}: {t['modules_loaded']} modules, of {HEAVY}: {t['heavy_modules_loaded']}")
    print(f"same output (gen text and extraction) in every run: {results['same_output']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="fresh processes per stage and tree")
    p.add_argument("--records", type=int, default=3, help="records of the extract run")
    p.add_argument("--baseline", type=Path, default=None, help="another source tree to measure alongside")
    p.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/...)")
    ns = p.parse_args(argv)
    trees = {"this": ROOT}
    if ns.baseline is not None:
        trees["baseline"] = ns.baseline.resolve()
    run(trees, ns.repeat, ns.records, ns.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
