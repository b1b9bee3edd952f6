"""Evaluate ``llmir-tiny`` (or any checkpoint trained on ``tiny_tasks``) with plain ``transformers``.

Extraction: ``--n`` fresh texts (kinds in turn; use a ``--seed`` that training did not use), greedy
decoding with ``AutoModelForCausalLM.generate`` from ``extraction_prompt(text, kind)``. A field is
right when the generated JSON parses to an object whose value for that key equals the true value,
with the same JSON type (``1`` is not ``true``). Prints field accuracy over all fields of all
records, the JSON-parse rate, whole-record accuracy and per-kind field accuracy; exits 1 when field
accuracy is under ``--min-accuracy``. With ``--qa-n`` it also scores few-shot Q&A answers.

    python scripts/eval_tiny_model.py --model llmir_lang/models/llmir-tiny --n 200 --seed 12345

Takes about a minute on a laptop CPU; pass ``--device cuda`` where there is a GPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch


def _import_tiny_tasks():
    """``llmir_lang.models.tiny_tasks``, loaded from its file when llmir_lang is not installed.

    NOTE: the repository root is deliberately kept off ``sys.path``: its top-level ``kernels/``
    folder would shadow the optional Hugging Face ``kernels`` package that transformers probes for.
    """
    try:
        from llmir_lang.models import tiny_tasks
    except ImportError:
        import importlib.util

        path = Path(__file__).resolve().parent.parent / "llmir_lang" / "models" / "tiny_tasks.py"
        spec = importlib.util.spec_from_file_location("tiny_tasks", path)
        tiny_tasks = importlib.util.module_from_spec(spec)
        sys.modules["tiny_tasks"] = tiny_tasks
        spec.loader.exec_module(tiny_tasks)
    return tiny_tasks


tiny_tasks = _import_tiny_tasks()


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _load(model_dir: str | Path, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    return tok, model


@torch.no_grad()
def greedy_complete(tok, model, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations (special tokens dropped), batched with left padding."""
    eos = model.generation_config.eos_token_id
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        outs += tok.batch_decode(new, skip_special_tokens=True)
    return outs


def evaluate_extraction(
    model_dir: str | Path, n: int, seed: int, device: str = "cpu", batch_size: int = 20
) -> dict[str, Any]:
    tok, model = _load(model_dir, device)
    rng = random.Random(seed)
    kinds = [tiny_tasks.EXTRACTION_KINDS[i % len(tiny_tasks.EXTRACTION_KINDS)] for i in range(n)]
    examples = [tiny_tasks.make_extraction_example(rng, k) for k in kinds]
    prompts = [tiny_tasks.extraction_prompt(text, k) for (text, _), k in zip(examples, kinds)]
    outputs = greedy_complete(tok, model, prompts, max_new_tokens=160, batch_size=batch_size)
    per_kind: dict[str, list[int]] = {k: [0, 0] for k in tiny_tasks.EXTRACTION_KINDS}
    right = total = parsed = whole = 0
    failures = []
    for kind, (text, record), out in zip(kinds, examples, outputs):
        try:
            got = json.loads(out.strip())
        except json.JSONDecodeError:
            got = None
        if isinstance(got, dict):
            parsed += 1
        else:
            got = {}
        ok = sum(_same(got.get(key), value) for key, value in record.items())
        right, total = right + ok, total + len(record)
        per_kind[kind][0] += ok
        per_kind[kind][1] += len(record)
        whole += ok == len(record) and len(got) == len(record)
        if ok < len(record):
            failures.append({"text": text, "want": tiny_tasks.format_record(record), "got": out})
    return {
        "n": n,
        "field_accuracy": right / max(1, total),
        "parse_rate": parsed / max(1, n),
        "record_accuracy": whole / max(1, n),
        "per_kind": {k: round(r / max(1, t), 4) for k, (r, t) in per_kind.items()},
        "failures": failures,
    }


def evaluate_qa(
    model_dir: str | Path, n: int, seed: int, device: str = "cpu", shots: int = 4
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers to few-shot Q&A prompts, per Q&A kind."""
    tok, model = _load(model_dir, device)
    rng = random.Random(seed + 1)
    result = {}
    for kind in tiny_tasks.QA_KINDS:
        prompts, answers = [], []
        for _ in range(n):
            facts, pairs = tiny_tasks.make_qa_set(rng, kind, shots + 1)
            prompts.append(tiny_tasks.few_shot_prompt(pairs[:-1], pairs[-1][0], facts))
            answers.append(pairs[-1][1])
        outs = greedy_complete(tok, model, prompts, max_new_tokens=8, batch_size=50)
        result[kind] = round(sum(o.split("\n")[0] == a for o, a in zip(outs, answers)) / max(1, n), 4)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Evaluate llmir-tiny on fresh synthetic extraction texts.")
    p.add_argument(
        "--model", default=str(Path(__file__).resolve().parent.parent / "llmir_lang/models/llmir-tiny")
    )
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=12345, help="a seed the training corpus did not use")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--min-accuracy", type=float, default=0.9)
    p.add_argument("--qa-n", type=int, default=0, help="also score this many few-shot Q&A prompts per kind")
    p.add_argument("--show-failures", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))

    report = evaluate_extraction(args.model, args.n, args.seed, args.device, args.batch_size)
    for f in report["failures"][: args.show_failures]:
        print(f"FAIL {f['text']}\n  want {f['want']}\n  got  {f['got']}")
    print(f"texts: {report['n']}  seed: {args.seed}")
    print(f"field accuracy:  {report['field_accuracy']:.4f}")
    print(f"JSON parse rate: {report['parse_rate']:.4f}")
    print(f"record accuracy: {report['record_accuracy']:.4f}")
    print("per kind:        " + ", ".join(f"{k} {v:.4f}" for k, v in report["per_kind"].items()))
    if args.qa_n:
        qa = evaluate_qa(args.model, args.qa_n, args.seed, args.device)
        print("few-shot Q&A:    " + ", ".join(f"{k} {v:.3f}" for k, v in qa.items()))
    if report["field_accuracy"] < args.min_accuracy:
        print(f"field accuracy {report['field_accuracy']:.4f} is under --min-accuracy {args.min_accuracy}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
