"""Vectorised torch implementation of HiP block-sparse attention: the CPU path (vLLM-CPU has no Triton).

Same function as ``reference.hip_attention_reference`` (tested against it), but instead of masking a
``[rows, context]`` score matrix per query block it gathers, for a chunk of query blocks at once, only the keys
each block may attend to: the sink, the selected key blocks and the window. A HiP layer then costs
O(blocks x (sink + k + window)) instead of O(context) per block. Imports torch only.

Two-tier (KV offload) mode: ``host_k_cache`` / ``host_v_cache`` hold pages ``G, G+1, ...`` of the cache
(``G = k_cache.shape[0]``, physical page ``p >= G`` is ``host_*_cache[p - G]``; see ``kernels/reference.py``).
Only the gathered rows are read from either tier; the cache is never concatenated.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _gather(cache, host_cache, phys, off, heads):
    """``cache[phys, off, heads]`` (broadcast) -> ``[..., D]``; pages ``phys >= G`` read from ``host_cache``."""
    if host_cache is None:
        return cache[phys, off, heads]
    G = cache.shape[0]
    phys, off, heads = torch.broadcast_tensors(phys, off, heads)
    on_host = phys >= G
    on_dev = ~on_host
    rows = cache.new_empty(phys.shape + cache.shape[3:])
    rows[on_dev] = cache[phys[on_dev], off[on_dev], heads[on_dev]]
    rows[on_host] = host_cache[phys[on_host] - G, off[on_host], heads[on_host]]
    return rows


def _attend_chunk(q, k_cache, v_cache, block_table, seq_lens, req, start, length, pos0, ws, idx, *,
                  sink_tokens, block_size_k, scale, max_len, out, host_k_cache=None, host_v_cache=None):
    """One chunk of query blocks (all tensors indexed by the chunk)."""
    dev = q.device
    C = req.shape[0]
    Hkv = k_cache.shape[2]
    Hq, D = q.shape[1], q.shape[2]
    G = Hq // Hkv
    page = k_cache.shape[1]
    bk = block_size_k
    ws64, pos64, len64 = ws.long(), pos0.long(), length.long()
    n = idx.shape[-1]

    # Candidate key positions per (block, head): sink | selected blocks | window, each with a validity mask.
    S = sink_tokens
    sink_t = torch.arange(S, device=dev).expand(C, S)
    sink_ok = sink_t < torch.clamp(ws64, max=S)[:, None]
    sel_t = (idx.long()[..., None] * bk + torch.arange(bk, device=dev)).reshape(C, Hkv, n * bk)
    sel_ok = (idx.long()[..., None] >= 0).expand(C, Hkv, n, bk).reshape(C, Hkv, n * bk)
    sel_ok = sel_ok & (sel_t >= torch.clamp(ws64, max=S)[:, None, None]) & (sel_t < ws64[:, None, None])
    wlen = int((pos64 + len64 - ws64).max())
    win_t = ws64[:, None] + torch.arange(max(wlen, 0), device=dev)
    win_ok = win_t < (pos64 + len64)[:, None]
    pos = torch.cat([sink_t[:, None].expand(C, Hkv, S), sel_t, win_t[:, None].expand(C, Hkv, -1)], dim=-1)
    ok = torch.cat([sink_ok[:, None].expand(C, Hkv, S), sel_ok, win_ok[:, None].expand(C, Hkv, -1)], dim=-1)
    pos = torch.where(ok, pos, torch.zeros_like(pos))

    phys = block_table.long()[req.long()[:, None, None], torch.div(pos, page, rounding_mode="floor")]
    heads = torch.arange(Hkv, device=dev)[None, :, None]
    keys = _gather(k_cache, host_k_cache, phys, pos % page, heads).float()  # [C, Hkv, P, D]
    vals = _gather(v_cache, host_v_cache, phys, pos % page, heads).float()

    rows = torch.arange(max_len, device=dev)
    row_ok = rows[None] < len64[:, None]  # [C, R]
    tok = start.long()[:, None] + torch.where(row_ok, rows[None], torch.zeros_like(rows[None]))
    qq = q[tok].float().view(C, max_len, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(C, Hkv, G * max_len, D)
    sc = torch.einsum("chrd,chpd->chrp", qq, keys) * scale
    qpos = (pos64[:, None] + rows[None]).repeat(1, G)  # [C, G*R] in (g, r) order
    allowed = ok[:, :, None, :] & (pos[:, :, None, :] <= qpos[:, None, :, None])
    sc = sc.masked_fill(~allowed, NEG_INF)
    p = torch.softmax(sc, dim=-1).nan_to_num(0.0)
    o = torch.einsum("chrp,chpd->chrd", p, vals)  # [C, Hkv, G*R, DV]
    o = o.view(C, Hkv, G, max_len, -1).permute(0, 3, 1, 2, 4).reshape(C, max_len, Hq, -1)
    keep = row_ok.flatten()
    out[tok.flatten()[keep]] = o.reshape(C * max_len, Hq, -1)[keep].to(out.dtype)


def hip_attention_torch(q, k_cache, v_cache, block_table, seq_lens, qb_req, qb_start, qb_len, qb_pos0, window_start,
                        indices, *, sink_tokens, block_size_k, scale, out=None, indices_row=None,
                        max_keys_per_chunk: int = 1 << 22, host_k_cache=None, host_v_cache=None):
    """Block-sparse attention, same result as ``hip_attention_reference`` (fp32 softmax).

    ``indices_row`` maps each query block to its row of ``indices`` (decode mask cache). Query blocks are
    processed in chunks sized so that about ``max_keys_per_chunk`` gathered key rows are held at a time.
    ``host_k_cache`` / ``host_v_cache``: host tier of a two-tier cache (module docstring), both or neither.
    """
    assert (host_k_cache is None) == (host_v_cache is None), "pass both host tiers or neither"
    T, Hq, D = q.shape
    if out is None:
        out = torch.empty(T, Hq, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    QB = qb_req.shape[0]
    if QB == 0:
        return out
    if indices_row is not None:
        indices = indices[indices_row.long()]
    live = qb_len > 0
    if not bool(live.all()):
        keep = live.nonzero().flatten()
        qb_req, qb_start, qb_len, qb_pos0, window_start, indices = (
            t[keep] for t in (qb_req, qb_start, qb_len, qb_pos0, window_start, indices))
        QB = keep.numel()
        if QB == 0:
            return out
    # Dense blocks (window from 0) have long windows: chunk by the longest candidate list.
    per_block = sink_tokens + indices.shape[-1] * block_size_k + int((qb_pos0 + qb_len - window_start).max())
    max_len = int(qb_len.max())
    step = max(1, max_keys_per_chunk // max(1, per_block * k_cache.shape[2] * max_len))
    # Order blocks by window length so chunks hold similar sizes (dense and sparse blocks apart).
    order = torch.argsort(qb_pos0.long() + qb_len.long() - window_start.long())
    for c in range(0, QB, step):
        sel = order[c : c + step]
        _attend_chunk(q, k_cache, v_cache, block_table, seq_lens, qb_req[sel], qb_start[sel], qb_len[sel],
                      qb_pos0[sel], window_start[sel], indices[sel], sink_tokens=sink_tokens,
                      block_size_k=block_size_k, scale=scale, max_len=max_len, out=out,
                      host_k_cache=host_k_cache, host_v_cache=host_v_cache)
    return out
