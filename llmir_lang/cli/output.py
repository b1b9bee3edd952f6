"""A JSON-lines output file that survives being killed: whole lines only, resumable by id.

Invariants:
- every line is written by ONE ``os.write`` of the complete line (newline included) on a file
  opened ``O_APPEND``, then fsynced, so a finished record is on disk before the next one starts;
- a kill can at worst leave a trailing fragment without its newline (a short write); ``open``
  truncates such a fragment before anything is appended, so the file is always whole lines;
- ``done_ids`` holds the ids of every line in the file, keyed by ``id_key`` (so a rerun skips them
  and no id is ever written twice by this writer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmir_lang.errors import LLMIRError


class OutputFileError(LLMIRError):
    """The output file exists but is not JSON lines with an ``id`` on each line."""


def id_key(value: Any) -> str:
    """Ids compare as text: a CSV id ``"7"`` and a JSON-lines id ``7`` are the same record."""
    return value if isinstance(value, str) else json.dumps(value)


class ResumableOutput:
    """Appends ``{"id": ..., ...}`` lines to ``path``; see the module docstring for the contract."""

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.done_ids: set[str] = set()
        self.truncated_bytes = 0  # size of the partial last line removed on open, if any
        self._fd: int | None = None

    def open(self) -> ResumableOutput:
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self

    def _recover(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # 0 when there is no complete line at all
        if end < len(data):
            # NOTE: a fragment after the last newline is a write cut short by a kill; its record
            # was never complete, so it is dropped and will be redone.
            self.truncated_bytes = len(data) - end
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for n, raw in enumerate(data[:end].splitlines(), 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise OutputFileError(
                    f"{self.path}:{n} is not JSON ({e.msg}); it is not an output of `llmir extract`: "
                    "choose another --output or delete the file"
                ) from None
            if not isinstance(row, dict) or "id" not in row:
                raise OutputFileError(
                    f"{self.path}:{n} has no 'id'; it is not an output of `llmir extract`: "
                    "choose another --output or delete the file"
                )
            self.done_ids.add(id_key(row["id"]))

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (which has an ``id``) as one line, durably."""
        if self._fd is None:
            raise RuntimeError("ResumableOutput.write before open()")
        line = (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        view = memoryview(line)
        while view:  # a regular file takes the whole line at once; the loop is for the rare short write
            view = view[os.write(self._fd, view) :]
        if self.fsync:
            os.fsync(self._fd)
        self.done_ids.add(id_key(row["id"]))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResumableOutput:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()
