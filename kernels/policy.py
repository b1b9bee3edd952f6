"""When shared-prefix (cascade) decode pays off.

Shared-prefix decode reads the common prefix once per block of query rows instead of once per
request, but it costs a second launch and a round trip of fp32 partials, about 15-20 us on an
H100 whatever the size. It pays once the prefix re-reads it saves outweigh that:
``num_requests * prefix_len * kv_bytes_per_token`` of at least ~128 MiB (45 us of HBM traffic).
Measured on an H100 for Llama-3-8B attention (4 KiB of K+V per token and layer; see
benchmarks/results/kernels_*.json): batch x prefix = 32k tokens is where the two paths cross
(speedups 1.0-1.4x there, 0.6-0.9x below it), so the rule sits at that point; for other models
pass their ``kv_bytes_per_token``.
"""

from __future__ import annotations

MIN_SHARED_PREFIX_LEN = 256
MIN_SHARING_REQUESTS = 2
MIN_SAVED_BYTES = 128 * 2**20
LLAMA3_8B_KV_BYTES_PER_TOKEN = 8 * 128 * 2 * 2  # 8 KV heads x d128 x (K, V) x bf16


def should_use_shared_prefix(
    prefix_len: int, num_requests: int, kv_bytes_per_token: int = LLAMA3_8B_KV_BYTES_PER_TOKEN
) -> bool:
    """True when ``num_requests`` decodes sharing ``prefix_len`` KV tokens should use the cascade path.

    ``kv_bytes_per_token``: K+V bytes of one token in one layer (kv_heads * head_dim * 2 * dtype size).
    """
    if prefix_len < MIN_SHARED_PREFIX_LEN or num_requests < MIN_SHARING_REQUESTS:
        return False
    return num_requests * prefix_len * kv_bytes_per_token >= MIN_SAVED_BYTES
