"""The pass manager: named ``Module -> Module`` passes, run by a pipeline string.

A pipeline is a comma-separated list of pass names, each optionally followed by options in braces:
``"canonicalize,prefix-share{min_length=4},fork-join"``. Option values in the string are parsed as
int, float, ``true`` / ``false``, or else kept as strings; options that are objects (a chat
template) are passed in the ``options`` mapping instead: ``{"canonicalize": {"template": t}}``.
The empty pipeline ``""`` runs no pass and returns the module unchanged.

After each pass the manager verifies the module (a pass that breaks the IR is a bug, reported with
the pass's name; ``verify_each=False`` verifies the final module only) and renumbers values
(``renumber``) so that the printed IR is canonical.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llmir_lang.errors import IRError, IRVerifyError
from llmir_lang.ir import Module, parse_ir, print_ir, renumber, verify

DEFAULT_PIPELINE = "canonicalize,prefix-share,fork-join,select-trie,fuse-constants"

PassFn = Callable[..., Module]


class PassPipelineError(IRError, ValueError):
    """A pipeline string or a pass option is invalid (unknown pass, unknown option, bad syntax)."""


@dataclass(frozen=True, slots=True)
class PassInfo:
    """A registered pass: its name, function, and the keyword options the function accepts."""

    name: str
    fn: PassFn
    options: tuple[str, ...]

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""


PASS_REGISTRY: dict[str, PassInfo] = {}


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    """Decorator: register ``fn(module, *, **options) -> Module`` as the pass ``name``."""

    def decorate(fn: PassFn) -> PassFn:
        if name in PASS_REGISTRY:
            raise ValueError(f"pass {name!r} is registered twice")
        params = inspect.signature(fn).parameters.values()
        options = tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
        PASS_REGISTRY[name] = PassInfo(name, fn, options)
        return fn

    return decorate


_STEP_RE = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(?:\{([^{}]*)\})?\s*")


def parse_pipeline(pipeline: str) -> list[tuple[str, dict[str, Any]]]:
    """Split a pipeline string into ``(pass name, string options)`` steps; check the names."""
    steps: list[tuple[str, dict[str, Any]]] = []
    if pipeline.strip() == "":
        return steps
    pos = 0
    while True:
        m = _STEP_RE.match(pipeline, pos)
        if m is None or m.end() == pos:
            raise PassPipelineError(
                f"cannot read pipeline {pipeline!r} at position {pos}; "
                "write pass names separated by commas, e.g. 'canonicalize,prefix-share{min_length=4}'"
            )
        name, opts = m.group(1), m.group(2)
        if name not in PASS_REGISTRY:
            raise PassPipelineError(
                f"unknown pass {name!r} in pipeline {pipeline!r}; known passes: {', '.join(sorted(PASS_REGISTRY))}"
            )
        steps.append((name, _parse_options(name, opts or "")))
        pos = m.end()
        if pos == len(pipeline):
            return steps
        if pipeline[pos] != ",":
            raise PassPipelineError(f"expected ',' at position {pos} of pipeline {pipeline!r}")
        pos += 1


def _parse_options(name: str, text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise PassPipelineError(f"pass {name}: option {item!r} must be written key=value")
        out[key.strip()] = _option_value(raw.strip())
    return out


def _option_value(raw: str) -> Any:
    if raw in ("true", "false"):
        return raw == "true"
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


class PassManager:
    """Runs a pipeline of passes over a module.

    ``options`` maps a pass name to keyword options for it; every key must be a registered pass and
    every option one the pass accepts (else ``PassPipelineError`` listing the accepted ones).
    ``verify_each`` verifies the module after every pass; without it only the final module is
    verified (the interpreter's setting: verification costs as much as a pass), and if that fails
    (or a pass raises) the pipeline runs again verifying each pass, so the error still names the
    pass whose output was invalid.
    """

    def __init__(
        self,
        pipeline: str = DEFAULT_PIPELINE,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        verify_each: bool = True,
    ) -> None:
        self.pipeline = pipeline
        self.verify_each = verify_each
        extra = dict(options or {})
        for name in extra:
            if name not in PASS_REGISTRY:
                raise PassPipelineError(
                    f"options given for unknown pass {name!r}; known passes: {', '.join(sorted(PASS_REGISTRY))}"
                )
        self.steps: list[tuple[PassInfo, dict[str, Any]]] = []
        for name, opts in parse_pipeline(pipeline):
            info = PASS_REGISTRY[name]
            merged = {**extra.get(name, {}), **opts}
            unknown = sorted(set(merged) - set(info.options))
            if unknown:
                accepted = ", ".join(info.options) or "none"
                raise PassPipelineError(f"pass {name} has no option(s) {unknown}; it accepts: {accepted}")
            self.steps.append((info, merged))

    @property
    def pass_names(self) -> list[str]:
        return [info.name for info, _ in self.steps]

    def run(self, module: Module) -> Module:
        """The module after every pass of the pipeline (the same object for the empty pipeline)."""
        steps = self.trace(module)
        return steps[-1][1] if steps else module

    def trace(self, module: Module) -> list[tuple[str, Module]]:
        """The module after each pass, as ``(pass name, module)`` pairs (for printing after all)."""
        if self.verify_each or not self.steps:
            return self._trace(module, True)
        try:
            out = self._trace(module, False)
            verify(out[-1][1])
        except Exception:  # invalid IR, or a pass that crashed on an earlier pass's bad output
            self._trace(module, True)  # raises, naming the first pass whose output is invalid
            raise
        return out

    def _trace(self, module: Module, verify_each: bool) -> list[tuple[str, Module]]:
        out: list[tuple[str, Module]] = []
        for info, opts in self.steps:
            module = renumber(info.fn(module, **opts))
            if verify_each:
                try:
                    verify(module)
                except IRVerifyError as e:
                    raise IRVerifyError(f"pass {info.name} produced invalid IR: {e}") from e
            out.append((info.name, module))
        return out

    def run_text(self, text: str) -> str:
        """Parse IR text, run the pipeline, print the result (what golden tests compare)."""
        return print_ir(self.run(parse_ir(text)))


def run_pipeline(
    module: Module, pipeline: str = DEFAULT_PIPELINE, options: Mapping[str, Mapping[str, Any]] | None = None
) -> Module:
    """Shorthand for ``PassManager(pipeline, options).run(module)``."""
    return PassManager(pipeline, options).run(module)
