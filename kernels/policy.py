"""When shared-prefix (cascade) decode pays off.

Shared-prefix decode reads the common prefix once per block of query rows instead of once per
request, but it costs a second launch and a round trip of fp32 partials, about 15-30 us on an
H100 whatever the size. It pays once the prefix re-reads it saves outweigh that:
``num_requests * prefix_len * kv_bytes_per_token`` of at least 128 MiB (about 45 us of HBM
traffic), with at least 8 sharing requests. Measured on an H100 for Llama-3-8B attention (4 KiB of
K+V per token and layer; benchmarks/results/kernels_NVIDIA_H100_80GB_HBM3_2026-11-23.json):
batch x prefix = 32k tokens is where the two paths cross (1.09-1.36x at or just above it with
batch >= 8; 0.48-0.99x below it, except 64 x 256 at 1.09x, a small win the rule leaves out). Fewer than 8 requests lose even with long prefixes (2 x 16k:
0.63x, 4 x 16k: 0.84x): the suffix kernel that merges the prefix partials then has too few
programs. For other models pass their ``kv_bytes_per_token``.
"""

from __future__ import annotations

MIN_SHARED_PREFIX_LEN = 256
MIN_SHARING_REQUESTS = 8
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
