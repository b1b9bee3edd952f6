"""Engine construction helpers: KV memory budgets, the default device, the attention backend."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from llmir_lang.errors import InvalidRequestError
from llmir_lang.executor.attention import TorchAttentionBackend
from llmir_lang.executor.kv_pool import KVPool

# a decimal number (optionally with an exponent), then an optional unit: B, KB/MB/GB/TB (powers of
# 1000) or KiB/MiB/GiB/TiB (powers of 1024), K/M/G/T alone meaning the decimal ones
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(e[+-]?\d+)?\s*([kmgt]i?b?|b)?\s*$", re.I)
_MEMORY_FORMS = (
    "a fraction of free memory in (0, 1] (0.5 or '0.5'), a number of bytes > 1 (536870912), "
    "or a size with a unit ('512MB', '2GiB', '64KB')"
)


def parse_memory(value: int | float | str | None, device: torch.device) -> int:
    """Bytes for the KV pool. ``value`` is one of:

    - a number in (0, 1], int, float or a numeric string alike: that fraction of the free memory
      (free GPU memory on CUDA, after the weights are loaded; available RAM on the CPU). ``1`` and
      ``1.0`` mean all of it, not one byte;
    - a bare number > 1: bytes;
    - a size with a unit: ``'512MB'``, ``'2GiB'`` (KB/MB/GB/TB powers of 1000, KiB/... of 1024);
    - None: 85% of the free GPU memory on CUDA, 512 MiB on the CPU.

    Zero, negative, NaN and infinite sizes, bools and unparsable strings raise InvalidRequestError.
    """
    if value is None:
        value = 0.85 if device.type == "cuda" else 512 * 2**20
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequestError(f"kv_memory {value!r} is not a size; give {_MEMORY_FORMS}")
    if isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise InvalidRequestError(f"kv_memory {value!r} is not a size; give {_MEMORY_FORMS}")
        number = float(m.group(1) + (m.group(2) or ""))
        unit = (m.group(3) or "").lower()
        if unit not in ("", "b"):
            number *= (1024 if "i" in unit else 1000) ** ("kmgt".index(unit[0]) + 1)
        bare = not unit  # a bare number: a fraction or bytes, as for a number
    else:
        number, bare = float(value), True
    if not math.isfinite(number) or number <= 0 or (not bare and number < 1):
        raise InvalidRequestError(
            f"kv_memory must be a positive finite size, got {value!r}; give {_MEMORY_FORMS}"
        )
    if bare and number <= 1:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * number)
        import psutil

        return int(psutil.virtual_memory().available * number)
    return int(number)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The engine's device: 'cpu', 'cuda' or 'cuda:N' (None: CUDA when available). A CUDA device on
    a machine or torch build without CUDA is refused here, not by an assertion deep in torch."""
    if device is None:
        return default_device()
    try:
        if not isinstance(device, (str, torch.device)):
            raise TypeError(type(device).__name__)
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidRequestError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidRequestError(
            f"device {device!r} is not supported; the embedded engine runs on 'cpu' or 'cuda'"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA support"
                if torch.version.cuda is None
                else "no CUDA GPU is visible on this machine"
            )
            raise InvalidRequestError(
                f"device {device!r}: CUDA is not available ({why}); use device='cpu' or device=None"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InvalidRequestError(f"device {device!r}: this machine has {count} CUDA device(s)")
    return dev


def check_int(name: str, value: Any, minimum: int, *, none_ok: bool = False, hint: str = "") -> None:
    """Refuse a constructor argument that is not an int >= ``minimum`` (bools are not ints here).
    Bad sizes and limits used to pass: ``max_running_requests=0`` or ``max_prefill_tokens=-1``
    made every request wait forever, ``page_size=0`` divided by zero."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        default = " or None for the default" if none_ok else ""
        raise InvalidRequestError(f"{name} must be an int >= {minimum}{default}{hint}, got {value!r}")


def check_bool(name: str, value: Any, *, none_ok: bool = False) -> None:
    if not isinstance(value, bool) and not (value is None and none_ok):
        default = " or None for the default" if none_ok else ""
        raise InvalidRequestError(f"{name} must be True or False{default}, got {value!r}")


def make_backend(name: str, pool: KVPool, cfg: Any, device: torch.device, max_batch: int):
    """'auto': Triton on CUDA (torch reference where Triton cannot run), torch on the CPU."""
    scale = cfg.head_dim**-0.5
    if name in ("auto", "triton") and device.type == "cuda":
        from llmir_lang.executor.triton_backend import TritonAttentionBackend, select_attention_backend

        if name == "triton":
            return TritonAttentionBackend(
                pool.k_buffers, pool.v_buffers, scale, max_batch_size=max_batch, num_q_heads=cfg.num_heads
            )
        return select_attention_backend(
            pool.k_buffers, pool.v_buffers, scale, max_batch_size=max_batch, num_q_heads=cfg.num_heads
        )
    if name in ("auto", "torch"):
        return TorchAttentionBackend(pool.k_buffers, pool.v_buffers, scale)
    if name == "triton":
        raise InvalidRequestError("attention_backend='triton' needs a CUDA device; use 'auto' or 'torch'")
    raise InvalidRequestError(f"unknown attention_backend {name!r}; use 'auto', 'torch' or 'triton'")
