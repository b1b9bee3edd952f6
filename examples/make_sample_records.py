"""Writes examples/sample_records.jsonl: 60 fresh person texts with ids and their expected records.

The texts come from ``llmir_lang.models.tiny_tasks`` with a fixed seed (values never seen in the
bundled model's training); ``expected`` is what a perfect extraction returns (``check_extraction.py``
compares against it). The file is committed; rerunning this script rewrites it identically.

    python examples/make_sample_records.py [--n 60] [--seed 606] [--output examples/sample_records.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from llmir_lang.models.tiny_tasks import make_extraction_example


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=606)
    ap.add_argument("--output", default=str(Path(__file__).with_name("sample_records.jsonl")))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with open(args.output, "w", encoding="utf-8") as f:
        for i in range(args.n):
            text, record = make_extraction_example(rng, "person")
            f.write(json.dumps({"id": f"person-{i:03d}", "text": text, "expected": record}) + "\n")


if __name__ == "__main__":
    main()
