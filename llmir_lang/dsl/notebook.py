"""Jupyter support: an HTML view of a ``ProgramState``, live streaming into a cell, ``%%llmir``.

- ``render_state_html(state)`` is what ``ProgramState._repr_html_`` shows: one block per chat role
  (the template's marker text dimmed), constant text plain, every generated variable highlighted
  with a tooltip naming it and giving its token counts and cached tokens (``get_meta_info``), and
  a footer with the totals. All text goes through ``html.escape``; the CSS is inline, no JS.
- ``display_stream(state)`` shows a streamed run (``f.run(..., stream=True)``) as it is produced:
  in IPython, one ``display_id`` output updated in place; without IPython, chunks on stdout.
  Interrupting it (the notebook's interrupt) stops the program: its requests are aborted.
- ``%%llmir`` (``%load_ext llmir_lang`` or ``llmir_lang.dsl.notebook``) runs the cell as a quick
  prompt on the default backend; ``run_cell_prompt`` is the same without IPython. In IPython its
  errors are one line (``CellMagicError``): a traceback would only show llmir_lang's frames.

The renderer reads the state's recorded pieces without syncing, so it never blocks: a state that
is still running shows what is known so far (streamed text of a gen in progress included).
"""

from __future__ import annotations

import argparse
import html
import shlex
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from llmir_lang.dsl.errors import DSLError
from llmir_lang.dsl.primitives import is_anonymous
from llmir_lang.errors import LLMIRError, ProgramError

if TYPE_CHECKING:
    from llmir_lang.dsl.recorder import Piece
    from llmir_lang.dsl.state import ProgramState

_CSS = (
    "<style>"
    ".llmir-state{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;line-height:1.5;"
    "border:1px solid #d0d7de;border-radius:6px;padding:6px 8px;white-space:pre-wrap;"
    "word-break:break-word;color:#1f2328;background:#fff}"
    ".llmir-role{border-left:3px solid #8c959f;margin:4px 0;padding:2px 8px;border-radius:3px}"
    ".llmir-role-system{border-color:#8250df;background:#fbf8ff}"
    ".llmir-role-user{border-color:#0969da;background:#f6faff}"
    ".llmir-role-assistant{border-color:#1a7f37;background:#f6fff8}"
    ".llmir-role-label{font-weight:600;font-size:11px;text-transform:uppercase;color:#57606a;"
    "display:block}"
    ".llmir-marker{color:#8c959f}"
    ".llmir-gen{background:#fff3b0;border-bottom:2px solid #d4a72c;border-radius:2px}"
    ".llmir-select{background:#d8f3ff;border-bottom:2px solid #218bff;border-radius:2px}"
    ".llmir-pending{background:#eaeef2;color:#57606a;font-style:italic}"
    ".llmir-failed{background:#ffebe9;color:#cf222e;border-bottom:2px solid #cf222e}"
    ".llmir-var{font-size:10px;color:#57606a;vertical-align:super;margin-left:1px}"
    ".llmir-footer{margin-top:6px;border-top:1px solid #d0d7de;padding-top:4px;color:#57606a;"
    "font-size:11px;white-space:normal}"
    "</style>"
)


@dataclass(slots=True)
class _Totals:
    """What the footer sums over the state's generated pieces."""

    gens: int = 0
    selects: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    pending: int = 0
    failed: int = 0


def _snapshot(state: ProgramState) -> tuple[list[Piece], dict[int, str]]:
    """The pieces and the streamed text of gens in progress, taken under the stream lock (chunks
    arrive on the engine's thread); not the pieces after the point where the program stopped."""
    with state._stream_lock:
        return [p for p in state._pieces if id(p) not in state._dropped], dict(state._received)


def _var_title(piece: Piece) -> str:
    """The tooltip of a generated span: variable name, token counts, cache hits, finish reason."""
    meta = piece.meta or {}
    parts = [f"{piece.kind} {piece.name!r}" if not is_anonymous(piece.name or "") else piece.kind]
    if piece.kind == "select" and "choices" in meta:
        scores = meta.get("normalized_logprobs") or []
        ranked = ", ".join(f"{c!r}: {s:.3f}" for c, s in zip(meta["choices"], scores))
        parts.append(f"choices (mean token logprob): {ranked}")
    for key, label in (
        ("completion_tokens", "completion tokens"),
        ("prompt_tokens", "prompt tokens"),
        ("cached_tokens", "cached tokens"),
        ("finish_reason", "finish"),
    ):
        if key in meta and meta[key] is not None:
            parts.append(f"{label}: {meta[key]}")
    if piece.failure is not None:
        parts.append(f"failed: {piece.failure}")
    return "\n".join(parts)


def _gen_span(piece: Piece, streamed: str | None, totals: _Totals) -> str:
    if piece.failure is not None:
        cls, text = "llmir-failed", piece.text or "failed"
        totals.failed += 1
    elif piece.text is None:
        cls, text = "llmir-pending", streamed if streamed else "…"
        totals.pending += 1
    else:
        cls, text = ("llmir-select" if piece.kind == "select" else "llmir-gen"), piece.text
    meta = piece.meta or {}
    if piece.text is not None and piece.failure is None:
        if piece.kind == "select":
            totals.selects += 1
        else:
            totals.gens += 1
        for key in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            value = meta.get(key)
            if isinstance(value, int):
                setattr(totals, key, getattr(totals, key) + value)
    label = "" if not piece.name or is_anonymous(piece.name) else piece.name
    tag = f'<sup class="llmir-var">{html.escape(label)}</sup>' if label else ""
    return (
        f'<span class="{cls}" title="{html.escape(_var_title(piece), quote=True)}">'
        f"{html.escape(text)}</span>{tag}"
    )


def render_state_html(state: ProgramState) -> str:
    """A self-contained HTML view of ``state`` (see the module docstring); never blocks."""
    pieces, received = _snapshot(state)
    totals = _Totals()
    out: list[str] = [_CSS, '<div class="llmir-state">']
    in_role = False
    for piece in pieces:
        if piece.kind == "role" and piece.begin:
            if in_role:  # unbalanced only if a program failed mid-block; close what is open
                out.append("</div>")
            role = html.escape(piece.role or "")
            out.append(
                f'<div class="llmir-role llmir-role-{role}"><span class="llmir-role-label">{role}</span>'
            )
            out.append(f'<span class="llmir-marker">{html.escape(piece.text or "")}</span>')
            in_role = True
        elif piece.kind == "role":
            out.append(f'<span class="llmir-marker">{html.escape(piece.text or "")}</span>')
            if in_role:
                out.append("</div>")
            in_role = False
        elif piece.kind in ("gen", "select"):
            out.append(_gen_span(piece, received.get(id(piece)), totals))
        else:
            out.append(html.escape(piece.text or ""))
    if in_role:
        out.append("</div>")
    out.append(_footer(state, totals))
    out.append("</div>")
    return "".join(out)


def _footer(state: ProgramState, totals: _Totals) -> str:
    parts = [
        f"{totals.gens} gen{'s' if totals.gens != 1 else ''}",
        f"{totals.selects} select{'s' if totals.selects != 1 else ''}",
        f"{totals.completion_tokens} completion tokens",
        f"{totals.prompt_tokens} prompt tokens ({totals.cached_tokens} cached)",
    ]
    if totals.pending:
        parts.append(f"{totals.pending} pending")
    if totals.failed:
        parts.append(f"{totals.failed} failed")
    running = not state._run.finished.is_set()
    error = state._run.error
    status = "running" if running else ("error: " + str(error) if error is not None else "finished")
    parts.append(status)
    return f'<div class="llmir-footer">{html.escape(" · ".join(parts))}</div>'


# --- live streaming --------------------------------------------------------------------------
def _ipython_display() -> Any:
    """IPython's ``display`` and ``HTML`` when running under a kernel/shell, else None."""
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        return None
    if get_ipython() is None:
        return None
    return display, HTML


def display_stream(
    state: ProgramState,
    var: str | None = None,
    *,
    interval: float = 0.1,
    file: TextIO | None = None,
) -> ProgramState:
    """Show ``state`` as it is produced and return it once the program has finished.

    Under IPython (and no ``file`` given): one HTML output (``display_id``) re-rendered at most
    every ``interval`` seconds and once at the end. Otherwise: the text (or variable ``var``'s
    text) printed to ``file`` (stdout) chunk by chunk. A run without ``stream=True`` is shown at
    once, in full.

    A KeyboardInterrupt while it waits (the notebook's interrupt) stops the program before it is
    raised: its requests are aborted, and the view shows where it stopped.
    """
    __tracebackhide__ = True
    shown = _ipython_display() if file is None else None
    handle: Any = None
    try:
        if shown is None:
            sink = file if file is not None else sys.stdout
            for chunk in state._text_iter(var, strict=False):
                sink.write(chunk)
                sink.flush()
            sink.write("\n")
            state.sync()
            return state
        display, html_type = shown
        handle = display(html_type(render_state_html(state)), display_id=True)
        last = time.monotonic()
        for _ in state._text_iter(var, strict=False):
            now = time.monotonic()
            if now - last >= interval:
                handle.update(html_type(render_state_html(state)))
                last = now
        state.sync()
        handle.update(html_type(render_state_html(state)))
        return state
    except KeyboardInterrupt:
        state._run.cancel("display_stream() was interrupted")
        # a stopped program ends at once (its requests are aborted); show where it stopped
        if state._run.finished.wait(_STOP_WAIT) and handle is not None:
            handle.update(shown[1](render_state_html(state)))
        raise


_STOP_WAIT = 5.0  # seconds an interrupted display_stream waits for the program to stop


# --- %%llmir -----------------------------------------------------------------------------------
class CellMagicError(ProgramError):
    """The ``%%llmir`` line or cell is not usable, or its prompt failed (``__cause__`` is the
    program's error); the message says what to change. IPython shows it as its message alone."""

    def _render_traceback_(self) -> list[str]:
        # IPython's hook for exceptions that render themselves: the frames are all llmir_lang's
        return [f"{type(self).__name__}: {self}"]


class _MagicParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print the usage to stderr and raise SystemExit(2)
        raise CellMagicError(f"%%llmir: {message}; {MAGIC_USAGE}")


def _magic_parser() -> argparse.ArgumentParser:
    p = _MagicParser(prog="%%llmir", add_help=False, exit_on_error=False)
    p.add_argument("--chat", action="store_true", help="the cell is a user message; reply as assistant")
    p.add_argument("--system", default=None, help="a system message (implies --chat)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--stop", action="append", default=None)
    p.add_argument("--var", default="answer", help="the name of the generated variable")
    p.add_argument("--out", default="_llmir", help="the notebook variable that receives the state")
    p.add_argument("--no-stream", action="store_true")
    return p


MAGIC_USAGE = _magic_parser().format_usage().strip()


def parse_magic_line(line: str) -> argparse.Namespace:
    """The options of a ``%%llmir`` line; a typed error (with the usage) on a bad line."""
    try:
        ns = _magic_parser().parse_args(shlex.split(line))
    except (argparse.ArgumentError, ValueError) as e:
        raise CellMagicError(f"%%llmir: cannot read the line {line!r}: {e}; {MAGIC_USAGE}") from None
    if ns.max_tokens < 1:
        raise CellMagicError(f"%%llmir: --max-tokens must be >= 1, got {ns.max_tokens}")
    if not ns.var.isidentifier() or not ns.out.isidentifier():
        raise CellMagicError("%%llmir: --var and --out must be Python identifiers")
    return ns


def run_cell_prompt(
    line: str, cell: str, namespace: dict[str, Any] | None = None, *, backend: Any = None
) -> ProgramState:
    """Run ``cell`` as a prompt: plain text followed by a gen, or with ``--chat`` / ``--system`` a
    user message and an assistant reply. Streams unless ``--no-stream``; the state goes to
    ``namespace[--out]`` (default ``_llmir``) and is returned. A failed program raises its error
    (a streamed one after it is shown, and after the state went to ``namespace``)."""
    __tracebackhide__ = True
    from llmir_lang.dsl.function import function
    from llmir_lang.dsl.primitives import assistant, gen, system, user

    ns = parse_magic_line(line)
    prompt = cell.strip("\n")
    if not prompt.strip():
        raise CellMagicError("%%llmir: the cell is empty; write the prompt in the cell body")
    gen_args: dict[str, Any] = {"max_tokens": ns.max_tokens}
    if ns.temperature is not None:
        gen_args["temperature"] = ns.temperature
    if ns.stop:
        try:
            gen_args["stop"] = [s.encode().decode("unicode_escape") for s in ns.stop]
        except UnicodeDecodeError as e:
            raise CellMagicError(f"%%llmir: --stop {ns.stop!r} has a bad escape ({e.reason})") from None
    try:  # checked now, so that a bad value is a line error and not a failed program
        answer = gen(ns.var, **gen_args)
    except DSLError as e:
        raise CellMagicError(f"%%llmir: {e.cause_message}") from None
    chat = ns.chat or ns.system is not None

    def cell_prompt(s: Any) -> None:
        if chat:
            if ns.system is not None:
                s += system(ns.system)
            s += user(prompt)
            s += assistant(answer)
        else:
            s += prompt
            s += answer

    program = function(cell_prompt, name="llmir_cell")
    state = program.run(backend=backend, stream=not ns.no_stream)
    if not ns.no_stream:
        display_stream(state)
    if namespace is not None:
        namespace[ns.out] = state
    if state.error() is not None:
        raise state.error()
    return state


def _llmir_cell_magic(line: str, cell: str) -> ProgramState | None:
    from IPython import get_ipython

    try:
        if {"-h", "--help"} & set(shlex.split(line)):
            print(_magic_parser().format_help())
            return None
    except ValueError:
        pass  # an unclosed quote: parse_magic_line says so
    shell = get_ipython()
    try:
        state = run_cell_prompt(line, cell, shell.user_ns if shell is not None else None)
    except CellMagicError:
        raise
    except LLMIRError as e:  # no backend, a failed generation: the message says it all
        raise CellMagicError(f"%%llmir: {type(e).__name__}: {e}") from e
    # a streamed prompt is already on screen; otherwise the result is the cell's output
    return state if parse_magic_line(line).no_stream else None


_llmir_cell_magic.__doc__ = (
    "Run the cell as a prompt on the default backend (llmir.set_default_backend) and stream the\n"
    "answer into the cell. --chat makes the cell a user message answered as the assistant;\n"
    "the state goes to the variable _llmir (or --out NAME); --no-stream shows it at the end.\n\n"
    + _magic_parser().format_help()
)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext llmir_lang.dsl.notebook``: registers the ``%%llmir`` cell magic."""
    ipython.register_magic_function(_llmir_cell_magic, magic_kind="cell", magic_name="llmir")


def iter_html_frames(state: ProgramState, var: str | None = None) -> Iterator[str]:
    """The HTML view after each streamed chunk (and once at the end): what ``display_stream``
    shows, for front ends other than IPython."""
    for _ in state._text_iter(var, strict=False):
        yield render_state_html(state)
    state.sync()
    yield render_state_html(state)


def state_summary(state: ProgramState) -> Mapping[str, int]:
    """The footer's totals as numbers (gens, selects, prompt / completion / cached tokens)."""
    pieces, received = _snapshot(state)
    totals = _Totals()
    for piece in pieces:
        if piece.kind in ("gen", "select"):
            _gen_span(piece, received.get(id(piece)), totals)
    return {
        "gens": totals.gens,
        "selects": totals.selects,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "cached_tokens": totals.cached_tokens,
        "pending": totals.pending,
        "failed": totals.failed,
    }


__all__ = [
    "CellMagicError",
    "display_stream",
    "iter_html_frames",
    "load_ipython_extension",
    "parse_magic_line",
    "render_state_html",
    "run_cell_prompt",
    "state_summary",
]
