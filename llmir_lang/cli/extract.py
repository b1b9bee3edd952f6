"""``llmir extract``: batch structured extraction, resumable, one JSON line per input record.

    llmir extract --schema person|schema.json|module:Model|file.py:Model --input in.jsonl|in.csv
                  --output out.jsonl [--text-field text] [--id-field id] [--model PATH | --url URL]
                  [--prompt-file F] [--max-tokens N] [--batch-size N] [--passes P] [--no-progress]

Each record becomes ``{"id": ..., "record": {...}}`` or, when it fails (empty text, a generation
error, a value the schema rejects), ``{"id": ..., "error": "..."}``: a failure never stops the job.
The program is a DSL function (prompt, then ``gen("record", json_schema=...)``) run with
``run_batch`` over chunks of ``--batch-size`` records; each record's line is written and fsynced
as its chunk yields it (``cli.output.ResumableOutput``), so a rerun after a crash or a SIGKILL
skips every id already in the output and every input id ends up in it exactly once.

The default prompt is the bundled model's extraction format (``Text: <text>⏎<Kind> JSON:⏎``, the
kind being the schema's name); ``--prompt-file`` is a template where ``{text}`` is replaced by the
record's text (no other braces are interpreted, so templates may hold JSON examples).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llmir_lang as llmir
from llmir_lang.cli.inputs import ExtractInputError, Schema, load_schema, read_records
from llmir_lang.cli.output import ResumableOutput, id_key


@llmir.function(name="extract")
def extract_program(s: Any, prompt: str, schema: str, max_tokens: int) -> None:
    s += prompt + llmir.gen("record", json_schema=schema, max_tokens=max_tokens)


@dataclass(slots=True)
class ExtractSummary:
    """What one ``llmir extract`` run did (records already in the output are ``skipped``)."""

    total: int = 0
    skipped: int = 0
    duplicates: int = 0  # input rows whose id appeared earlier in the input
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def records_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def line(self) -> str:
        return (
            f"{self.records_per_s:.1f} rec/s, {self.tokens_per_s:.0f} tok/s, cache {self.cache_hit_rate:.0%}"
        )

    def report(self) -> str:
        return (
            f"extract: {self.ok} ok, {self.failed} failed, {self.skipped} already done"
            + (f", {self.duplicates} duplicate ids ignored" if self.duplicates else "")
            + f" (of {self.total} input records)\n"
            f"time {self.seconds:.1f} s, {self.records_per_s:.2f} records/s, {self.tokens_per_s:.0f} output tokens/s, "
            f"cache hit rate {self.cache_hit_rate:.1%} of prompt tokens"
        )


def _prompt_maker(prompt_file: str | None, schema: Schema) -> Any:
    if prompt_file is None:
        from llmir_lang.models.tiny_tasks import extraction_prompt

        return lambda text: extraction_prompt(text, schema.name)
    if not Path(prompt_file).is_file():
        raise ExtractInputError(f"--prompt-file {prompt_file!r}: no such file")
    template = Path(prompt_file).read_text(encoding="utf-8")
    if "{text}" not in template:
        raise ExtractInputError(
            f"--prompt-file {prompt_file!r} has no {{text}} placeholder for the record text"
        )
    return lambda text: template.replace("{text}", text)


def _make_backend(ns: argparse.Namespace) -> Any:
    if ns.url:
        from llmir_lang.executor.remote import Endpoint

        return Endpoint(ns.url)
    return llmir.Runtime(ns.model)


def run_extract(ns: argparse.Namespace, backend: Any = None) -> ExtractSummary:
    """Run the job described by ``ns`` (see ``add_arguments``); ``backend`` overrides the model."""
    schema = load_schema(ns.schema)
    make_prompt = _prompt_maker(ns.prompt_file, schema)
    summary = ExtractSummary()
    with ResumableOutput(ns.output, fsync=not ns.no_fsync) as out:
        pending: list[tuple[Any, Any]] = []  # (id, text or None when missing)
        seen: set[str] = set()
        for _, row in read_records(ns.input, id_field=ns.id_field):
            summary.total += 1
            key = id_key(row[ns.id_field])
            if key in out.done_ids:
                summary.skipped += 1
            elif key in seen:
                summary.duplicates += 1
            else:
                seen.add(key)
                pending.append((row[ns.id_field], row.get(ns.text_field)))
        if not pending:
            return summary
        own_backend = backend is None
        backend = _make_backend(ns) if own_backend else backend
        bar = None
        if not ns.no_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), unit="rec", desc="extract", file=sys.stderr)
        job = _Job(ns, backend, schema, make_prompt, out, summary, bar)
        try:
            # NOTE: the next chunk starts before this one is consumed, so the engine's batch does
            # not drain at every chunk boundary; lines still come out in input order
            chunks = [pending[i : i + ns.batch_size] for i in range(0, len(pending), ns.batch_size)]
            running = job.start(chunks[0])
            for nxt in chunks[1:]:
                following = job.start(nxt)
                job.finish(*running)
                running = following
            job.finish(*running)
        finally:
            summary.seconds = time.perf_counter() - job.started
            if bar is not None:
                bar.close()
            if own_backend:  # Runtime has shutdown(), the HTTP backends close()
                getattr(backend, "shutdown", getattr(backend, "close", lambda: None))()
    return summary


class _Job:
    """One run's context: starts chunks (``run_batch`` in the background), writes their lines."""

    def __init__(
        self,
        ns: argparse.Namespace,
        backend: Any,
        schema: Schema,
        make_prompt: Any,
        out: ResumableOutput,
        summary: ExtractSummary,
        bar: Any,
    ) -> None:
        self.ns, self.backend, self.schema, self.make_prompt = ns, backend, schema, make_prompt
        self.out, self.summary, self.bar = out, summary, bar
        self.schema_text = json.dumps(schema.json_schema)
        self.started = time.perf_counter()

    def write(self, record_id: Any, row: dict[str, Any]) -> None:
        self.out.write({"id": record_id, **row})
        if "error" in row:
            self.summary.failed += 1
        else:
            self.summary.ok += 1
        if self.bar is not None:
            self.summary.seconds = time.perf_counter() - self.started
            self.bar.set_postfix_str(self.summary.line(), refresh=False)
            self.bar.update(1)

    def start(self, chunk: list[tuple[Any, Any]]) -> tuple[list[tuple[Any, Any]], Any]:
        """Write the chunk's records that cannot run; start the others. Returns ``(runnable,
        states iterator or the exception that prevented the batch)``."""
        runnable = []
        for record_id, text in chunk:
            if not isinstance(text, str) or not text.strip():
                what = (
                    "is missing" if text is None else "is empty" if isinstance(text, str) else "is not text"
                )
                self.write(record_id, {"error": f"the text field {self.ns.text_field!r} {what}"})
            else:
                runnable.append((record_id, text))
        if not runnable:
            return runnable, iter(())
        kwargs = [
            {"prompt": self.make_prompt(t), "schema": self.schema_text, "max_tokens": self.ns.max_tokens}
            for _, t in runnable
        ]
        try:
            states = extract_program.run_batch(
                kwargs, backend=self.backend, passes=self.ns.passes, generator_style=True
            )
        except Exception as e:  # a bad pipeline or argument: every record of the chunk fails with it
            return runnable, e
        return runnable, states

    def finish(self, runnable: list[tuple[Any, Any]], states: Any) -> None:
        """Write each started record's line as its program completes (in input order)."""
        try:
            if isinstance(states, Exception):
                raise states
            for (record_id, _), st in zip(runnable, states):
                self.write(record_id, _outcome(st, self.schema, self.summary))
        except Exception as e:  # the batch itself failed (backend down, ...): record it, go on
            for record_id, _ in runnable:
                if id_key(record_id) not in self.out.done_ids:
                    self.write(record_id, {"error": f"{type(e).__name__}: {e}"})


def _outcome(state: Any, schema: Schema, summary: ExtractSummary) -> dict[str, Any]:
    error = state.error()
    if error is not None:
        return {"error": f"{type(error).__name__}: {error}"}
    value = state["record"]
    meta = state.get_meta_info("record")
    summary.prompt_tokens += int(meta.get("prompt_tokens") or 0)
    summary.cached_tokens += int(meta.get("cached_tokens") or 0)
    summary.completion_tokens += int(meta.get("completion_tokens") or 0)
    try:
        return {"record": schema.validate(value)}
    except ValueError as e:
        reason = meta.get("finish_reason")
        hint = " (generation hit --max-tokens)" if reason == "length" else ""
        return {"error": f"{e}{hint}", "output": value}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--schema", required=True, help="schema.json, module:Model, file.py:Model, or person|product|event"
    )
    p.add_argument("--input", required=True, help="input records: .jsonl or .csv")
    p.add_argument(
        "--output", required=True, help="output .jsonl (appended to; ids already there are skipped)"
    )
    p.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    p.add_argument(
        "--id-field", default="id", help="field holding the record id (default: id; else the line number)"
    )
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    p.add_argument(
        "--url", default=None, help="run on an llmir/SGLang server at this URL instead of a local model"
    )
    p.add_argument(
        "--prompt-file",
        default=None,
        help="prompt template with {text} (default: the bundled model's format)",
    )
    p.add_argument("--max-tokens", type=int, default=256, help="token limit of one record (default: 256)")
    p.add_argument("--batch-size", type=int, default=64, help="records run together per round (default: 64)")
    p.add_argument("--passes", default=None, help="pass pipeline (default: the default pipeline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-fsync", action="store_true", help="skip the fsync after each line (faster, less durable)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmir extract", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_main(p.parse_args(argv))


def run_main(ns: argparse.Namespace) -> int:
    if ns.batch_size < 1 or ns.max_tokens < 1:
        print("error: --batch-size and --max-tokens must be at least 1", file=sys.stderr)
        return 2
    summary = run_extract(ns)
    print(summary.report(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
