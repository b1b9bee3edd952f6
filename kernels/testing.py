"""Random paged-KV inputs for the kernel tests and benchmarks (tensors only, no model).

Slot layouts: ``"random"`` scatters every token to a random slot; ``"paged"`` gives each request
whole pages of ``page_size`` consecutive slots at random page positions, so a request longer than a
page crosses page boundaries exactly as a block-paged allocator would lay it out.
"""

from __future__ import annotations

import torch


def indptr(lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[0, l0, l0+l1, ...]`` as int64."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return out.to(device)


def slot_layout(
    lengths: list[int],
    num_slots: int,
    kind: str,
    generator: torch.Generator,
    page_size: int = 16,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Distinct slot indices (int64) for requests of ``lengths`` tokens, back to back."""
    total = sum(lengths)
    if kind == "random":
        if total > num_slots:
            raise ValueError(f"{total} tokens do not fit in {num_slots} slots")
        return torch.randperm(num_slots, generator=generator)[:total].to(device)
    if kind != "paged":
        raise ValueError(f"unknown slot layout {kind!r}; use 'random' or 'paged'")
    pages_per_req = [(n + page_size - 1) // page_size for n in lengths]
    if sum(pages_per_req) > num_slots // page_size:
        raise ValueError(f"{sum(pages_per_req)} pages do not fit in {num_slots // page_size} pages")
    pages = torch.randperm(num_slots // page_size, generator=generator)[: sum(pages_per_req)]
    within = torch.arange(page_size)
    parts, first = [], 0
    for n, p in zip(lengths, pages_per_req):
        slots = (pages[first : first + p].unsqueeze(1) * page_size + within).reshape(-1)
        parts.append(slots[:n])
        first += p
    if not parts:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(parts).to(device)


def random_pool(
    num_slots: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V buffers ``[num_slots, num_kv_heads, head_dim]`` of standard normal values."""
    shape = (num_slots, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    v = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return k, v


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; nan anywhere in ``out`` gives inf."""
    if torch.isnan(out).any():
        return float("inf")
    diff = (out.double() - ref.double()).norm()
    return float(diff / ref.double().norm().clamp_min(1e-30))
