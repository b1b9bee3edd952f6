"""Engine construction helpers: KV memory budgets, the default device, the attention backend."""

from __future__ import annotations

import re
from typing import Any

import torch

from llmir_lang.errors import InvalidRequestError
from llmir_lang.executor.attention import TorchAttentionBackend
from llmir_lang.executor.kv_pool import KVPool

_SIZE = re.compile(r"^\s*([\d.]+)\s*([kmgt]?i?b?)\s*$", re.I)


def parse_memory(value: int | float | str | None, device: torch.device) -> int:
    """Bytes for the KV pool: an int (bytes), '512MB'/'2GiB', a fraction (0, 1) of free memory, or None.

    None means 85% of the free GPU memory on CUDA (after the weights are loaded), 512 MiB on the CPU.
    """
    if value is None:
        value = 0.85 if device.type == "cuda" else 512 * 2**20
    if isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise InvalidRequestError(
                f"kv_memory {value!r} is not a size; write e.g. 536870912, '512MB' or '2GiB'"
            )
        unit = m.group(2).lower()
        mult = 1 if unit in ("", "b") else (1024 if "i" in unit else 1000) ** ("kmgt".index(unit[0]) + 1)
        return int(float(m.group(1)) * mult)
    if isinstance(value, float) and 0 < value < 1:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * value)
        import psutil

        return int(psutil.virtual_memory().available * value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InvalidRequestError(f"kv_memory must be > 0, got {value!r}")
    return int(value)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


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
