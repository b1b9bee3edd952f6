"""``grammar=`` is lark: a grammar is checked against lark itself before the engine gets it.

llguidance, the engine that enforces a grammar, reads lark in its own dialect: Earley parsing over
a lexer whose terminals take the longest text they can (lark's ``lexer="dynamic"``), regexes in
Rust's syntax, its own ``%import common``. It agrees with lark on most grammars, not all, and
where it does not, a text the engine lets through fails ``lark.Lark(grammar).parse``. So a grammar
in plain lark (one lark's own grammar parser reads) is:

- rewritten where the difference is a matter of spelling (``lark_rewrite``);
- refused, with lark's reason, where lark refuses it (``lark.Lark(text, parser="earley")``): a
  terminal that can match the empty text, a regex Python cannot compile (``\\p{L}``), ...;
- refused where one of its regexes means another thing to lark: a character class Python reads
  as plain characters and Rust as a nested class or a set operation (``[[:alpha:]]``,
  ``[a-z&&[^aeiou]]``); a text the engine takes as one terminal but Python's regex matches only
  in part (a lazy ``+?``, which the engine cannot make lazy; an alternative that ends a match
  before a later, longer one: ``/a|ab/`` reads ``a`` of ``ab``), found by matching texts the engine
  generates for the terminal, alone, with Python's ``re``;
- refused where the engine could not run it (``lark_flow``).

A grammar that uses llguidance's own extensions (``%llguidance {}``, ``%json``, ``&`` / ``~``,
``<special tokens>``, ``[lazy]``, ``x{2,3}`` ...) is not lark: it is the engine's dialect, and goes
to the engine unchecked. Starting a grammar with ``%llguidance {}`` asks for that on purpose.
"""

from __future__ import annotations

import functools
import random
import re
import threading
import warnings
import zlib
from collections import OrderedDict
from typing import Any

from llmir_lang.executor.constraints.errors import UnsupportedGrammarError
from llmir_lang.executor.constraints.lark_flow import _sre, _sre_parse, flow_problem
from llmir_lang.executor.constraints.lark_rewrite import rewrite_for_engine, space_repeat_ranges

_DIALECT_HINT = (
    "; to have the engine read the grammar in llguidance's own dialect instead (Rust regex "
    "syntax, terminals that may match nothing; texts then not checked against lark), start it "
    "with the line %llguidance {}"
)
_SAMPLES = 24  # texts generated per terminal with choices; each is matched with Python's re
_SAMPLE_BYTES = 14


_CHECKED_SIZE = 256
# a grammar checked -> its engine text, and that engine text -> itself: the text a spec holds is
# the engine's, and reading it again (the compiler does) must not check the grammar again
_checked: OrderedDict[str, str] = OrderedDict()
_checked_lock = threading.Lock()


def engine_grammar(text: str) -> str:
    """The grammar text to give the engine for ``text``: ``text`` rewritten (``lark_rewrite``)
    when it is plain lark, as is when it uses llguidance's extensions. Raises
    ``UnsupportedGrammarError`` / ``UnsatisfiableConstraintError`` as the module docstring says.
    Each grammar is checked once: the answer is kept for ``text`` and for the engine text (which
    rewrites to itself, and so would pass the same checks again)."""
    with _checked_lock:
        engine = _checked.get(text)
        if engine is not None:
            _checked.move_to_end(text)
            return engine
    engine = _checked_engine_text(text)
    with _checked_lock:
        for key in (text, engine):
            _checked[key] = engine
            _checked.move_to_end(key)
        while len(_checked) > 2 * _CHECKED_SIZE:
            _checked.popitem(last=False)
    return engine


def _checked_engine_text(text: str) -> str:
    if not _is_plain_lark(text):
        return text
    engine = rewrite_for_engine(text)
    parser = _lark_parser(engine)
    for term in parser.terminals:
        if term.pattern.type == "re":
            _check_terminal(term)
    problem = flow_problem(parser, _display)
    if problem is not None:
        raise problem
    return engine


def lark_syntax_for_engine(text: str) -> str:
    """``text`` as llguidance's parser reads plain lark (``lark_rewrite.space_repeat_ranges``),
    for checking its syntax before ``engine_grammar``'s checks, which need it valid."""
    return space_repeat_ranges(text) if _is_plain_lark(text) else text


@functools.lru_cache(maxsize=256)
def _is_plain_lark(text: str) -> bool:
    """Whether lark's grammar parser reads ``text`` (syntax only); not when it uses llguidance's
    extensions, or when lark's internals are not where this lark version had them."""
    parse = _lark_grammar_parser()
    if parse is None:
        return False
    try:
        parse(text, "<grammar>")
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _lark_grammar_parser() -> Any:
    """lark's own grammar parser (``lark.load_grammar._parse_grammar``, private), or None with a
    warning, once, that grammars then go to the engine unchecked."""
    import lark

    try:
        from lark.load_grammar import _parse_grammar
    except ImportError:
        warnings.warn(
            f"grammar= texts are not checked against lark: lark {getattr(lark, '__version__', '?')} "
            "has no lark.load_grammar._parse_grammar, so every grammar goes to the engine as written, in "
            "llguidance's dialect, without the rewrites of \\w \\d \\s and common.ESCAPED_STRING "
            "or the refusal of lazy quantifiers, first-match alternatives, nested classes, "
            "swallowing terminals and rules that never finish; so a generated text may not "
            "parse with lark. Install lark 1.1 to 1.3 to have them checked",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _parse_grammar


def _lark_parser(text: str) -> Any:
    import lark

    try:
        with warnings.catch_warnings():  # Python's re warns of nested sets: _check_terminal says it
            warnings.simplefilter("ignore", FutureWarning)
            return lark.Lark(text, parser="earley", lexer="dynamic")
    except Exception as e:
        message = _short(str(e) or type(e).__name__, 400)
        feature, hint = "a grammar lark refuses", ""
        if "zero-width" in message or "Empty terminals" in message:
            feature = "a terminal matching the empty text"
            hint = (
                "; a terminal must match at least one character (lark's Earley cannot use one "
                "that matches nothing): write /x+/ instead of /x*/ and make its use optional (X?)"
            )
        elif isinstance(e, re.error):
            feature = "a regex Python's re cannot read"
            hint = "; lark's regexes are Python's re (no \\p{..}, \\z or \\x{..})"
        raise UnsupportedGrammarError(
            f"lark refuses this grammar ({type(e).__name__}: {message}){hint}{_DIALECT_HINT}", feature=feature
        ) from None


def _display(term: Any) -> str:
    """A terminal as the user wrote it: a string as its text (lark names ``" "`` SPACE itself), a
    regex by its name, or as its literal where anonymous."""
    flags = "".join(sorted(term.pattern.flags))
    value = _short(term.pattern.value, 80)
    if term.pattern.type == "str":
        return f"{value!r}{flags}"
    return f"/{value}/{flags}" if term.name.startswith("__") else term.name


def _check_terminal(term: Any) -> None:
    regex = term.pattern.to_regexp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        try:
            _sre_parse.parse(regex)  # re.compile would answer from its cache, without the warning
            compiled = re.compile(regex)
        except re.error:
            return  # lark compiled it: only a lark-internal form could fail here
    if any(issubclass(w.category, FutureWarning) for w in caught):
        raise UnsupportedGrammarError(
            f"terminal {_display(term)}: a '[' or '&&' / '--' / '~~' / '||' inside a character class "
            "is a plain character to lark (Python's re) but a nested class or a set operation to "
            "the engine's regexes (Rust's: [[:alpha:]], [a-z&&[^aeiou]]), so the two would allow "
            "different texts; escape it (\\[, \\&) or spell the class out ([a-zA-Z])",
            feature="nested character class",
        )
    if not _has_choices(regex):
        return
    for text in _engine_texts(regex):
        m = compiled.match(text)
        if m is not None and m.end() == len(text):
            continue
        lazy = _contains(regex, _sre.MIN_REPEAT)
        feature = "lazy quantifier" if lazy else "regex alternative order" if "|" in regex else "regex match"
        read = "does not match it" if m is None else f"matches only {m.group()!r} of it"
        why = (
            "a lazy quantifier (+?, *?, ??, {m,n}?) stops as early as it can in Python, and the "
            "engine has no lazy quantifiers: use the greedy one, and end the terminal with what "
            "should stop it"
            if lazy
            else "Python's re takes the first alternative that matches, not the longest: put "
            "longer alternatives first (/ab|a/), or split them into separate literals "
            '("a" | "ab"), which lark orders itself'
        )
        raise UnsupportedGrammarError(
            f"terminal {_display(term)}: the engine can generate {text!r} as one {_display(term)}, "
            f"but lark's regex (Python's re) {read}, so the text would not parse with lark; {why}",
            feature=feature,
        )


def _has_choices(regex: str) -> bool:
    """Whether Python's match of ``regex`` could stop short of the longest text: it has a lazy
    quantifier, an alternation, or more than one part of variable length."""
    try:
        tree = _sre_parse.parse(regex)
    except Exception:
        return False
    variable = 0

    def walk(items: Any) -> bool:
        nonlocal variable
        for op, arg in items:
            if op in (_sre.MIN_REPEAT, _sre.BRANCH):
                return True
            if op is _sre.MAX_REPEAT:
                variable += arg[0] != arg[1]
                if walk(arg[2]):
                    return True
            elif op is _sre.SUBPATTERN and walk(arg[-1]):
                return True
        return False

    return walk(tree) or variable > 1


def _contains(regex: str, wanted: Any) -> bool:
    def walk(items: Any) -> bool:
        for op, arg in items:
            if op is wanted:
                return True
            if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT) and walk(arg[2]):
                return True
            if op is _sre.SUBPATTERN and walk(arg[-1]):
                return True
            if op is _sre.BRANCH and any(walk(alt) for alt in arg[1]):
                return True
        return False

    try:
        return walk(_sre_parse.parse(regex))
    except Exception:
        return False


def _engine_texts(regex: str) -> list[str]:
    """Complete texts of ``regex`` as the engine reads it (llguidance over bytes), walked at random
    with a seed from the regex (so a grammar's verdict never changes), preferring the bytes the
    regex names itself, then printable ASCII, so that its own delimiters turn up."""
    import llguidance

    from llmir_lang.executor.constraints.llguidance_backend import _byte_template

    try:
        template = _byte_template(llguidance.LLMatcher.grammar_from_regex(regex))
    except Exception:
        return []
    if template is None:
        return []
    own = _literal_bytes(regex)
    rng = random.Random(zlib.crc32(regex.encode()))
    texts: list[str] = []
    for _ in range(_SAMPLES):
        matcher, data = template.deep_copy(), bytearray()
        stop_at = rng.randint(1, _SAMPLE_BYTES)
        for _ in range(_SAMPLE_BYTES):
            bias = matcher.compute_logit_bias()
            allowed = [b for b in range(256) if bias[b]]
            if not allowed or (bias[256] and len(data) >= stop_at):
                break
            named = [b for b in allowed if b in own]
            plain = [b for b in allowed if 0x20 <= b < 0x7F]
            pool = named if named and rng.random() < 0.6 else plain or allowed
            byte = rng.choice(pool)
            matcher.consume_token(byte)
            data.append(byte)
        if matcher.is_accepting():
            try:
                texts.append(data.decode("utf-8"))
            except UnicodeDecodeError:
                continue
    return texts


def _literal_bytes(regex: str) -> set[int]:
    """The bytes of the characters ``regex`` names literally (a delimiter such as ``*/`` is where
    a lazy or a first-match regex stops short)."""
    chars: set[str] = set()

    def walk(items: Any) -> None:
        for op, arg in items:
            if op is _sre.LITERAL:
                chars.add(chr(arg))
            elif op is _sre.IN:
                for kind, value in arg:
                    if kind is _sre.LITERAL:
                        chars.add(chr(value))
                    elif kind is _sre.RANGE and value[1] < 0x80:  # a rewritten \d is ranges too
                        chars.update((chr(value[0]), chr(value[1])))
            elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
                walk(arg[2])
            elif op is _sre.SUBPATTERN:
                walk(arg[-1])
            elif op is _sre.BRANCH:
                for alt in arg[1]:
                    walk(alt)

    try:
        walk(_sre_parse.parse(regex))
    except Exception:
        return set()
    return {b for c in chars if not 0xD800 <= ord(c) <= 0xDFFF for b in c.encode()}


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
