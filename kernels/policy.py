"""When shared-prefix (cascade) decode pays off.

Shared-prefix decode reads the common prefix once per block of query rows instead of once per
request, but it adds a launch, a second set of partials and a wider merge. Below a few hundred
prefix tokens or a handful of sharing requests the saving is smaller than that overhead, so plain
decode is used there. The thresholds are the issue's rule; benchmarks/gpu/bench_kernels.py measures
both sides of it.
"""

from __future__ import annotations

MIN_SHARED_PREFIX_LEN = 256
MIN_SHARING_REQUESTS = 8


def should_use_shared_prefix(prefix_len: int, num_requests: int) -> bool:
    """True when ``num_requests`` decodes sharing ``prefix_len`` KV tokens should use the cascade path."""
    return prefix_len >= MIN_SHARED_PREFIX_LEN and num_requests >= MIN_SHARING_REQUESTS
