"""A JSON-lines output file that survives being killed: whole lines only, resumable by id.

Invariants:
- every line is written by ONE ``os.write`` of the complete line (newline included) on a file
  opened ``O_APPEND``, then fsynced, so a finished record is on disk before the next one starts;
  a line is ``{"id": ..., "record": ...}`` or ``{"id": ..., "error": ...}``, always starting with
  ``{"id":`` (compact JSON), and it is always encodable (an id or a text holding a lone surrogate
  is written with ``\\u`` escapes rather than failing);
- a kill can at worst leave a trailing fragment without its newline (a short write). ``open``
  first checks the WHOLE file (``scan_output``): only when every complete line is an output line
  is such a fragment touched: dropped if it can only be the cut-off start of a line of this writer
  (``_is_cut_line``: not a complete JSON document, compact JSON from ``{"id":`` on; its record is
  redone, and ``truncated_bytes`` says how much was dropped), completed with its newline if it is a
  whole output line. A file that is not an ``llmir extract`` output (a user's ``json.dump`` of
  ``{"id": ...}`` without a newline included) is never modified: ``OutputFileError``, nothing
  written; so is anything but a regular file (a FIFO, a device, ``/dev/stdout``), refused before it
  is read;
- one writer at a time: ``open`` takes an exclusive ``flock`` on the file (held until ``close``);
  a second run on the same file gets ``OutputLockedError`` instead of writing every id twice;
- ``done_ids`` holds the ids of every line in the file, keyed by ``id_key`` (so a rerun skips them
  and no id is ever written twice by this writer); ``failed_ids`` those whose lines are all errors.
  ``open(retry=ids)`` rewrites the file without the error lines of ``ids`` (a temp file renamed
  over it, so a crash leaves either the old or the new file), after which they are not done.
"""

from __future__ import annotations

import codecs
import fcntl
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmir_lang.errors import LLMIRError

_LINE_START = b'{"id":'  # how every line this writer produces begins


class OutputFileError(LLMIRError):
    """The output path cannot be used: not JSON lines with an ``id`` on each line, a directory,
    the input file itself, or a folder that cannot be created."""


class OutputWriteError(OutputFileError):
    """Writing a line failed (a full disk, an I/O error); the lines before it are intact."""


class OutputLockedError(OutputFileError):
    """Another ``llmir extract`` holds the output file."""


def id_key(value: Any) -> str:
    """The id as canonical JSON text: ids compare by value AND type, so ``"7"`` and ``7`` are two
    different records (a CSV id is always text; a JSON-lines id keeps its JSON type)."""
    return json.dumps(value, ensure_ascii=True, sort_keys=True, separators=(",", ":"))


def encode_line(row: dict[str, Any]) -> bytes:
    """``row`` as one compact JSON line. UTF-8 where possible; with ``\\u`` escapes when the row
    holds a lone surrogate (valid in JSON text, not encodable as UTF-8), so writing never fails
    and the line reads back as the same value."""
    text = json.dumps(row, ensure_ascii=False, separators=(",", ":"))
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(row, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")


@dataclass(slots=True)
class OutputScan:
    """What an existing output file holds (``scan_output``)."""

    done_ids: set[str] = field(default_factory=set)
    failed_ids: set[str] = field(default_factory=set)  # ids with error lines only
    end: int = 0  # bytes of complete lines
    fragment: bytes = b""  # bytes after the last newline
    fragment_is_line: bool = False  # the fragment is a whole output line, only its newline missing


def _not_ours(path: Path, what: str) -> OutputFileError:
    return OutputFileError(
        f"{path}:{what}; it is not an output of `llmir extract`, so it was left untouched: "
        "choose another --output or delete the file"
    )


def _parse_line(raw: bytes) -> dict[str, Any] | str:
    """The row of an output line, or why it is not one."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return f"is not UTF-8 (byte {e.start})"
    except json.JSONDecodeError as e:
        return f"is not JSON ({e.msg})"
    if not isinstance(row, dict) or "id" not in row:
        return "has no 'id'"
    if "record" not in row and "error" not in row:
        return "has neither 'record' nor 'error'"
    return row


def _is_cut_line(fragment: bytes) -> bool:
    """Whether ``fragment`` (the bytes after the last newline) can be a line of this writer cut
    short: it is not a complete JSON document (a cut line never is: its closing brace is its last
    byte before the newline), it starts like every line of ours (``{"id":``, or a piece of that),
    and it is compact JSON as ``encode_line`` writes it: no whitespace outside strings. A user's
    ``{"id": "x", ...}`` (``json.dump``'s ``": "``) or any other text is not ours."""
    if not (fragment.startswith(_LINE_START) or _LINE_START.startswith(fragment)):
        return False
    # a kill may cut a multi-byte character: decode what is whole, the rest must be a valid start
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        text = decoder.decode(fragment, final=False)
    except UnicodeDecodeError:
        return False
    try:
        json.loads(text)
    except ValueError:
        pass
    else:
        return False  # a complete document: somebody's file, not a write cut short
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            elif ch < " ":
                return False  # json.dumps escapes control characters
        elif ch == '"':
            in_string = True
        elif ch in " \t\r\n":
            return False
    return True


def _refuse_special(path: Path, flag: str = "--output") -> None:
    """Refuse an existing path that is not a regular file (a directory, a FIFO, a device such as
    ``/dev/stdout``, a socket): reading one could block forever, and it cannot be resumed."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # a new file (a dangling symlink's target): created as a regular file; a path under a
        # file is refused by check_output_path
    except OSError as e:
        raise OutputFileError(f"{flag} {str(path)!r} cannot be used ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise OutputFileError(f"{flag} {str(path)!r} is a directory; give a file path")
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO (named pipe)"
            if stat.S_ISFIFO(mode)
            else "a device"
            if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode))
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise OutputFileError(
            f"{flag} {str(path)!r} is {kind}; the output must be a regular file (it is read back "
            "to resume a run), so give a file path"
        )


def scan_output(path: str | Path, data: bytes | None = None) -> OutputScan:
    """Check every line of the output file (read-only) and collect its ids.

    Raises ``OutputFileError`` if a complete line is not an output line, or if the file does not
    end with a newline and its last bytes are not (the start of) an output line.
    """
    path = Path(path)
    if data is None:
        if not path.exists():
            return OutputScan()
        _refuse_special(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise OutputFileError(f"--output {str(path)!r} cannot be read ({e})") from None
    scan = OutputScan()
    scan.end = data.rfind(b"\n") + 1  # 0 when there is no complete line at all
    ok_ids: set[str] = set()
    for n, raw in enumerate(data[: scan.end].split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        row = _parse_line(raw)
        if isinstance(row, str):
            raise _not_ours(path, f"{n} {row}")
        key = id_key(row["id"])
        scan.done_ids.add(key)
        if "error" not in row:
            ok_ids.add(key)
    scan.fragment = data[scan.end :]
    if scan.fragment:
        row = _parse_line(scan.fragment)
        if isinstance(row, dict):
            scan.fragment_is_line = True
            key = id_key(row["id"])
            scan.done_ids.add(key)
            if "error" not in row:
                ok_ids.add(key)
        elif not _is_cut_line(scan.fragment):
            line = data.count(b"\n") + 1
            why = row if row.startswith("is not") else f"is a JSON document that {row}"
            raise _not_ours(path, f"{line} (the last line, without a newline) {why}")
    scan.failed_ids = scan.done_ids - ok_ids
    return scan


def check_output_path(output: str | Path, input_path: str | Path) -> None:
    """Refuse, before anything is created or read, an output that can never work: a directory,
    the input file itself (by any path: symlink, hard link, relative path), a path under a file,
    or a file another run holds (``OutputLockedError``)."""
    out = Path(output)
    if str(output) == "-":
        raise OutputFileError(
            "--output '-': the output must be a file (a run appends to it and a rerun reads it back "
            "to resume), not standard output; give a file path"
        )
    _refuse_special(out)
    # "new/../in.jsonl" names the input once "new/" is created: compare the normalized path too
    normalized = Path(os.path.normpath(out.absolute()))
    if Path(input_path).exists() and any(
        p.exists() and os.path.samefile(p, input_path) for p in (out, normalized)
    ):
        raise OutputFileError(
            f"--output {str(output)!r} is the --input file; write the output to another file"
        )
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputFileError(f"--output {str(output)!r}: cannot create its folder, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFileError(f"--output {str(output)!r}: no permission to write in {parent}")
    if out.is_file():
        try:
            fd = os.open(out, os.O_RDONLY)
        except OSError as e:
            raise OutputFileError(f"--output {str(output)!r} cannot be opened ({e})") from None
        try:
            _lock(fd, out)
        finally:
            os.close(fd)  # closing releases the probe's lock


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputLockedError(
            f"--output {str(path)!r} is being written by another `llmir extract` (it holds the file's "
            "lock); wait for it to finish, or choose another --output"
        ) from None


class ResumableOutput:
    """Appends ``{"id": ..., ...}`` lines to ``path``; see the module docstring for the contract."""

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.done_ids: set[str] = set()
        self.failed_ids: set[str] = set()
        self.truncated_bytes = 0  # size of the partial last line removed on open, if any
        self.retried_ids: set[str] = set()  # ids whose error lines ``open(retry=...)`` removed
        self._fd: int | None = None

    def open(self, retry: Iterable[str] = ()) -> ResumableOutput:
        """Lock the file (creating it and its folders), check it, fix a cut-off last line, and
        remove the error lines of the ids in ``retry`` (``id_key`` form) so that they run again."""
        _refuse_special(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputFileError(f"--output {str(self.path)!r}: cannot create its folder ({e})") from None
        fd = self._open_locked()
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0) if size else b""
            scan = scan_output(self.path, data)
            again = set(retry) & scan.failed_ids
            if again:
                lines = data[: scan.end].split(b"\n")[:-1]
                if scan.fragment_is_line:
                    lines.append(scan.fragment)
                else:
                    self.truncated_bytes = len(scan.fragment)
                fd = self._rewrite_without_errors(fd, lines, again)
                scan = scan_output(self.path, os.pread(fd, os.fstat(fd).st_size, 0))
            elif scan.fragment_is_line:  # a whole line that only lacks its newline: complete it
                os.write(fd, b"\n")
                os.fsync(fd)
            elif scan.fragment:
                # NOTE: the start of an output line after the last newline is a write cut short by
                # a kill; its record was never complete, so it is dropped and will be redone
                self.truncated_bytes = len(scan.fragment)
                os.ftruncate(fd, scan.end)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.done_ids, self.failed_ids = scan.done_ids, scan.failed_ids
        return self

    def _open_locked(self) -> int:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputFileError(f"--output {str(self.path)!r} cannot be opened ({e})") from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # became a FIFO or a device since the check
                    raise OutputFileError(
                        f"--output {str(self.path)!r} is not a regular file; give a file path"
                    )
                _lock(fd, self.path)
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                return fd
            os.close(fd)  # replaced (another run's --retry-failed rewrite) between open and lock: again

    def _rewrite_without_errors(self, fd: int, lines: list[bytes], ids: set[str]) -> int:
        """Write ``lines`` (checked output lines, no newlines) minus the error lines of ``ids`` to
        a temp file, lock it, rename it over the output (atomic), and return its descriptor; the
        old one is closed. The lock moves with the file, so no other run can slip in between."""
        keep = []
        for raw in lines:
            if not raw.strip():
                continue
            row = _parse_line(raw)
            assert isinstance(row, dict)  # scan_output checked every line
            if "error" in row and id_key(row["id"]) in ids:
                self.retried_ids.add(id_key(row["id"]))
            else:
                keep.append(raw + b"\n")
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        new = os.open(temp, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            fcntl.flock(new, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: nobody else holds it
            os.fchmod(new, stat.S_IMODE(os.fstat(fd).st_mode))
            self._write_all(new, b"".join(keep))
            os.fsync(new)
            os.replace(temp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            os.close(new)
            temp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return new

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a regular file takes the whole line at once; the loop is for the rare short write
            view = view[os.write(fd, view) :]

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (which has an ``id``, first) as one line, durably."""
        if self._fd is None:
            raise RuntimeError("ResumableOutput.write before open()")
        line = encode_line(row)
        end = os.fstat(self._fd).st_size
        try:
            self._write_all(self._fd, line)
            if self.fsync:
                os.fsync(self._fd)
        except OSError as e:  # the disk is full, a quota, an I/O error
            try:  # NOTE: a short write left part of the line: cut it off, so the file stays whole lines
                os.ftruncate(self._fd, end)
            except OSError:
                pass  # the next open drops the fragment instead
            raise OutputWriteError(
                f"--output {str(self.path)!r}: cannot write ({e.strerror or e}); every line before "
                "this one is kept: fix that and rerun the same command to resume"
            ) from e
        key = id_key(row["id"])
        self.done_ids.add(key)
        if "error" in row:
            self.failed_ids.add(key)
        else:
            self.failed_ids.discard(key)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def __enter__(self) -> ResumableOutput:
        return self.open() if self._fd is None else self

    def __exit__(self, *exc: Any) -> None:
        self.close()
