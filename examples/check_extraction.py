"""Compares an ``llmir extract`` output with the expected records of its input file.

    python examples/check_extraction.py examples/sample_records.jsonl out/sample_extracted.jsonl

Prints how many input ids are in the output (each must be there exactly once), how many records
match their ``expected`` record exactly, and the field accuracy. Exits 1 if an id is missing or
repeated, so ``make run`` fails loudly on a broken job.
"""

from __future__ import annotations

import json
import sys
from collections import Counter


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        expected = {row["id"]: row["expected"] for row in map(json.loads, f) if row.get("expected")}
    with open(argv[1], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    counts = Counter(row["id"] for row in rows)
    got = {row["id"]: row.get("record") for row in rows}
    missing = [i for i in expected if i not in counts]
    repeated = [i for i, n in counts.items() if n > 1]
    exact = sum(got.get(i) == rec for i, rec in expected.items())
    fields = sum(len(rec) for rec in expected.values())
    right = sum(
        isinstance(got.get(i), dict) and got[i].get(k) == v
        for i, rec in expected.items()
        for k, v in rec.items()
    )
    failed = sum(1 for row in rows if "error" in row)
    print(
        f"check: {len(expected) - len(missing)}/{len(expected)} ids present, {len(repeated)} repeated, "
        f"{failed} failed; exact records {exact}/{len(expected)} ({exact / max(len(expected), 1):.1%}), "
        f"field accuracy {right / max(fields, 1):.1%}"
    )
    return 1 if missing or repeated else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
