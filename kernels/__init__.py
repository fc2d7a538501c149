"""HiP attention kernels: the plain-torch reference (always) and the Triton kernels (when triton imports)."""
from .reference import (  # noqa: F401
    allowed_keys,
    dense_attention_reference,
    gather_kv,
    hip_attention_reference,
    hip_mask_reference,
    kv_write_reference,
    make_query_blocks,
    num_rounds,
    selected_fraction,
    strided_query_rows,
    swap_pages_reference,
    tiered_cache,
    window_starts,
)

try:  # triton is optional: `import vllm_hip.kernels` must work without it
    from .triton_hip import dense_attention, hip_attention, hip_mask, kv_write  # noqa: F401

    HAS_TRITON = True
except Exception:  # ImportError, or a triton that cannot initialise on this machine
    dense_attention = hip_attention = hip_mask = kv_write = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "allowed_keys",
    "dense_attention",
    "dense_attention_reference",
    "gather_kv",
    "hip_attention",
    "hip_attention_reference",
    "hip_mask",
    "hip_mask_reference",
    "kv_write",
    "kv_write_reference",
    "make_query_blocks",
    "num_rounds",
    "selected_fraction",
    "strided_query_rows",
    "swap_pages_reference",
    "tiered_cache",
    "window_starts",
]
