"""``llmir extract``: batch structured extraction, resumable, one JSON line per input record.

    llmir extract --schema person|schema.json|module:Model|file.py:Model --input in.jsonl|in.csv
                  --output out.jsonl [--text-field text] [--id-field id] [--model PATH | --url URL
                  [--api-key K]] [--prompt-file F] [--max-tokens N] [--batch-size N] [--passes P]
                  [--retry-failed] [--no-progress] [--no-fsync]

Each record becomes ``{"id": ..., "record": {...}}`` or, when it fails (empty or missing text, a
malformed input line, a generation error, a value the schema rejects), ``{"id": ..., "error":
"..."}``: a failed record never stops the job. The program is a DSL function (prompt, then
``gen("record", json_schema=...)``) run with ``run_batch`` over chunks of ``--batch-size``
records; lines are written in input order, each as soon as its record and every record before it
have finished, and fsynced (``cli.output.ResumableOutput``), so a rerun after a crash, a Ctrl-C or
a SIGKILL skips every id already in the output and every input id ends up in it exactly once.

What is checked before the output file is touched, each a one-line error and exit 1: the schema
(loaded, and its constraint compiled with the model's tokenizer, so an unsupported keyword or a
dangling ``$ref`` is named now, not written 10 000 times), ``--prompt-file``, ``--passes``, the
output path (not a directory, not the input, not locked by another run), the whole input file
(UTF-8, ``--text-field`` present in some record, an explicit ``--id-field`` present in some
record), the model (``--model`` loads, or ``--url`` answers and takes ``--api-key``). A failure
that is not the record's fault (the server went away or refused the API key, the engine closed, the
disk is full) is not written as the record's error: the job stops there with exit 1 (the chunk
running next to it is stopped too) and a rerun carries on. Ctrl-C (exit 130) and SIGTERM (exit 143)
stop the job the same way, after the summary.

The default prompt is the bundled model's extraction format (``Text: <text>⏎<Kind> JSON:⏎``, the
kind being the schema's name); ``--prompt-file`` is a template where ``{text}`` is replaced by the
record's text (no other braces are interpreted, so templates may hold JSON examples).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

from llmir_lang.cli.extract_job import ExtractAbortedError as ExtractAbortedError
from llmir_lang.cli.extract_job import ExtractTerminated, _Job, _on_sigterm
from llmir_lang.cli.extract_job import extract_program as extract_program
from llmir_lang.cli.extract_setup import (
    _check_passes,
    _check_schema,
    _make_backend,
    _plan,
    _prompt_maker,
    _read_input,
)
from llmir_lang.cli.extract_setup import _check_server as _check_server
from llmir_lang.cli.extract_summary import ExtractSummary, _copy, _warn_duplicates
from llmir_lang.cli.inputs import ExtractInputError, load_schema
from llmir_lang.cli.output import ResumableOutput, check_output_path, id_key, scan_output
from llmir_lang.errors import LLMIRError

DESCRIPTION = """\
Batch structured extraction: run a schema-constrained generation over every record of a JSON lines
or CSV file and write one JSON line per record, resumably (a rerun skips the ids already in
--output). The schema, prompt file, passes, input, output path and model are all checked before the
output is created or changed."""

EPILOG = """\
output: one line per input id, {"id": ..., "record": {...}} or {"id": ..., "error": "..."}; a run
  writes its lines in input order, each once its record and all records before it have finished.
  Records without an id get the id "line:N" (N: JSON-lines line, or CSV row with the header as row 1);
  ids compare by JSON value and type ("7" and 7 are two records); a repeated id is ignored (warned).
  A rerun skips every id already in --output; --retry-failed reruns those whose line is an error
  (their error lines are removed first, so the file keeps exactly one line per id).
exit status: 0 every record of this run succeeded (or there was nothing to do); 1 a record failed
  (its error line is written), a setup error (nothing written), or the backend failed or the output
  could not be written (a full disk) mid-job (the records not yet written are redone by a rerun);
  2 bad arguments; 130 interrupted (Ctrl-C: the summary is printed, a rerun resumes); 143 terminated
  (SIGTERM: the same).
"""


def run_extract(
    ns: argparse.Namespace, backend: Any = None, summary: ExtractSummary | None = None
) -> ExtractSummary:
    """Run the job described by ``ns`` (see ``add_arguments``); ``backend`` overrides the model.

    ``summary`` (filled in place when given) lets a caller report what was done when the job is
    interrupted. Raises ``LLMIRError`` for setup errors (before the output file is created or
    changed) and ``ExtractAbortedError`` when the backend fails mid-job.
    """
    summary = summary if summary is not None else ExtractSummary()
    if ns.api_key is not None and not ns.url:
        raise ExtractInputError("--api-key is the key of a server: give it with --url")
    schema = load_schema(ns.schema)
    make_prompt = _prompt_maker(ns.prompt_file, schema)
    _check_passes(ns.passes)
    check_output_path(ns.output, ns.input)
    records = _read_input(ns)
    summary.total = len(records)  # what an interrupted setup reports; the rest is counted under the lock
    before = scan_output(ns.output)  # read-only: a file that is not ours fails here, untouched
    pending, planned = _plan(records, before.done_ids, before.failed_ids, ns)
    _warn_duplicates(planned)
    if not pending:
        _copy(planned, summary)
        return summary
    own_backend = backend is None
    backend = _make_backend(ns) if own_backend else backend
    bar = None
    try:
        _check_schema(backend, schema)
        out = ResumableOutput(ns.output, fsync=not ns.no_fsync)
        # under the file's lock, the authoritative state: another run may have written since the scan
        with out.open(retry={id_key(r.id) for r in records} if ns.retry_failed else ()):
            if out.truncated_bytes:
                print(
                    f"extract: removed the cut-off last line of --output ({out.truncated_bytes} bytes, "
                    "left by an interrupted write); its record runs again",
                    file=sys.stderr,
                )
            pending, planned = _plan(records, out.done_ids, out.failed_ids, ns, out.retried_ids)
            _copy(planned, summary)
            summary.started = True
            if not pending:
                return summary
            if not ns.no_progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(pending), unit="rec", desc="extract", file=sys.stderr)
            job = _Job(ns, backend, make_prompt, out, schema, summary, bar)
            try:
                # NOTE: the next chunk starts before this one is written, so the engine's batch
                # does not drain at every chunk boundary; lines are still written in input order
                chunks = [pending[i : i + ns.batch_size] for i in range(0, len(pending), ns.batch_size)]
                running = job.start(chunks[0])
                for nxt in chunks[1:]:
                    following = job.start(nxt)
                    job.finish(*running)
                    running = following
                job.finish(*running)
            finally:
                # an interrupt or a backend failure leaves the next chunk running: stop it now,
                # not when the backend shuts down under its threads (or never, on a caller's backend)
                job.stop()
                summary.seconds = time.perf_counter() - job.started
    finally:
        if bar is not None:
            bar.close()
        if own_backend:  # Runtime has shutdown(), the HTTP backends close()
            getattr(backend, "shutdown", getattr(backend, "close", lambda: None))()
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--schema",
        required=True,
        help="schema.json, module:Model (importable from the current folder), file.py:Model, "
        "or person|product|event",
    )
    p.add_argument("--input", required=True, help="input records: .csv, else JSON lines (UTF-8)")
    p.add_argument(
        "--output", required=True, help="output .jsonl (appended to; ids already there are skipped)"
    )
    p.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    p.add_argument(
        "--id-field",
        default=None,
        help='field holding the record id (default: id; a record without one gets "line:N"; '
        "given explicitly, some record must have it)",
    )
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    p.add_argument(
        "--url", default=None, help="run on an llmir/SGLang server at this URL instead of a local model"
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="the --url server's API key (sent as 'Authorization: Bearer KEY'; see llmir serve --api-key)",
    )
    p.add_argument(
        "--prompt-file",
        default=None,
        help="prompt template with {text} (default: the bundled model's format)",
    )
    p.add_argument("--max-tokens", type=int, default=256, help="token limit of one record (default: 256)")
    p.add_argument("--batch-size", type=int, default=64, help="records run together per round (default: 64)")
    p.add_argument("--passes", default=None, help="pass pipeline (default: the default pipeline)")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="run again the input records whose line in --output is an error (that line is removed)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-fsync", action="store_true", help="skip the fsync after each line (faster, less durable)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmir extract")
    add_arguments(p)
    try:
        return run_main(p.parse_args(argv))
    except LLMIRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run_main(ns: argparse.Namespace, backend: Any = None) -> int:
    """The command: runs the job, prints the summary; the exit status is in ``EPILOG``."""
    if ns.batch_size < 1 or ns.max_tokens < 1:
        print("error: --batch-size and --max-tokens must be at least 1", file=sys.stderr)
        return 2
    summary = ExtractSummary()
    # SIGTERM (kill, systemd, a container's stop) stops the job as Ctrl-C does: summary, exit 143
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        run_extract(ns, backend, summary)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, ExtractTerminated)
        summary.stopped = "terminated (SIGTERM)" if terminated else "interrupted"
        print(summary.report(), file=sys.stderr)
        print(f"extract: {summary.stopped}; rerun the same command to resume", file=sys.stderr)
        return 143 if terminated else 130
    except ExtractAbortedError as e:
        summary.stopped = "stopped by a failure"
        print(summary.report(), file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    print(summary.report(), file=sys.stderr)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
