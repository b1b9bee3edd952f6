"""Typed errors. Each message says what is wrong and what to do about it."""

from __future__ import annotations


class LLMIRError(Exception):
    """Base class of every error llmir_lang raises on purpose."""


# --- models and checkpoints -------------------------------------------------------------
class CheckpointError(LLMIRError):
    """A checkpoint folder is missing, incomplete or corrupt."""


class UnsupportedArchitectureError(LLMIRError):
    """The checkpoint's architecture is not one the embedded engine implements."""


# --- requests ---------------------------------------------------------------------------
class InvalidRequestError(LLMIRError, ValueError):
    """A request or its sampling parameters are invalid."""


class ChatTemplateRefusedError(InvalidRequestError):
    """The model's chat template refused the messages (its ``raise_exception``: roles that do not
    alternate, a system message it does not take) or failed on them."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus max_new_tokens) does not fit in the model's context."""


class EmptyPromptError(InvalidRequestError):
    """The prompt has no tokens."""


class OutOfKVMemoryError(LLMIRError):
    """A single request needs more KV cache than the whole pool holds."""


class EngineClosedError(LLMIRError):
    """The engine was shut down; create a new one."""


class EngineError(LLMIRError):
    """The engine failed while running a request; the message carries the cause."""


# --- constraints ------------------------------------------------------------------------
class ConstraintError(LLMIRError, ValueError):
    """A regex / JSON schema / grammar could not be compiled or is unsatisfiable."""


class ConstraintViolationError(LLMIRError):
    """Generated output does not satisfy its constraint (for example cut short by max_tokens)."""


# --- IR and programs --------------------------------------------------------------------
class IRError(LLMIRError):
    """Base of IR errors."""


class IRParseError(IRError, ValueError):
    """IR text does not parse; the message gives line and column."""


class IRVerifyError(IRError):
    """An IR program is malformed (use before definition, bad join, duplicate name, ...)."""


class ProgramError(LLMIRError):
    """A DSL program failed; the message names the program and the cause."""


class NotYetSupportedError(LLMIRError, NotImplementedError):
    """A feature that is planned but not available in this version."""
