"""``llmir extract`` before the job: the checks made before the output file is touched (prompt
file, passes, input, server, schema), the backend, and the plan of the records this run does."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llmir_lang as llmir
from llmir_lang.cli.extract_summary import ExtractSummary
from llmir_lang.cli.inputs import ExtractInputError, InputRecord, Schema, read_records, where_in
from llmir_lang.cli.output import id_key
from llmir_lang.errors import LLMIRError
from llmir_lang.executor.tokenizer import lone_surrogate


@dataclass(slots=True)
class _Item:
    """One record to process: its id, its text, or the error it gets without running."""

    id: Any
    text: str | None = None
    error: str | None = None


def _prompt_maker(prompt_file: str | None, schema: Schema) -> Any:
    if prompt_file is None:
        from llmir_lang.models.tiny_tasks import extraction_prompt

        return lambda text: extraction_prompt(text, schema.name)
    if not Path(prompt_file).is_file():
        raise ExtractInputError(f"--prompt-file {prompt_file!r}: no such file")
    data = Path(prompt_file).read_bytes()
    try:
        template = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExtractInputError(
            f"--prompt-file {prompt_file!r} is not UTF-8 ({where_in(data, e.start)}); convert it to UTF-8"
        ) from None
    if "{text}" not in template:
        raise ExtractInputError(
            f"--prompt-file {prompt_file!r} has no {{text}} placeholder for the record text"
        )
    return lambda text: template.replace("{text}", text)


def _check_passes(passes: str | None) -> None:
    """A bad ``--passes`` is the same error for every record: refuse it before the job starts."""
    if passes is not None:
        from llmir_lang.optimizer import PassManager, PassPipelineError

        try:
            PassManager(passes)
        except PassPipelineError as e:  # names the unknown pass / option
            raise PassPipelineError(f"--passes: {e}") from None


def _read_input(ns: argparse.Namespace) -> list[InputRecord]:
    """Every input record, after the whole-file checks (see the module docstring)."""
    id_field = ns.id_field or "id"
    records = list(read_records(ns.input, id_field=id_field))
    rows = [r.row for r in records if r.row is not None]
    if records and not rows:
        # a plain text file, a JSON array or a pretty-printed JSON document (or a CSV file whose
        # every row is split by unquoted commas): every line would be written as an error line
        # (and skipped by every rerun), so refuse it before the job
        first = records[0]
        if _is_csv(ns.input):
            raise ExtractInputError(
                f"--input {ns.input!r}: no row matches the header (row {first.line} is {first.problem})"
            )
        raise ExtractInputError(
            f"--input {ns.input!r}: no line is a JSON object (line {first.line} is {first.problem}); "
            'the input is JSON lines, one object per line such as {"id": 1, "text": "..."} '
            "(or CSV with a header, for a name ending in .csv)"
        )
    if rows and not any(ns.text_field in row for row in rows):
        raise ExtractInputError(
            f"--text-field {ns.text_field!r}: no record of {ns.input} has this field "
            f"(the first record's fields: {', '.join(map(str, rows[0])) or 'none'})"
        )
    if rows and ns.id_field is not None and not any(r.row is not None and not r.auto_id for r in records):
        raise ExtractInputError(
            f"--id-field {ns.id_field!r}: no record of {ns.input} has this field "
            f"(the first record's fields: {', '.join(map(str, rows[0])) or 'none'})"
        )
    auto = {r.id: r.line for r in records if r.auto_id}
    for r in records:
        if not r.auto_id and isinstance(r.id, str) and r.id in auto:
            raise ExtractInputError(
                f"{ns.input}: the record at line {r.line} has the id {r.id!r}, which is the id given to "
                f"line {auto[r.id]} (it has no {id_field!r}); give that record an id, or rename this one"
            )
    return records


def _is_csv(path: str) -> bool:
    """``read_records``' rule: a ``.csv`` name is CSV, except standard input (always JSON lines)."""
    return str(path) != "-" and Path(path).suffix.lower() == ".csv"


def _text_problem(text: Any, text_field: str) -> str | None:
    if not isinstance(text, str) or not text.strip():
        what = "is missing" if text is None else "is empty" if isinstance(text, str) else "is not text"
        return f"the text field {text_field!r} {what}"
    bad = lone_surrogate(text)
    if bad is not None:  # valid in JSON text (\ud800), but no tokenizer can encode it
        return (
            f"the text has an invalid character (lone surrogate U+{ord(bad.group()):04X}) at "
            f"position {bad.start()}"
        )
    return None


def _plan(
    records: list[InputRecord],
    done: set[str],
    failed: set[str],
    ns: argparse.Namespace,
    retried: set[str] | frozenset[str] = frozenset(),
) -> tuple[list[_Item], ExtractSummary]:
    """The records this run processes (input order, first occurrence of each id), and the counts
    of the others. Ids in ``failed`` are redone with ``--retry-failed``, else skipped; ``retried``
    are ids whose error lines ``ResumableOutput.open`` already removed."""
    summary = ExtractSummary(total=len(records))
    pending: list[_Item] = []
    seen: set[str] = set()
    for rec in records:
        key = id_key(rec.id)
        if key in seen:
            summary.duplicates += 1
            summary.duplicate_lines.append(rec.line)
            continue
        seen.add(key)
        if key in done and not (ns.retry_failed and key in failed):
            summary.skipped += 1
            summary.skipped_failed += key in failed
            continue
        summary.retried += key in done or key in retried
        if rec.row is None:
            summary.malformed += 1
            unit = "row" if _is_csv(ns.input) else "line"
            pending.append(_Item(rec.id, error=f"input {unit} {rec.line} is {rec.problem}"))
        else:
            text = rec.row.get(ns.text_field)
            problem = _text_problem(text, ns.text_field)
            pending.append(_Item(rec.id, None if problem else text, problem))
    return pending, summary


def _make_backend(ns: argparse.Namespace) -> Any:
    if ns.url:
        from llmir_lang.executor.remote import Endpoint

        _check_server(ns.url, ns.api_key)
        return Endpoint(ns.url, ns.api_key)
    return llmir.Runtime(ns.model)


def _check_server(url: str, api_key: str | None = None) -> None:
    """Abort before the job if the server does not answer: one ``GET /health`` (an llmir and an
    SGLang server answer it; any answer below 500, even a 404, means something is listening); then,
    as ``/health`` needs no key, one ``GET /get_model_info`` with ``api_key``: a 401 / 403 there
    (llmir and SGLang check the key before the route) means the key is missing or wrong."""
    import httpx

    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(base + "/health", timeout=10.0)
        if r.status_code < 500:
            auth = httpx.get(base + "/get_model_info", headers=headers, timeout=10.0)
    except httpx.HTTPError as e:
        raise ExtractInputError(
            f"--url {url!r}: the server does not answer ({type(e).__name__}: {e}); start it, or check the URL"
        ) from None
    if r.status_code >= 500:
        raise ExtractInputError(
            f"--url {url!r}: the server is not healthy (GET /health: HTTP {r.status_code})"
        )
    if auth.status_code in (401, 403):
        raise ExtractInputError(f"--url {url!r}: {_auth_problem(api_key, auth.status_code)}")


def _auth_problem(api_key: str | None, status: int | None) -> str:
    what = "needs an API key: give it with --api-key" if not api_key else "refused --api-key (a wrong key?)"
    return f"the server {what} (HTTP {status})"


def _check_schema(backend: Any, schema: Schema) -> None:
    """Compile the schema's constraint now, as the engine will for every record, so that a schema
    no engine can enforce is one error before the job instead of one per record. A local model
    compiles it with the backend's own compiler (which caches it, so the records reuse it); for a
    server (whose tokenizer is not at hand) the bundled model's tokenizer is used: which keywords
    are supported does not depend on the tokenizer."""
    from llmir_lang.executor.constraints import ConstraintCompiler, TokenizerInfo, spec_from_json_schema

    spec = spec_from_json_schema(schema.json_schema)
    local = getattr(backend, "backend", backend)  # a Runtime wraps its EngineBackend
    if hasattr(local, "compile"):
        compile_spec = local.compile
    else:
        from llmir_lang.models import TINY_MODEL_DIR

        if not (TINY_MODEL_DIR / "tokenizer.json").is_file():
            return  # no tokenizer to compile with: the server checks it, per record
        from llmir_lang.executor.tokenizer_files import bundled_tokenizer

        tokenizer = bundled_tokenizer(TINY_MODEL_DIR)  # without transformers' 1.5 s of imports
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(TINY_MODEL_DIR))
        compile_spec = ConstraintCompiler(TokenizerInfo.from_hf(tokenizer)).compile
    try:
        compile_spec(spec)
    except LLMIRError as e:
        raise ExtractInputError(f"--schema: the JSON schema cannot be used for generation: {e}") from None
