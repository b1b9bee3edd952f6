"""Typed errors of the DSL, and where in the user's source a primitive was written.

Every error names the program, the user's file and line, and the cause, and says what to do.
``SourceLocation.here()`` walks the stack past llmir_lang's own frames and those of libraries
(the standard library, site-packages), so a location always points at the user's code (the
``s += gen(...)`` line), never at the interpreter, a thread or IPython; in IPython a cell's line
reads as IPython's tracebacks name it (``Cell In[3], line 2``).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from dataclasses import dataclass

from llmir_lang.errors import NotYetSupportedError, ProgramError

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# folders of code that is not the user's: the standard library and installed packages
LIBRARY_DIRS = tuple(
    {
        os.path.abspath(p) + os.sep
        for k in ("stdlib", "platstdlib", "purelib", "platlib")
        if (p := sysconfig.get_path(k))
    }
)


@dataclass(frozen=True, slots=True)
class SourceLocation:
    """A place in the user's source: file and line."""

    file: str
    line: int

    def __str__(self) -> str:
        cell = _ipython_cell(self.file)
        if cell is not None:
            return f"{cell}, line {self.line}"
        return f"{os.path.basename(self.file)}:{self.line}"

    @staticmethod
    def here() -> SourceLocation | None:
        """The innermost stack frame outside the llmir_lang package and outside libraries (None
        if there is none: a program that llmir_lang wrote itself, such as ``%%llmir``'s, run on a
        thread of its own)."""
        frame = sys._getframe(1)
        while frame is not None:
            path = _user_path(frame.f_code.co_filename)
            if path is not None:
                return SourceLocation(path, frame.f_lineno)
            frame = frame.f_back
        return None


# co_filename -> its absolute path if it is the user's file, None if llmir_lang's or a library's;
# only absolute names are kept (a relative one depends on the working directory). Every gen,
# select and append asks (SourceLocation.here), a few frames each.
_USER_PATHS: dict[str, str | None] = {}


def _user_path(filename: str) -> str | None:
    try:
        return _USER_PATHS[filename]
    except KeyError:
        pass
    path = os.path.abspath(filename)
    user = None if path.startswith(_PACKAGE_DIR + os.sep) or path.startswith(LIBRARY_DIRS) else path
    if os.path.isabs(filename) and len(_USER_PATHS) < 4096:
        _USER_PATHS[filename] = user
    return user


def _ipython_cell(path: str) -> str | None:
    """``Cell In[N]`` when ``path`` is the file IPython compiled cell N into, else None."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    try:
        shell = ipython.get_ipython()
        if shell is None:
            return None
        names = shell.compile.format_code_name
        # a kernel names cells by absolute path; the terminal by ``<ipython-input-...>``
        label = names(path) or names(os.path.basename(path))
    except Exception:  # an IPython without these names: the plain file name will do
        return None
    return " ".join(label) if label else None


def _user_frame(e: BaseException) -> SourceLocation | None:
    """The user's line that raised: the innermost traceback frame that is neither llmir_lang's
    nor a library's (the standard library, site-packages), so an error raised inside httpx or
    json under the user's ``s["x"]`` or ``json.loads(...)`` names that line. None when no such
    frame is on the traceback (the error came from running what the body recorded, after it
    returned): a library's file and line would only mislead."""
    tb, found = e.__traceback__, None
    while tb is not None:
        path = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if not path.startswith(_PACKAGE_DIR + os.sep) and not path.startswith(LIBRARY_DIRS):
            found = SourceLocation(path, tb.tb_lineno)
        tb = tb.tb_next
    return found


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


class InvalidJoinModeError(ForkError, ValueError):
    """``join(mode=...)`` got a mode that does not exist; a ``ValueError`` too, as SGLang's ``join``
    raises one, so ported ``except ValueError`` handlers still catch it."""


class FeatureNotSupportedError(DSLError, NotYetSupportedError):
    """An SGLang frontend feature that llmir_lang does not support (yet): multimodal input
    (``image``, ``video``), several samples of one gen (``n > 1``), a sampled
    ``select`` (``temperature > 0``), per-position ``fork`` offsets, meta data in a text stream.
    Raised at the line that uses it; the message says what to use instead."""


class SeparateReasoningError(DSLError, ValueError):
    """``separate_reasoning`` is used wrongly: without ``model_type`` or with one that names no
    reasoning parser, with nothing to append, around a gen / select without a name, or inside
    another ``separate_reasoning``. A ``ValueError`` too, as SGLang raises one for each of these,
    so ported ``except ValueError`` handlers still catch it."""


class UnsupportedReasoningFormatError(SeparateReasoningError, FeatureNotSupportedError):
    """A ``model_type`` SGLang's reasoning parser takes whose format llmir_lang does not split
    (``gpt-oss``'s harmony channels); the message lists the supported ones."""


class InvalidAppendError(DSLError, TypeError):
    """Something that is neither text nor a DSL primitive was appended to a state."""


class ProgramExecutionError(DSLError):
    """The program's own Python code raised; ``__cause__`` is the original exception."""


class GenerationError(DSLError):
    """The backend failed while running a gen or select of the program."""


class ProgramInterruptedError(DSLError):
    """The run was stopped before the program finished: a KeyboardInterrupt (a notebook's
    interrupt button) or a cancelled ``arun``. Its requests in flight were aborted and its
    programs that had not started never ran."""


class NoBackendError(DSLError):
    """A program was run without a backend and no default backend is set."""
