"""Test tokenizers and acceptance checks shared by the constraint tests and the benchmark.

Two tokenizers are trained locally (nothing is downloaded) and cached on disk by a key that
includes the corpus description, so a second call is a file load:

- ``byte_level_bpe``: GPT-2 style byte-level BPE (ByteLevel pre-tokenizer and decoder), the
  scheme of Llama-3, Qwen, GPT-NeoX.
- ``sentencepiece_bpe``: Llama-2 style BPE with the ``▁`` space marker and ``<0xNN>`` byte
  fallback tokens (Metaspace-like normalizer, ByteFallback decoder).

The acceptance helpers walk a matcher through the canonical tokenization of a text, checking at
every step that the token's bit is set in the mask (the mask and ``advance`` must agree).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SHARED_DATA_ENV = "LLMIR_SHARED_DATA"


def shared_data_dir() -> Path:
    """``$LLMIR_SHARED_DATA`` or ``<repo>/../shared/data`` (the data is read in place, never copied)."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]
    return repo.parent / "shared" / "data"


def _corpus(max_bytes: int) -> Iterator[str]:
    """Deterministic local text: stdlib Python sources, then JSON schemas and instances."""
    total = 0
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("json/*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        total += len(text)
        yield text
        if total > max_bytes // 2:
            break
    bench = shared_data_dir() / "jsonschemabench"
    if bench.is_dir():
        for path in sorted(bench.glob("*.json")):
            text = path.read_text(encoding="utf-8")
            total += len(text)
            yield text
            doc = json.loads(text)
            for case in doc.get("tests", []):
                yield json.dumps(case["data"], ensure_ascii=False)
                yield json.dumps(case["data"], ensure_ascii=False, separators=(",", ":"))
            if total > max_bytes:
                break


def _cache_dir() -> Path:
    d = Path(os.environ.get("LLMIR_TEST_TOKENIZER_CACHE", Path(tempfile.gettempdir()) / "llmir_test_tok"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _train(kind: str, vocab_size: int, max_bytes: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "byte_level_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_corpus(max_bytes), trainer=trainer)
        return tok
    if kind == "sentencepiece_bpe":
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        # Byte tokens go in as ordinary vocabulary (not special): byte fallback emits them as text.
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
            show_progress=False,
        )
        tok.train_from_iterator(_corpus(max_bytes), trainer=trainer)
        spec = json.loads(tok.to_str())
        for added in spec["added_tokens"]:
            if added["content"].startswith("<0x"):
                added["special"] = False
        return Tokenizer.from_str(json.dumps(spec))
    raise ValueError(f"unknown test tokenizer kind {kind!r}; use 'byte_level_bpe' or 'sentencepiece_bpe'")


def train_test_tokenizer(kind: str = "byte_level_bpe", vocab_size: int = 32000, max_bytes: int = 6_000_000):
    """A ``transformers.PreTrainedTokenizerFast`` trained on local text, cached on disk."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    key = hashlib.sha256(f"{kind}|{vocab_size}|{max_bytes}|v2".encode()).hexdigest()[:16]
    path = _cache_dir() / f"{kind}-{vocab_size}-{key}.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = _train(kind, vocab_size, max_bytes)
        tmp = path.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.replace(path)
    if kind == "byte_level_bpe":
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>")


@dataclass(slots=True)
class WalkResult:
    """Outcome of walking a matcher through a token sequence."""

    accepted: bool  # every token allowed and EOS allowed at the end
    steps: int  # tokens consumed before the verdict
    mask_seconds: list[float]  # wall time of each fill_bitmask call (batch 1)
    reason: str = ""
    mask_cpu_seconds: list[float] | None = None  # the same calls in thread CPU time


def walk_tokens(matcher: Any, token_ids: list[int], vocab_size: int) -> WalkResult:
    """Walk ``matcher`` through ``token_ids`` then EOS, as a sampler would: a token goes through
    iff its mask bit is set.

    Raises AssertionError when a set bit is refused by ``advance``, or when the EOS bit and
    ``is_accepting()`` disagree: those are matcher bugs, not properties of the text. (A clear bit
    whose token ``advance`` would take is allowed: llguidance masks only the canonical spelling
    of forced text.)
    """
    import time

    words = (vocab_size + 31) // 32
    bitmask = torch.zeros((1, words), dtype=torch.int32)
    times: list[float] = []
    cpu: list[float] = []
    for i, tid in enumerate(token_ids):
        t0, c0 = time.perf_counter(), time.thread_time()
        matcher.fill_bitmask(bitmask, 0)
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        allowed = bool((int(bitmask[0, tid // 32]) >> (tid % 32)) & 1)
        if not allowed:
            return WalkResult(False, i, times, f"token {tid} masked out at step {i}", cpu)
        if not matcher.advance(tid):
            raise AssertionError(f"mask allows token {tid} at step {i} but advance refuses it")
    t0, c0 = time.perf_counter(), time.thread_time()
    matcher.fill_bitmask(bitmask, 0)
    times.append(time.perf_counter() - t0)
    cpu.append(time.thread_time() - c0)
    eos_ok = any((int(bitmask[0, e // 32]) >> (e % 32)) & 1 for e in matcher.eos_token_ids)
    if eos_ok != matcher.is_accepting():
        raise AssertionError(f"EOS bit {eos_ok} disagrees with is_accepting() {matcher.is_accepting()}")
    if not eos_ok:
        return WalkResult(False, len(token_ids), times, "EOS not allowed at the end (not accepting)", cpu)
    return WalkResult(True, len(token_ids), times, "", cpu)


def accepts_text(compiled: Any, tokenizer: Any, text: str) -> WalkResult:
    """Walk a fresh matcher of ``compiled`` through the canonical tokenization of ``text``."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return walk_tokens(compiled.new_matcher(), list(ids), compiled.vocab_size)


def sample_text(
    compiled: Any,
    tokenizer: Any,
    rng: Any,
    chars: set[int],
    max_tokens: int,
    any_token_share: float | None = None,
) -> str | None:
    """A random generation under ``compiled``: at each step a token the mask allows (never EOS),
    picked uniformly among the one-character ones (``chars``), so that every character the
    constraint admits at a place is as likely; with ``any_token_share``, that share of the steps
    picks among every allowed token instead (longer tokens reach other texts). Stops once the
    output is complete; None when ``max_tokens`` runs out first."""
    import numpy as np

    from llmir_lang.executor.constraints import allocate_bitmask

    matcher = compiled.new_matcher()
    mask = allocate_bitmask(1, compiled.vocab_size)
    ids: list[int] = []
    for _ in range(max_tokens):
        if matcher.is_accepting():
            return tokenizer.decode(ids)
        matcher.fill_bitmask(mask, 0)
        bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[: compiled.vocab_size]
        allowed = [t for t in np.flatnonzero(bits).tolist() if t not in compiled.eos_token_ids]
        one_char = [t for t in allowed if t in chars]
        if any_token_share is not None and (rng.random() < any_token_share or not one_char):
            token = rng.choice(allowed)
        else:
            token = rng.choice(one_char or allowed)
        assert matcher.advance(token)
        ids.append(token)
    return None


def instance_texts(data: Any) -> list[str]:
    """The two serializations every instance is checked in: compact, and json.dumps' default."""
    out = []
    for seps in ((",", ":"), (", ", ": ")):
        try:
            text = json.dumps(data, ensure_ascii=False, separators=seps)
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: only the escaped form is encodable
            text = json.dumps(data, ensure_ascii=True, separators=seps)
        if text not in out:
            out.append(text)
    return out


@dataclass(slots=True)
class SchemaResult:
    """Outcome of one schema with its test instances (see ``check_schema``)."""

    compiled: bool
    engine: str = ""
    error: str = ""
    error_type: str = ""
    compile_seconds: float = 0.0
    valid_total: int = 0
    valid_accepted: int = 0
    invalid_total: int = 0
    invalid_rejected: int = 0
    mask_seconds: list[float] | None = None
    mask_cpu_seconds: list[float] | None = None
    failures: list[str] | None = None

    @property
    def fully_correct(self) -> bool:
        return (
            self.compiled
            and self.valid_accepted == self.valid_total
            and self.invalid_rejected == self.invalid_total
        )


def check_schema(compiler: Any, tokenizer: Any, schema: Any, tests: list[dict[str, Any]]) -> SchemaResult:
    """Compile ``schema`` and walk every test instance (both serializations) token by token.

    A valid instance must be accepted in every serialization; an invalid one must be rejected
    in every serialization. Mask times of valid-instance walks are collected (batch 1).
    """
    import time

    from llmir_lang.errors import ConstraintError
    from llmir_lang.executor.constraints.spec import spec_from_json_schema

    t0 = time.perf_counter()
    try:
        compiled = compiler.compile(spec_from_json_schema(schema))
    except ConstraintError as e:
        return SchemaResult(False, error=str(e).splitlines()[0][:300], error_type=type(e).__name__)
    res = SchemaResult(True, engine=compiled.engine, compile_seconds=time.perf_counter() - t0)
    res.mask_seconds = []
    res.mask_cpu_seconds = []
    res.failures = []
    for case in tests:
        verdicts = []
        for text in instance_texts(case["data"]):
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            walk = walk_tokens(compiled.new_matcher(), ids, compiled.vocab_size)
            if case["valid"]:
                res.mask_seconds.extend(walk.mask_seconds)
                res.mask_cpu_seconds.extend(walk.mask_cpu_seconds or [])
            verdicts.append(walk.accepted)
            if walk.accepted != case["valid"]:
                res.failures.append(f"{'valid' if case['valid'] else 'invalid'} {text[:80]!r}: {walk.reason}")
        if case["valid"]:
            res.valid_total += 1
            res.valid_accepted += all(verdicts)
        else:
            res.invalid_total += 1
            res.invalid_rejected += not any(verdicts)
    return res
