"""Attention kernels over a paged, token-granular KV pool (imported as ``llmir_lang.kernels``).

Pool layout (shared by every kernel): for each layer, ``k_buffer`` and ``v_buffer`` of shape
``[num_slots, num_kv_heads, head_dim]``. A request's KV is a list of slot indices, given in the
ragged form ``kv_indptr`` (``[B+1]``, int32/int64) and ``kv_indices`` (``[kv_indptr[-1]]``, int64),
in token order. ``reference`` defines what every kernel computes; Triton versions must match it.
"""

from llmir_lang.kernels import reference  # noqa: F401
