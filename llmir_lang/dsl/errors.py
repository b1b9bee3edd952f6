"""Typed errors of the DSL, and where in the user's source a primitive was written.

Every error names the program, the user's file and line, and the cause, and says what to do.
``SourceLocation.here()`` walks the stack past llmir_lang's own frames, so a location always
points at the user's code (the ``s += gen(...)`` line), not at the interpreter.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

from llmir_lang.errors import ProgramError

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ``with s.user():`` and ``with s.var_scope(...):`` enter and leave through contextlib's frames
_CONTEXTLIB = os.path.abspath(contextlib.__file__)


@dataclass(frozen=True, slots=True)
class SourceLocation:
    """A place in the user's source: file and line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{os.path.basename(self.file)}:{self.line}"

    @staticmethod
    def here() -> SourceLocation | None:
        """The innermost stack frame outside the llmir_lang package (None if there is none)."""
        frame = sys._getframe(1)
        while frame is not None:
            path = os.path.abspath(frame.f_code.co_filename)
            if not path.startswith(_PACKAGE_DIR + os.sep) and path != _CONTEXTLIB:
                return SourceLocation(path, frame.f_lineno)
            frame = frame.f_back
        return None


def describe(program: str | None, where: SourceLocation | None) -> str:
    """``program 'qa' (qa.py:12)``: the prefix of every DSL error message."""
    out = f"program {program!r}" if program else "program"
    if where is not None:
        out += f" ({where})"
    return out


class DSLError(ProgramError):
    """A DSL program is wrong or failed. ``program`` and ``where`` say which and where."""

    def __init__(self, message: str, program: str | None = None, where: SourceLocation | None = None):
        super().__init__(f"{describe(program, where)}: {message}" if program or where else message)
        self.program = program
        self.where = where
        self.cause_message = message


class ProgramDefinitionError(DSLError, TypeError):
    """``@function`` was applied to something it cannot run (for example no state parameter ``s``)."""


class ProgramArgumentError(DSLError, TypeError):
    """``run`` / ``run_batch`` / ``bind`` got arguments that do not match the program's parameters."""


class UnknownVariableError(DSLError, KeyError):
    """The program read a variable that no gen / select / var_scope / join produces."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class VariableRedefinedError(DSLError):
    """A gen / select / var_scope name is used twice in one state's scope."""


class RoleError(DSLError):
    """Roles are nested or closed without being opened. (A role left open at the end of the
    program is not an error: its text simply has no end marker, as in SGLang.)"""


class ForkError(DSLError):
    """A fork group is used wrongly: ``fork(0)``, joined twice, or given the wrong number of values."""


class InvalidAppendError(DSLError, TypeError):
    """Something that is neither text nor a DSL primitive was appended to a state."""


class ProgramExecutionError(DSLError):
    """The program's own Python code raised; ``__cause__`` is the original exception."""


class GenerationError(DSLError):
    """The backend failed while running a gen or select of the program."""


class NoBackendError(DSLError):
    """A program was run without a backend and no default backend is set."""
