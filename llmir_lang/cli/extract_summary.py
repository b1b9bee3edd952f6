"""What one ``llmir extract`` run did: the counts it keeps and the summary it prints."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field


@dataclass(slots=True)
class ExtractSummary:
    """What one ``llmir extract`` run did (records already in the output are ``skipped``)."""

    total: int = 0
    skipped: int = 0  # ids already in the output (first occurrence in the input)
    skipped_failed: int = 0  # of ``skipped``, those whose line is an error
    retried: int = 0  # ids whose earlier error line --retry-failed removed, run again
    duplicates: int = 0  # input rows whose id appeared earlier in the input
    duplicate_lines: list[int] = field(default_factory=list)  # their line numbers
    malformed: int = 0  # input lines that are not JSON objects (written as errors)
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    stopped: str = ""  # why the run stopped early ("interrupted", ...), set by ``run_main``
    started: bool = False  # the output is open and the counts above are the job's (``run_extract``)

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def records_per_s(self) -> float:
        """Successful records per second: failures can be instant and would inflate a rate."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def line(self) -> str:
        return f"{self.records_per_s:.1f} ok rec/s, {self.tokens_per_s:.0f} tok/s, cache {self.cache_hit_rate:.0%}"

    def report(self) -> str:
        if self.stopped and not self.started:
            # stopped while loading the model, the schema or the input: no count is known yet but
            # the input's size (0 when it was not read yet), and this run wrote no line
            read = f" ({self.total} input records)" if self.total else ""
            return f"extract: {self.stopped} before the job started{read}: no record ran, no line was written"
        done = f"{self.skipped} already done"
        if self.skipped_failed:
            done += f" ({self.skipped_failed} of them errors: --retry-failed reruns them)"
        extra = ""
        if self.retried:
            extra += f", {self.retried} earlier errors retried"
        if self.duplicates:
            extra += f", {self.duplicates} duplicate ids ignored ({_lines(self.duplicate_lines)})"
        if self.malformed:
            extra += f", {self.malformed} malformed input lines (written as errors)"
        if self.ok:
            rates = (
                f"{self.records_per_s:.2f} ok records/s, {self.tokens_per_s:.0f} output tokens/s, "
                f"cache hit rate {self.cache_hit_rate:.1%} of prompt tokens"
            )
        elif self.failed:
            rates = "no record succeeded, so no rates"
        elif self.stopped:
            rates = f"{self.stopped} before any record of this run finished"
        else:
            rates = "nothing to run"
        return (
            f"extract: {self.ok} ok, {self.failed} failed, {done}{extra} (of {self.total} input records)\n"
            f"time {self.seconds:.1f} s, {rates}"
        )


def _lines(numbers: list[int], first: int = 5) -> str:
    shown = ", ".join(map(str, numbers[:first]))
    return f"line{'s' if len(numbers) > 1 else ''} {shown}" + (", ..." if len(numbers) > first else "")


_PLANNED = ("total", "skipped", "skipped_failed", "retried", "duplicates", "duplicate_lines", "malformed")


def _copy(planned: ExtractSummary, summary: ExtractSummary) -> None:
    """The counts ``_plan`` made, into the summary the caller holds."""
    for name in _PLANNED:
        setattr(summary, name, getattr(planned, name))


def _warn_duplicates(planned: ExtractSummary) -> None:
    if planned.duplicates:
        print(
            f"warning: {planned.duplicates} input records repeat an earlier record's id and are ignored "
            f"({_lines(planned.duplicate_lines)})",
            file=sys.stderr,
        )
