"""Attention kernels over a paged, token-granular KV pool (imported as ``llmir_lang.kernels``).

Pool layout (shared by every kernel): for each layer, ``k_buffer`` and ``v_buffer`` of shape
``[num_slots, num_kv_heads, head_dim]``. A request's KV is a list of slot indices, given in the
ragged form ``kv_indptr`` (``[B+1]``, int32/int64) and ``kv_indices`` (``[kv_indptr[-1]]``, int64),
in token order. ``reference`` defines what every kernel computes; Triton versions must match it.
"""

if __name__ == "kernels":  # pragma: no cover
    # NOTE: this folder is the package ``llmir_lang.kernels``. It becomes importable as a top-level
    # ``kernels`` only when the repository root is on sys.path (``python -m ...`` run from the root).
    # transformers probes for an unrelated PyPI package of that name; looking like an empty namespace
    # package (no __file__, no __version__) makes that probe answer "not installed" instead of crashing.
    del globals()["__file__"]
    __path__ = []  # type: ignore[var-annotated]
else:
    from llmir_lang.kernels import reference  # noqa: F401
