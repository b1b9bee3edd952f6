"""Grammars the engine cannot run as lark reads them, found from lark's reading of their rules.

- A rule that never finishes (``start: "a" start``: every alternative needs itself again): as
  the start rule no text is complete, and the engine would generate until ``max_tokens``
  (``UnsatisfiableConstraintError``); elsewhere lark drops the alternatives that use it, while
  llguidance lets a value start down one and then fails it (``UnsupportedGrammarError``).
- A terminal that can only begin with text ``%ignore`` skips (``" "`` with ``%ignore WS``): the
  two read such text differently (``_ignored_terminal``).
- A terminal that swallows all that can follow it. Terminals match the longest text they can
  (lark's regexes are greedy, llguidance's lexer too), so with ``start: A "a"`` and ``A: /a+/``
  the ``a`` that should end the text is taken by ``A`` and no text gets past it. Where the
  terminal ends in a repeat of a fixed text (``/a+/``, ``/-+/``, ``"b" "a"*``) and every terminal
  that can follow it starts with that text's first byte, llguidance's forced-bytes loop never
  ends: the first mask computed there hangs the caller for good (llguidance 1.x has no bound on
  it). Refused as ``UnsupportedGrammarError`` before any matcher is built.

The last check is narrow on purpose (what can follow the terminal is merged over every place in
the grammar that may be the same point of a text, and a place where another terminal can still be
matching the same text is left alone): one it refuses would hang, but a grammar it passes may
still reach such a point, in a context only a parse tells apart (``start: "x" b "a" | "y" b "c"``
with ``b: "k" A``) or after a choice (``A: /[ab]c+/`` before ``"c"``). There the matcher's forcing
guard (``forcing_guard.ForcingGuard``) ends that request in a few milliseconds instead.
"""

from __future__ import annotations

from typing import Any

from llmir_lang.executor.constraints.errors import UnsatisfiableConstraintError, UnsupportedGrammarError

_END = "$END"

try:  # the parser of Python's re: Python 3.11 names it re._parser, before that sre_parse
    from re import _constants as _sre  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]


def flow_problem(parser: Any, display: Any) -> Exception | None:
    """The first problem above in ``parser`` (a ``lark.Lark``), or None. ``display(terminal)``
    names a terminal for a message."""
    rules = [(r.origin.name, [(s.name, s.is_term) for s in r.expansion]) for r in parser.rules]
    start = parser.options.start[0]
    productive = _productive(rules)
    reachable = {origin for origin, _ in _Flow(rules, start).live}
    stuck = sorted(str(name) for name in reachable - productive)
    named = [name for name in stuck if not name.startswith("_")] or stuck  # lark's own: __start_plus_0
    if start not in productive:
        return UnsatisfiableConstraintError(
            f"no text completes the grammar: rule {start!r} never finishes (rules {named} only "
            "ever continue with themselves or each other, with no alternative that ends); give "
            "the recursion an alternative without it"
        )
    if stuck:
        # lark drops the alternatives that use it; llguidance lets a value start down one and
        # then ends it as a constraint error (or gives up on the grammar's size)
        return UnsupportedGrammarError(
            f"rules {named} never finish (every alternative needs one of them again), so every "
            "alternative that uses them is a dead end: lark never takes one, but the engine could "
            "start a value down it and then fail it; give the recursion an alternative without "
            "it, or remove the rules",
            feature="rule that never finishes",
        )
    return _ignored_terminal(parser, rules, start, display) or _swallowing_terminal(
        parser, rules, start, display
    )


def _ignored_terminal(parser: Any, rules: Any, start: str, display: Any) -> Exception | None:
    """A terminal that can only begin with what ``%ignore`` skips (``" "`` or ``NEWLINE`` with
    ``%ignore WS``): lark and llguidance disagree on which of the two reads such text (llguidance's
    skipping takes it, so a value can never hold the terminal; lark's takes the longest run), so
    the two allow different texts, and the engine may find none and generate to ``max_tokens``."""
    ignored = set(parser.ignore_tokens)
    terminals = {t.name: t for t in parser.terminals}
    skipped: set[int] = set()
    for name in ignored & set(terminals):
        skipped |= _first_bytes(terminals[name]) or set()
    if not skipped:
        return None
    used = set(_Flow(rules, start).follow) & set(terminals)
    for name in sorted(used - ignored):
        first = _first_bytes(terminals[name])
        if first and first <= skipped:
            skips = ", ".join(sorted(ignored))
            return UnsupportedGrammarError(
                f"terminal {display(terminals[name])} can only begin with characters that %ignore "
                f"{skips} skips: lark and the engine disagree on which of the two reads them (the "
                "engine skips them, so no value could hold the terminal), so they would allow "
                "different texts; do not ignore what the grammar needs (%ignore WS_INLINE keeps "
                "line breaks), or drop the terminal",
                feature="ignored terminal",
            )
    return None


def _productive(rules: list[tuple[str, list[tuple[str, bool]]]]) -> set[str]:
    done: set[str] = set()
    changed = True
    while changed:
        changed = False
        for origin, expansion in rules:
            if origin not in done and all(is_term or name in done for name, is_term in expansion):
                done.add(origin)
                changed = True
    return done


_BEGIN = "^BEGIN"  # what "precedes" the first terminal of the text


class _Flow:
    """FIRST / LAST / FOLLOW / PRECEDE over the rules reachable from ``start``, and the
    occurrences of each terminal in them: ``(what can follow it there, what can precede it)``."""

    def __init__(self, rules: list[tuple[str, list[tuple[str, bool]]]], start: str) -> None:
        reachable, todo = {start}, [start]
        while todo:
            name = todo.pop()
            for origin, expansion in rules:
                if origin == name:
                    for sym, is_term in expansion:
                        if not is_term and sym not in reachable:
                            reachable.add(sym)
                            todo.append(sym)
        self.live = [(o, e) for o, e in rules if o in reachable]
        self.nullable: set[str] = set()
        self.first: dict[str, set[str]] = {o: set() for o, _ in self.live}
        self.last: dict[str, set[str]] = {o: set() for o, _ in self.live}
        self.follow: dict[str, set[str]] = {start: {_END}}
        self.precede: dict[str, set[str]] = {start: {_BEGIN}}
        self.costart: dict[str, set[str]] = {}
        changed = True
        while changed:
            changed = False
            for origin, expansion in self.live:
                if origin not in self.nullable and all(not t and s in self.nullable for s, t in expansion):
                    self.nullable.add(origin)
                    changed = True
                changed |= _grow(self.first, origin, self._edge(expansion, self.first)[0])
                changed |= _grow(self.last, origin, self._edge(expansion[::-1], self.last)[0])
                for k, (sym, _) in enumerate(expansion):
                    after, before = self.around(origin, expansion, k)
                    here, here_nullable = self._edge(expansion[k:], self.first)
                    if here_nullable:
                        here |= self.follow.get(origin, set())
                    if self._edge(expansion[:k], self.first)[1]:
                        here |= self.costart.get(origin, self.first[origin])
                    changed |= _grow(self.follow, sym, after)
                    changed |= _grow(self.precede, sym, before)
                    changed |= _grow(self.costart, sym, here)

    def _edge(self, seq: list[tuple[str, bool]], table: dict[str, set[str]]) -> tuple[set[str], bool]:
        """The terminals at the start of ``seq`` (``table`` FIRST; LAST for a reversed ``seq``),
        and whether all of ``seq`` can be empty."""
        out: set[str] = set()
        for sym, is_term in seq:
            out |= {sym} if is_term else table.get(sym, set())
            if is_term or sym not in self.nullable:
                return out, False
        return out, True

    def around(self, origin: str, expansion: list[tuple[str, bool]], k: int) -> tuple[set[str], set[str]]:
        """What can follow and what can precede the symbol at ``expansion[k]``."""
        after, rest_nullable = self._edge(expansion[k + 1 :], self.first)
        if rest_nullable:
            after |= self.follow.get(origin, set())
        before, head_nullable = self._edge(expansion[:k][::-1], self.last)
        if head_nullable:
            before |= self.precede.get(origin, set())
        return after, before

    def occurrences(self, terminal: str) -> list[tuple[set[str], set[str]]]:
        return [
            self.around(origin, expansion, k)
            for origin, expansion in self.live
            for k, (sym, is_term) in enumerate(expansion)
            if is_term and sym == terminal
        ]


def _grow(table: dict[str, set[str]], key: str, add: set[str]) -> bool:
    if add <= table.setdefault(key, set()):
        return False
    table[key] |= add
    return True


def _swallowing_terminal(parser: Any, rules: Any, start: str, display: Any) -> Exception | None:
    terminals = {t.name: t for t in parser.terminals}
    ignored = set(parser.ignore_tokens)
    flow = _Flow(rules, start)
    for name, term in terminals.items():
        if name not in flow.follow or term.pattern.type != "re":
            continue
        cycle = _trailing_cycle(term.pattern.to_regexp(), "i" in term.pattern.flags)
        if cycle is None:
            continue
        prefix, unit = cycle
        lead = unit.encode()[0]
        read = (prefix + unit * 3).encode()
        rivals = (flow.costart.get(name, set()) | ignored) - {name}
        if any(_still_matching(terminals[r], read) for r in rivals if r in terminals):
            continue  # another terminal read from the same place may still match: not stuck
        places = flow.occurrences(name)
        for after, before in places:
            # what may follow here, and at every place of the terminal that may be read at the
            # same point of the text (one the same terminal can precede)
            nexts = after | ignored
            for other_after, other_before in places:
                if _may_coincide(before, other_before, terminals, bool(ignored)):
                    nexts |= other_after
            if _END in nexts or not all(
                _first_bytes(terminals[n]) == {lead} for n in nexts if n in terminals
            ):
                continue
            return UnsupportedGrammarError(
                f"terminal {display(term)} ends in a repeat of {unit!r}, and all that can follow it "
                f"starts with {unit[0]!r}: a terminal takes the longest text it can (lark's "
                "regexes are greedy, and so is the engine's lexer), so it swallows what follows and "
                "no text gets past it; the engine would loop forever looking for one. End the "
                "terminal otherwise (a bounded repeat, another last character) or change what "
                "follows it",
                feature="terminal swallowing its follower",
            )
    return None


def _may_coincide(before: set[str], other: set[str], terminals: dict[str, Any], ignoring: bool) -> bool:
    """Whether two places preceded by ``before`` / ``other`` may be the same point of a text: they
    share a terminal, or text is skipped there, or two of their terminals can end alike (only the
    start of the text is preceded by nothing)."""
    if before & other or ignoring:
        return True
    for a in before - {_BEGIN}:
        for b in other - {_BEGIN}:
            ends_a, ends_b = _last_bytes(terminals.get(a)), _last_bytes(terminals.get(b))
            if ends_a is None or ends_b is None or ends_a & ends_b:
                return True
    return False


def _last_bytes(term: Any) -> set[int] | None:
    """The last bytes of ``term``'s texts where few and certain (its last part a literal, a class
    of literals, or a repeat of one); None otherwise."""
    if term is None:
        return None
    if term.pattern.type == "str":
        value = term.pattern.value
        if not value or ("i" in term.pattern.flags and value[-1].lower() != value[-1].upper()):
            return None
        return {value.encode()[-1]}
    if "i" in term.pattern.flags:
        return None
    items = _items(term.pattern.to_regexp())
    while items:
        op, arg = items[-1]
        if op is _sre.LITERAL:
            return {chr(arg).encode()[-1]}
        if op is _sre.IN and all(kind is _sre.LITERAL for kind, _ in arg):
            return {chr(code).encode()[-1] for _, code in arg}
        if op is _sre.SUBPATTERN and not arg[1]:
            items = list(arg[-1])
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT) and arg[0] >= 1:
            items = list(arg[2])
        else:
            return None
    return None


def _items(regex: str) -> list[Any] | None:
    try:
        items = list(_sre_parse.parse(regex))
    except Exception:
        return None
    while len(items) == 1 and items[0][0] is _sre.SUBPATTERN:  # lark wraps a terminal in (?:...)
        items = list(items[0][1][-1])
    return items


def _trailing_cycle(regex: str, ignorecase: bool) -> tuple[str, str] | None:
    """``(prefix, unit)`` where ``regex`` is a finite prefix then ``(unit)+`` / ``(unit)*``, with
    ``unit`` one fixed text (so once in the repeat, the next byte is forced), else None."""
    items = _items(regex)
    if not items or items[-1][0] not in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
        return None
    low, high, body = items[-1][1]
    unit = _fixed(list(body))
    if unit is None or high is not _sre.MAXREPEAT or (ignorecase and unit.lower() != unit.upper()):
        return None
    prefix = _fixed(items[:-1])  # a prefix with choices may leave another byte open: not forced
    if prefix is None or (not prefix and low == 0):
        return None
    return prefix, unit


def _fixed(items: list[Any]) -> str | None:
    """The one text ``items`` match, or None when they match several (or it is unclear)."""
    out = []
    for op, arg in items:
        if op is _sre.LITERAL:
            out.append(chr(arg))
        elif op is _sre.IN and len(arg) == 1 and arg[0][0] is _sre.LITERAL:
            out.append(chr(arg[0][1]))
        elif op is _sre.SUBPATTERN:
            inner = _fixed(list(arg[-1]))
            if inner is None or arg[1]:  # a flag group (?i:...) may widen it
                return None
            out.append(inner)
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT) and arg[0] == arg[1]:
            inner = _fixed(list(arg[2]))
            if inner is None:
                return None
            out.append(inner * arg[0])
        else:
            return None
    return "".join(out)


def _first_bytes(term: Any) -> set[int] | None:
    """The bytes a text of ``term`` can start with, as the engine reads it (its first mask over
    single bytes: a regex alone forces nothing endless); None where it cannot tell."""
    template = _regex_template(term)
    if template is None:
        return None
    bias = template.deep_copy().compute_logit_bias()
    return {b for b in range(256) if bias[b]} or None


def _still_matching(term: Any, data: bytes) -> bool:
    """Whether ``term`` could still be matching after reading ``data`` (asked of llguidance's own
    regex reading, consuming bytes only, which never forces); True where it cannot tell."""
    template = _regex_template(term)
    if template is None:
        return True
    return template.deep_copy().try_consume_tokens(list(data)) == len(data)


def _regex_template(term: Any) -> Any:
    """A byte-level llguidance matcher of ``term`` alone, or None where llguidance cannot read it."""
    import llguidance

    from llmir_lang.executor.constraints.llguidance_backend import _byte_template
    from llmir_lang.executor.constraints.spec import escape_regex

    regex = term.pattern.to_regexp() if term.pattern.type == "re" else escape_regex(term.pattern.value)
    if "i" in term.pattern.flags and term.pattern.type == "str":
        regex = "(?i:" + regex + ")"
    try:
        return _byte_template(llguidance.LLMatcher.grammar_from_regex(regex))
    except Exception:
        return None
