"""Which reasoning format a request's constraint starts after, route by route (SGLang's reasoner
grammar; the engine's side is ``executor/constraints/reasoning_gate.py``).

SGLang 0.4.10 started with ``--reasoning-parser`` wraps its whole grammar backend
(``ReasonerGrammarBackend``): every constrained request, on ``/generate``, ``/v1/completions``
and ``/v1/chat/completions`` alike, is constrained only once the reasoning has ended, and no
request field turns that off (neither ``separate_reasoning: false`` nor ``enable_thinking:
false``, under which its constraint then never starts). Here:

- ``/generate`` and ``/v1/completions`` do the same: under ``--reasoning-parser X`` a constraint
  (``regex``, ``json_schema``, ``ebnf``, ``guided_*``, ``response_format``) covers what follows
  X's end tag, the reasoning running free. llmir extension: a top-level ``reasoning_parser``
  per request chooses otherwise, a format name (gate after its end tag, on any server) or
  ``null`` (the constraint covers the whole output); absent, the server's parser applies. The
  remote ``Endpoint`` sends it to an llmir server, so that a gen is constrained as on the
  embedded engine whatever the server was started with.
- chat completions follow the request's split instead (``reasoning_stream.chat_reasoning``): no
  split (``separate_reasoning: false``, thinking turned off), no gate.
- ``/program`` ignores the server's parser: a program's gens are gated where its
  ``separate_reasoning`` says, as on the embedded engine (``dsl.reasoning.gated_constraint``).

A constraint that spells the end tag itself stays over the whole output (``gated_by_reasoning``).
"""

from __future__ import annotations

from typing import Any

from llmir_lang.ir.reasoning import gate_tags, reasoning_format_problem
from llmir_lang.server.errors import ServerHTTPError


def checked_parser(name: str, param: str = "reasoning_parser") -> str:
    """``name`` as a format of ``ir.reasoning.FORMATS`` (any case); else a 400 naming ``param``
    that lists the formats."""
    problem = reasoning_format_problem(name.lower())
    if problem is not None:
        raise ServerHTTPError(400, f"{param} {name!r}: {problem}", param=param)
    return name.lower()


def request_parser(body: Any, server_parser: str | None) -> str | None:
    """The format whose end tag starts the constraint of ``body`` (a ``/generate`` or
    ``/v1/completions`` request): its own ``reasoning_parser`` where it sets one (``null``: None),
    else the server's ``--reasoning-parser``."""
    if "reasoning_parser" not in body.model_fields_set:
        return server_parser
    name = body.reasoning_parser
    return None if name is None else checked_parser(name)


def gated(spec: Any, parser: str | None, forced: bool = False) -> Any:
    """``spec`` applied after the reasoning of format ``parser`` (None: as it is). ``forced``: the
    output begins inside the reasoning whatever the format says (a chat template that opened it)."""
    if spec is None or parser is None:
        return spec
    from llmir_lang.executor.constraints import ReasoningTags, gated_by_reasoning

    return gated_by_reasoning(spec, ReasoningTags(*gate_tags(parser, forced)))
