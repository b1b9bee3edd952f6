"""``llmir bench NAME [args...]``: run a benchmark script of the source tree's ``benchmarks/``.

``NAME`` is ``engine``, ``programs``, ``constraints``, ``json``, ``cpu_step`` or ``passes`` (any
``benchmarks/bench_NAME.py``; ``llmir bench`` lists them); the remaining arguments go to the
script, which runs in a child process with this interpreter. The benchmarks are not part of the
installed package: from a wheel this command says so and fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import llmir_lang


def benchmarks_dir() -> Path | None:
    """The ``benchmarks/`` folder next to the package (a source checkout), or None."""
    folder = Path(llmir_lang.__file__).resolve().parent.parent / "benchmarks"
    return folder if folder.is_dir() else None


def available(folder: Path) -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in folder.glob("bench_*.py"))


def bench_main(argv: list[str]) -> int:
    folder = benchmarks_dir()
    if folder is None:
        print(
            "llmir bench: no benchmarks/ folder next to the llmir_lang package; the benchmarks ship "
            "with the source tree only: run this from a git checkout (pip install -e .)",
            file=sys.stderr,
        )
        return 2
    names = available(folder)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: llmir bench NAME [args...]\n  NAME: one of {', '.join(names)}\n  "
              f"`llmir bench NAME --help` shows the benchmark's own options")  # fmt: skip
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    script = folder / f"bench_{name}.py"
    if not script.is_file():
        print(f"llmir bench: unknown benchmark {name!r}; choose one of {', '.join(names)}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    root = str(folder.parent)  # so the script imports this llmir_lang even when it is not installed
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call([sys.executable, str(script), *rest], env=env)
