"""Dispatch of the HiP ops: Triton kernels for CUDA tensors; on CPU the torch reference for mask estimation
and KV writes, and the vectorised torch attention (``kernels/torch_hip.py``).

All paths take the same arguments, so the backend is written once. The CPU paths may sync the host (on CPU
that costs nothing); the Triton path never does.
"""
from __future__ import annotations

import functools

import torch

from vllm_hip.kernels import reference as ref
from vllm_hip.kernels import torch_hip


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        from vllm_hip.kernels import triton_hip
    except Exception:  # triton missing or unusable: CUDA tensors then fail loudly in `_use_triton`
        return None
    return triton_hip


def _use_triton(t: torch.Tensor) -> bool:
    if not t.is_cuda:
        return False
    if _triton() is None:
        raise RuntimeError("vllm-hip needs Triton on CUDA devices; install triton matching your torch")
    return True


def kv_write(key, value, k_cache, v_cache, slot_mapping) -> None:
    if _use_triton(key):
        _triton().kv_write(key, value, k_cache, v_cache, slot_mapping)
    else:
        ref.kv_write_reference(key, value, k_cache, v_cache, slot_mapping)


def mask(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, *, n_select, block_size_q,
         block_size_k, sink_tokens, query_stride, out=None, out_row=None, active=None) -> torch.Tensor:
    """Selected key blocks ``[QB, Hkv, n]``; with ``out``/``out_row``/``active``: written into ``out`` rows."""
    kw = dict(n_select=n_select, block_size_q=block_size_q, block_size_k=block_size_k,
              sink_tokens=sink_tokens, query_stride=query_stride)
    if _use_triton(q):
        return _triton().hip_mask(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start,
                                  out=out, out_row=out_row, active=active, **kw)
    if active is not None:
        keep = active.bool()
        qb_req, qb_start, qb_len, window_start = (t[keep] for t in (qb_req, qb_start, qb_len, window_start))
        out_row = out_row[keep] if out_row is not None else None
    idx = ref.hip_mask_reference(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, **kw)
    if out is None:
        return idx
    rows = out_row.long() if out_row is not None else torch.arange(idx.shape[0], device=idx.device)
    out[rows] = idx
    return out


def attention(q, k_cache, v_cache, block_table, seq_lens, qb_req, qb_start, qb_len, qb_pos0, window_start,
              indices, *, sink_tokens, block_size_k, scale, out, indices_row=None, max_qb_len=None) -> torch.Tensor:
    """Block-sparse attention; ``max_qb_len`` (longest query block, 1 for decode) sizes the kernel's tiles."""
    if _use_triton(q):
        return _triton().hip_attention(q, k_cache, v_cache, block_table, seq_lens, qb_req, qb_start, qb_len,
                                       qb_pos0, window_start, indices, sink_tokens=sink_tokens,
                                       block_size_k=block_size_k, scale=scale, out=out, indices_row=indices_row,
                                       block_size_q=max_qb_len)
    return torch_hip.hip_attention_torch(q, k_cache, v_cache, block_table, seq_lens, qb_req, qb_start, qb_len,
                                         qb_pos0, window_start, indices, sink_tokens=sink_tokens,
                                         block_size_k=block_size_k, scale=scale, out=out, indices_row=indices_row)
