"""CPU cost of one model step of the bundled ``llmir-tiny`` (fp32, one torch thread unless
``--threads``), before vs after.

Times ``CausalLM.forward`` with the ``TorchAttentionBackend`` over a KV pool of random contents,
on step shapes of ``benchmarks/bench_json.py`` (prompts of 60..79 tokens, records of up to ~45),
with slots laid out as a fresh engine leaves them (each prompt in one block, decode tokens
interleaved across requests):

==============  ================================================================================
case            what one step is
==============  ================================================================================
dec-b1          a decode step of one request: 70 prompt + 30 generated tokens of KV
dec-b8          8 requests, 60..79 prompt + 25 generated tokens each (also dec-bN for any N)
dec-b40         40 requests, the same lengths
dec-b120        120 requests, the same lengths
dec-b120-pre    120 requests whose prompts start with the same 48 tokens (a cached prefix), then
                12..31 own prompt tokens and 25 generated: the shared-prefix (cascade) path
jf-b1           jump-forward at batch 1: 6 forced tokens after 70 + 20 tokens (an extend)
spec-b1-N       a speculative verify step at batch 1: the last token and N - 1 draft tokens after
                70 + 20 tokens, logits at all N positions (``speculate.py``; any N >= 2)
mixed-b40       a mixed step: 34 decode rows and 6 requests with 2..8 forced tokens each
mixed-b120      100 decode rows and 20 requests with 2..8 forced tokens
prefill-b20     20 prompts of 50..89 tokens, nothing cached (short ones padded together, long
                ones one by one)
engine-S-N      not a model step: the engine on bench_json's batched workload, N records, system S
                (``free`` or ``jf``, as in bench_json); reports the mean ms of its decode steps,
                short extend steps (mixed steps, forced tokens) and prefill steps, and the whole run
==============  ================================================================================

``--compare REV`` extracts ``REV`` of this repository (``git archive``, nothing in the checkout
changes) and runs the cases in alternating subprocesses, baseline and current tree, ``--rounds``
times each, so both see the same machine load; each round reports the median over ``--steps``
steps, and the table shows the median of the rounds and, as the speed-up, the median over rounds
of each round's baseline/current ratio. It also checks that both trees produce the same logits
for the same inputs (max abs diff). Without ``--compare`` only the current tree runs.
``--profile CASE`` prints a torch.profiler table of that case.

    .venv/bin/python benchmarks/bench_cpu_step.py [--compare HEAD] [--rounds 5] [--steps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from revtree import extract_package  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CASES = (
    "dec-b1",
    "dec-b8",
    "dec-b40",
    "dec-b120",
    "dec-b120-pre",
    "jf-b1",
    "mixed-b40",
    "mixed-b120",
    "prefill-b20",
)


def _requests(case: str) -> tuple[list[tuple[int, int, int]], int]:
    """Per request (own prompt tokens, tokens generated before this step, new tokens this step),
    and the length of a prompt prefix all requests share."""
    if case == "dec-b1":
        return [(70, 30, 1)], 0
    if case.startswith("dec-b") and case[5:].isdigit():
        return [(60 + (13 * i) % 20, 25, 1) for i in range(int(case[5:]))], 0
    if case == "dec-b120-pre":
        return [(12 + (13 * i) % 20, 25, 1) for i in range(120)], 48
    if case == "jf-b1":
        return [(70, 20, 6)], 0
    if case.startswith("spec-b1-") and case[8:].isdigit():
        return [(70, 20, int(case[8:]))], 0
    if case in ("mixed-b40", "mixed-b120"):
        n = int(case[7:])
        forced = n // 6
        return [(60 + (13 * i) % 20, 25, 1 if i < n - forced else 2 + i % 7) for i in range(n)], 0
    if case == "prefill-b20":
        return [(0, 0, 50 + (17 * i) % 40) for i in range(20)], 0
    if case.startswith("engine-") and case.split("-")[1] in ("free", "jf") and case.split("-")[-1].isdigit():
        return [], 0
    raise SystemExit(f"unknown case {case!r}; known: {', '.join(CASES)}, engine-free-N, engine-jf-N")


def _batch(case: str, torch):
    """A ForwardBatch for ``case`` with slots laid out as a fresh engine leaves them: the shared
    prefix, then each prompt in one block, then the generated tokens interleaved (a decode step
    takes one slot per request), then this step's forced tokens; returns it and the slots used."""
    from llmir_lang.executor.attention import ForwardBatch, ForwardMode

    reqs, shared = _requests(case)
    g = torch.Generator().manual_seed(0)
    nreq = len(reqs)
    prompt_at, top = [], shared
    for p, _, _ in reqs:
        prompt_at.append(top)
        top += p
    gen_at = top
    top += nreq * max(gen for _, gen, _ in reqs)
    ids, pos, loc, kv_indices, qo, kv, last = [], [], [], [], [0], [0], []
    for b, (p, gen, n) in enumerate(reqs):
        slots = list(range(shared)) + list(range(prompt_at[b], prompt_at[b] + p))
        slots += [gen_at + j * nreq + b for j in range(gen)]
        if n > 1 or not gen:  # a decode row's new token is its last generated one
            slots += range(top, top + n)
            top += n
        kv_indices += slots
        loc += slots[len(slots) - n :]
        pos += range(len(slots) - n, len(slots))
        ids += torch.randint(5, 4000, (n,), generator=g).tolist()
        qo.append(qo[-1] + n)
        kv.append(len(kv_indices))
        # a verify step reads logits at every new position; other extends at the last one
        last += range(qo[-2], qo[-1]) if case.startswith("spec-") else [qo[-1] - 1]

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64)

    decode = all(n == 1 for _, _, n in reqs)
    batch = ForwardBatch(
        mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
        input_ids=t(ids),
        positions=t(pos),
        out_cache_loc=t(loc),
        qo_indptr=t(qo),
        kv_indptr=t(kv),
        kv_indices=t(kv_indices),
        batch_size=nreq,
        logits_indices=None if decode else t(last),
    )
    return batch, top


def measure(
    cases: list[str], steps: int, logits_dir: str | None, profile: str | None, threads: int = 1
) -> dict[str, float]:
    """Median ms per step of each case in this process's tree."""
    import torch

    from llmir_lang.executor.attention import TorchAttentionBackend
    from llmir_lang.executor.loader import load_model

    torch.set_num_threads(threads)
    model = load_model(REPO / "llmir_lang" / "models" / "llmir-tiny", torch.device("cpu"), torch.float32)
    cfg = model.config
    capacity = 16_384  # slots; the pool is random data, laid out as _batch says
    g = torch.Generator().manual_seed(1)
    shape = (capacity + 1, cfg.num_kv_heads, cfg.head_dim)
    kb = [torch.randn(shape, generator=g) for _ in range(cfg.num_layers)]
    vb = [torch.randn(shape, generator=g) for _ in range(cfg.num_layers)]
    backend = TorchAttentionBackend(kb, vb, cfg.head_dim**-0.5)
    out: dict[str, float] = {}
    for case in cases:
        if case.startswith("engine-"):
            out.update(measure_engine(case, threads))
            continue
        fb, used = _batch(case, torch)
        assert used <= capacity
        logits = model(fb, backend)  # the step stores the same K/V each time, so every step is equal
        if logits_dir is not None:
            torch.save(logits, os.path.join(logits_dir, f"{case}.pt"))
        for _ in range(3):
            model(fb, backend)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            model(fb, backend)
            times.append(time.perf_counter() - t0)
        out[case] = statistics.median(times) * 1e3
        if profile == case:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof

            with prof(activities=[ProfilerActivity.CPU]) as p:
                for _ in range(10):
                    model(fb, backend)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
    return out


def measure_engine(case: str, threads: int) -> dict[str, float]:
    """``engine-S-N``: mean ms per step kind of one run of bench_json's batched workload (after a
    warm-up run), timed around ``ModelRunner.run`` on the engine thread."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_json as bj

    from llmir_lang.executor.attention import ForwardMode
    from llmir_lang.executor.backend import EngineBackend
    from llmir_lang.executor.engine import Engine
    from llmir_lang.models.tiny_tasks import extraction_items

    torch.set_num_threads(threads)
    system = {"free": "llmir-free", "jf": "llmir-json-jf"}[case.split("-")[1]]
    backend = EngineBackend(Engine(device="cpu"))
    runner = backend.engine.runner
    items = extraction_items(int(case.split("-")[2]), 2027)
    draft = backend.engine.speculative_draft_tokens  # the engine's default, as bench_json runs it
    bj.run_llmir(backend, system, "batched", items, lambda text: 0, draft)  # warm-up, same shapes
    orig, times = runner.run, {"decode": [], "short": [], "prefill": []}

    def timed(sb):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = orig(sb)
        kind = (
            "decode" if sb.mode is ForwardMode.DECODE else "short" if max(sb.extend_lens) <= 8 else "prefill"
        )
        times[kind].append(time.perf_counter() - t0)
        return out

    runner.run = timed  # type: ignore[method-assign]
    try:
        run = bj.run_llmir(backend, system, "batched", items, lambda text: 0, draft)
    finally:
        del runner.run
        backend.engine.shutdown()
    out = {f"{case}:{k}": 1e3 * sum(v) / len(v) for k, v in times.items() if v}
    out[f"{case}:run"] = 1e3 * run.seconds
    return out


def _run_tree(root: Path, cases: list[str], steps: int, logits_dir: str, threads: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(root), LLMIR_BENCH_ROOT=str(root))
    cmd = [sys.executable, __file__, "--child", "--cases", ",".join(cases), "--steps", str(steps)]
    cmd += ["--threads", str(threads)]
    res = subprocess.run(
        cmd + ["--logits-dir", logits_dir], env=env, capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise SystemExit(f"the run in {root} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=30, help="timed steps per case and round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per tree with --compare")
    ap.add_argument("--compare", default=None, metavar="REV", help="a git revision to compare against")
    ap.add_argument("--profile", default=None, metavar="CASE", help="print a torch.profiler table")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (both trees)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--logits-dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    cases = a.cases.split(",")
    for c in cases:
        _requests(c)  # unknown names fail before anything runs
    if a.child:
        global REPO
        REPO = Path(os.environ.get("LLMIR_BENCH_ROOT", REPO))
        print(json.dumps(measure(cases, a.steps, a.logits_dir, a.profile, a.threads)))
        return
    if a.compare is None:
        sys.path.insert(0, str(REPO))
        for case, ms in measure(cases, a.steps, None, a.profile, a.threads).items():
            print(f"{case:26s} {ms:9.3f} ms")
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        extract_package(REPO, a.compare, base)
        trees = {"base": base, "new": REPO}
        dirs = {k: Path(tmp) / f"logits_{k}" for k in trees}
        rounds: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
        for r in range(a.rounds):
            order = ("base", "new") if r % 2 == 0 else ("new", "base")
            for k in order:
                dirs[k].mkdir(exist_ok=True)
                rounds[k].append(_run_tree(trees[k], cases, a.steps, str(dirs[k]), a.threads))
        print(f"{'case':26s} {a.compare + ' ms':>12s} {'now ms':>10s} {'speed-up':>9s} {'max |dlogit|':>13s}")
        for case in rounds["new"][0]:
            b = statistics.median(x[case] for x in rounds["base"])
            n = statistics.median(x[case] for x in rounds["new"])
            # a round's two runs are adjacent in time: their ratio cancels the machine's slow drifts
            ratio = statistics.median(x[case] / y[case] for x, y in zip(rounds["base"], rounds["new"]))
            diff = "-"
            if (dirs["base"] / f"{case}.pt").exists():
                lb = torch.load(dirs["base"] / f"{case}.pt")
                diff = f"{(lb - torch.load(dirs['new'] / f'{case}.pt')).abs().max().item():.2e}"
            print(f"{case:26s} {b:12.3f} {n:10.3f} {ratio:8.2f}x {diff:>13s}")


if __name__ == "__main__":
    main()
