"""The pass manager: named ``Module -> Module`` passes, run by a pipeline string.

A pipeline is a comma-separated list of pass names, each optionally followed by options in braces:
``"canonicalize,prefix-share{min_length=4},fork-join"``, or a list of such steps (joined with commas:
``pipeline_text``). Options that are objects (a chat template) are passed in the ``options``
mapping instead: ``{"canonicalize": {"template": t}}``.
The empty pipeline ``""`` runs no pass and returns the module unchanged.

A pass declares its options in its signature: each keyword-only parameter is an option, and its
annotation is the option's type (``min_length: int = 1``). Options are checked when the pipeline
is parsed, not when the pass runs (which may be never, or deep inside a program run): the name
must be a parameter, the value must have the annotated type (a string value is read as that type:
``int``, ``float``, ``bool`` as ``true`` / ``false``, ``str``), a number must be finite and within
the option's bounds. An ``int`` option is a count or a length, so its default bound is ``>= 0``;
``register_pass(name, bounds={"option": (low, high)})`` sets others. The ``options`` mapping is
checked the same way, whole, for passes outside the pipeline too (a misspelt option is an error,
not silently unused). Every error is a ``PassPipelineError`` naming the pass, the option, the value
and what is expected.

After each pass the manager verifies the module (a pass that breaks the IR is a bug, reported with
the pass's name; ``verify_each=False`` verifies the final module only) and renumbers values
(``renumber``) so that the printed IR is canonical.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from llmir_lang.errors import IRVerifyError
from llmir_lang.ir import Module, print_ir, renumber, verify
from llmir_lang.optimizer.pass_registry import (  # noqa: F401  (re-exported: the pass manager's names)
    PASS_REGISTRY,
    Bounds,
    PassFn,
    PassInfo,
    PassOption,
    PassPipelineError,
    _matches,
    _short_repr,
    register_pass,
)

DEFAULT_PIPELINE = "canonicalize,prefix-share,fork-join,select-trie,fuse-constants"

_STEP_RE = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(?:\{([^{}]*)\})?\s*")


def pipeline_text(pipeline: str | Sequence[str]) -> str:
    """A pipeline as its string: a string as is, a list or tuple of steps (``["canonicalize",
    "prefix-share{min_length=4}"]``) joined with commas; anything else is a ``PassPipelineError``."""
    if isinstance(pipeline, str):
        return pipeline
    if isinstance(pipeline, (list, tuple)) and all(isinstance(step, str) for step in pipeline):
        return ",".join(pipeline)
    shown = _short_repr(pipeline)
    raise PassPipelineError(
        f"a pipeline must be a string of pass names separated by commas (e.g. "
        f"'canonicalize,prefix-share{{min_length=4}}') or a list of them, got {type(pipeline).__name__} {shown}"
    )


def parse_pipeline(pipeline: str | Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Split a pipeline (a string, or a list of steps: ``pipeline_text``) into ``(pass name,
    string options)`` steps; check the names."""
    pipeline = pipeline_text(pipeline)
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
        steps.append((name, _parse_options(PASS_REGISTRY[name], opts or "")))
        pos = m.end()
        if pos == len(pipeline):
            return steps
        if pipeline[pos] == "{":
            problem = (
                "have no closing '}'"
                if "}" not in pipeline[pos:]
                else "are not one {...} without braces inside"
            )
            raise PassPipelineError(
                f"the options of pass {name} at position {pos} of pipeline {pipeline!r} {problem}; "
                "write them once after the name: pass{key=value, key=value}"
            )
        if pipeline[pos] != ",":
            raise PassPipelineError(
                f"expected ',' at position {pos} of pipeline {pipeline!r}, got {pipeline[pos]!r}; "
                "separate pass names with commas"
            )
        pos += 1


def _parse_options(info: PassInfo, text: str) -> dict[str, Any]:
    """The options written in braces after ``info``'s name, read as their declared types and
    checked (``PassPipelineError`` at once, not when the pass runs)."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise PassPipelineError(f"pass {info.name}: option {item!r} must be written key=value")
        key, raw = key.strip(), raw.strip()
        if key in out:
            raise PassPipelineError(f"pass {info.name}: option {key} is given twice; keep one")
        spec = info.specs.get(key)
        value = _option_value(raw) if spec is None else _read_option(spec, raw)
        info.check_option(key, value)
        out[key] = value
    return out


def _read_option(spec: PassOption, raw: str) -> Any:
    """``raw`` as the option's type: the first reading of it that the annotation accepts, or
    ``raw`` itself (which ``check_option`` then reports)."""
    for value in (_option_value(raw), raw):
        if _matches(spec.annotation, value):
            return value
    return raw


def _option_value(raw: str) -> Any:
    if raw in ("true", "false"):
        return raw == "true"
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:  # not a number (or an int too long to convert: kept as text)
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
        pipeline: str | Sequence[str] = DEFAULT_PIPELINE,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        verify_each: bool = True,
    ) -> None:
        pipeline = pipeline_text(pipeline)
        self.pipeline = pipeline
        self.verify_each = verify_each
        extra = _options_mapping(options)
        self.steps: list[tuple[PassInfo, dict[str, Any]]] = []
        for name, opts in parse_pipeline(pipeline):  # checks the options written in the string
            info = PASS_REGISTRY[name]
            self.steps.append((info, {**extra.get(name, {}), **opts}))

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
        from llmir_lang.ir import parse_ir  # lark loads on first use (llmir_lang.ir)

        return print_ir(self.run(parse_ir(text)))


def _options_mapping(options: object) -> dict[str, dict[str, Any]]:
    """``PassManager``'s ``options``, checked whole: a mapping from registered pass names to
    mappings of options each pass accepts, with values it accepts, whether or not the pass is in
    the pipeline (a misspelt option is an error, not silently unused)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise PassPipelineError(
            f"options must map pass names to their options, e.g. {{'canonicalize': {{'template': t}}}}, "
            f"got {type(options).__name__} {_short_repr(options)}"
        )
    out: dict[str, dict[str, Any]] = {}
    for name, opts in options.items():
        info = PASS_REGISTRY.get(name) if isinstance(name, str) else None
        if info is None:
            raise PassPipelineError(
                f"options given for unknown pass {name!r}; known passes: {', '.join(sorted(PASS_REGISTRY))}"
            )
        if not isinstance(opts, Mapping):
            raise PassPipelineError(
                f"options of pass {name} must be a mapping of option names to values "
                f"(it accepts: {', '.join(info.options) or 'none'}), got {type(opts).__name__} {_short_repr(opts)}"
            )
        unknown = [k for k in opts if k not in info.specs]
        if unknown:
            accepted = ", ".join(info.options) or "none"
            raise PassPipelineError(
                f"pass {name} has no option(s) {sorted(map(str, unknown))}; it accepts: {accepted}"
            )
        for option, value in opts.items():
            info.check_option(option, value)
        out[name] = dict(opts)
    return out


def run_pipeline(
    module: Module,
    pipeline: str | Sequence[str] = DEFAULT_PIPELINE,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Module:
    """Shorthand for ``PassManager(pipeline, options).run(module)``."""
    return PassManager(pipeline, options).run(module)
