"""A reasoning model's constraints on a server, for ``Endpoint``: where a server starts a gen's
constraint, and what the request must say so that it starts where the program says.

A gen inside ``separate_reasoning`` has a constraint that starts after the reasoning
(``ConstraintSpec.reasoning``: the model reasons freely up to the end tag, the constraint covers
the answer). SGLang's ``/generate`` cannot say so per request: a server gates by how it was
started. So:

- an SGLang server started with ``--reasoning-parser P`` applies every constraint only after P's
  end tag (0.4.10 wraps its whole grammar backend in ``ReasonerGrammarBackend``), and one started
  without applies every constraint to the whole output. ``_ReasoningGate`` reads P from the
  server's ``/get_server_info`` (once) and raises ``ReasoningParserMismatchError`` before anything
  is sent for a gen the server would constrain otherwise: one inside ``separate_reasoning`` on a
  server without a parser of the same end tag (it would constrain the reasoning too, so the model
  could not reason, and the split would find no answer), or one constrained over its whole output
  on a server with a parser. A server that does not say (no ``/get_server_info``, no
  ``reasoning_parser`` in it: a router, another server) gets the constraint as it is;
- an llmir server takes llmir's ``reasoning_parser`` field per request: the format whose tags the
  constraint carries, or null for a constraint over the whole output, so it constrains exactly as
  the embedded engine does, whatever its own ``--reasoning-parser``.

Unconstrained gens are sent as they are, and ask nothing of the server.

NOTE: the formats are SGLang's parser names, held as plain data (tags, flags) in
``executor/reasoning_formats.py``. The constraint engine knows no names (``ReasoningTags`` are its
data); a server's parser is a name, so this module, at the HTTP edge, reads the table.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from llmir_lang.errors import InvalidRequestError
from llmir_lang.executor.backend import GenStep
from llmir_lang.executor.reasoning_formats import FORMATS, gate_tags
from llmir_lang.executor.remote_errors import ReasoningParserMismatchError, RemoteBackendError

_UNKNOWN = object()  # the server did not say which reasoning parser it runs


def format_of(tags: Any) -> str | None:
    """The first format whose gate has these ``ReasoningTags`` (``gate_tags``), or None."""
    want = (tags.start, tags.end, tags.forced)
    return next((name for name in FORMATS if gate_tags(name) == want), None)


def _end_tag(parser: str) -> str | None:
    fmt = FORMATS.get(parser)
    return None if fmt is None else fmt.end


def llmir_fields(step: GenStep) -> dict[str, Any]:
    """The fields of an llmir server's ``/generate`` body that gate ``step``'s constraint as the
    program says: ``{"reasoning_parser": format or None}``; ``{}`` for an unconstrained gen."""
    spec = step.constraint
    if spec is None:
        return {}
    if spec.reasoning is None:
        return {"reasoning_parser": None}
    name = format_of(spec.reasoning)
    if name is None:
        raise InvalidRequestError(
            f"gen({step.name!r}): no reasoning format has the tags {spec.reasoning.start!r} ... "
            f"{spec.reasoning.end!r}, so the server cannot be told where its constraint starts; use a "
            f"format of separate_reasoning (llmir_lang.ir.reasoning.FORMATS)"
        )
    return {"reasoning_parser": name}


def sglang_gate_problem(
    step: GenStep, server_parser: str | None, url: str
) -> ReasoningParserMismatchError | None:
    """Why an SGLang server whose ``--reasoning-parser`` is ``server_parser`` (None: none) would
    constrain ``step`` otherwise than the program says; None when it would not, or when the
    parser is one whose end tag is not known here."""
    spec = step.constraint
    if spec is None:
        return None
    server_end = None if server_parser is None else _end_tag(server_parser)
    if server_parser is not None and server_end is None:
        return None  # a parser llmir does not know: its end tag cannot be compared
    tags = spec.reasoning
    gen = f"gen({step.name!r})"
    if tags is None:
        if server_parser is None:
            return None
        return ReasoningParserMismatchError(
            f"{gen} has a constraint over its whole output, but the SGLang server at {url} runs "
            f"--reasoning-parser {server_parser}, which applies every constraint only after the "
            f"reasoning's end tag {server_end!r}, so the value would hold the reasoning: put the gen "
            f"inside separate_reasoning(..., model_type={server_parser!r}) (its value is then the "
            "answer, constrained), or start the server without --reasoning-parser",
            server_parser,
            None,
        )
    if server_end == tags.end:
        return None
    wanted = format_of(tags)
    restart = (
        f"start the server with --reasoning-parser {wanted} (or another format whose reasoning ends "
        f"at {tags.end!r})"
        if wanted
        else f"start the server with a --reasoning-parser whose reasoning ends at {tags.end!r}"
    )
    if server_parser is None:
        why = (
            f"the SGLang server at {url} has no --reasoning-parser, so it would constrain the whole "
            "output, reasoning included (the model could not reason, and the split would find no answer)"
        )
    else:
        why = (
            f"the SGLang server at {url} runs --reasoning-parser {server_parser}, whose reasoning "
            f"ends at {server_end!r}"
        )
    return ReasoningParserMismatchError(
        f"{gen} is constrained inside separate_reasoning, so its constraint starts after the "
        f"reasoning's end tag {tags.end!r}, but {why}: {restart}, or move the constrained "
        "gen out of separate_reasoning (its constraint then covers the whole output)",
        server_parser,
        wanted,
    )


class _ReasoningGate:
    """``Endpoint``'s part that gates a gen's constraint where the program says (see the module
    docstring). Needs of the backend: ``protocol``, ``get_server_info()``, ``base_url``."""

    protocol: str
    base_url: str
    get_server_info: Callable[[], dict[str, Any]]

    def _init_reasoning_gate(self) -> None:
        self._server_parser: Any = _UNKNOWN
        self._server_parser_asked = False
        self._server_parser_lock = threading.Lock()

    def _gate_fields(self, step: GenStep) -> dict[str, Any]:
        """The body fields that gate ``step``'s constraint (an llmir server's ``reasoning_parser``);
        on an SGLang server none, after checking that it gates as the program says (raises
        ``ReasoningParserMismatchError`` where it would not)."""
        if step.constraint is None:
            return {}
        if self.protocol == "llmir":
            return llmir_fields(step)
        parser = self._reasoning_parser()
        if parser is not _UNKNOWN:
            problem = sglang_gate_problem(step, parser, self.base_url)
            if problem is not None:
                raise problem
        return {}

    def _reasoning_parser(self) -> Any:
        """The SGLang server's ``reasoning_parser`` (lower case; None: none), from its
        ``/get_server_info``, asked once; ``_UNKNOWN`` when it does not say. A server that
        cannot be reached is asked again next time (its answer is what is remembered)."""
        with self._server_parser_lock:
            if self._server_parser_asked:
                return self._server_parser
            try:
                info = self.get_server_info()
            except RemoteBackendError as e:
                if e.status is None:  # no answer: the request itself will say why
                    return _UNKNOWN
                info = None  # refused (404 on a router, 401, ...): it does not say
            parser: Any = _UNKNOWN
            if isinstance(info, dict) and "reasoning_parser" in info:
                value = info["reasoning_parser"]
                parser = value.lower() if isinstance(value, str) and value else None
            self._server_parser, self._server_parser_asked = parser, True
            return parser
